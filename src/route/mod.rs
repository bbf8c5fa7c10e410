//! Routing: what a statement needs (`classify`) and where it goes (`policy`).
pub mod classify;
pub mod fingerprint;
pub mod hint;
pub mod policy;
