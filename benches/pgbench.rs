//! pgbench harness: see benches/README.
fn main() {}
