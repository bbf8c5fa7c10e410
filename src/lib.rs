//! tidepool: a replica-aware PostgreSQL proxy.
//!
//! The module layout follows the data flow:
//! `frontend` (listener → startup/auth → session) → `route` (classify → policy)
//! → `pool` (server connections) → PostgreSQL (over `server_tls` when
//! configured, as the admin connections are), with `topology` (who is primary,
//! who is up) beside it, `proxy` wiring them together, `metrics` and `admin`
//! (HTTP: /metrics, /health, /ready, /topology) for operators, `bell` for
//! the rare signals every session waits on, and `demo` bootstrapping local
//! clusters for the demo, the tests and the benchmarks.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bell;
pub mod config;
pub mod demo;
pub mod frontend;
pub mod fuzzing;
pub mod ha;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server_tls;
pub mod topology;
