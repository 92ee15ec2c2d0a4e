//! wgexit: static egress IPs for containers over WireGuard.
//!
//! Two binaries sit on this library: `wgexit`, the CNI plugin, and `wgexitd`, the
//! exit-node daemon. What both sides exchange lives in [`api`].

pub mod api;
pub mod cni;
pub mod crypto;
pub mod exit;
pub mod fsutil;
pub mod keys;
pub mod net;
pub mod peer;
pub mod wg;
