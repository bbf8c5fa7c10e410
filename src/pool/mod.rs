//! Server connections and their pools, one pool per (node, user, database).
pub mod lane;
pub mod listing;
pub mod lsn_query;
pub mod manager;
pub mod registry;
pub mod server;
pub mod stream;

pub use registry::{PoolKey, Pools};
pub use server::{ServerConnection, ServerError};

/// A pooled server connection: returned to its pool when dropped.
pub type Checkout = deadpool::managed::Object<manager::ServerManager>;
