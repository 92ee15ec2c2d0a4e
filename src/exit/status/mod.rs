//! What each egress is doing: the [`snapshot`] `/metrics` reads its gauges from.

pub mod snapshot;

pub use snapshot::{StatusReport, AGE_BUCKETS, NEVER};
