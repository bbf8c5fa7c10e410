//! Routing: what a statement needs (`classify`) and where it goes (`policy`).
pub mod classify;
