//! What operators talk to: the HTTP listener (`listen.admin`) with metrics,
//! health, readiness, the topology and the HA operations; and the client
//! side of it that `tidepool ctl` uses.
pub mod client;
pub mod console;
pub mod http;

pub use http::{router, serve};
