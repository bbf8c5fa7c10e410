//! Local PostgreSQL clusters for the demo, the integration tests and the benchmarks.
pub mod cluster;
