//! What operators talk to: the HTTP listener (`listen.admin`) with metrics,
//! health, readiness and the topology.
pub mod http;

pub use http::{router, serve};
