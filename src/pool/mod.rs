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

/// Takes a server connection out of its pool and closes it: one whose
/// state is unknown (mid-transaction, settings unknown, cancelled) is
/// never handed to another client.
pub fn discard(conn: Checkout) {
    drop(deadpool::managed::Object::take(conn));
}
