//! The exit-node daemon, `wgexitd`: WireGuard devices per egress, SNAT, the lease store and
//! the HTTPS control API.

pub mod collect;
pub mod commit;
pub mod config;
pub mod daemon;
pub mod firewall;
pub mod http;
pub mod policy;
pub mod pool;
pub mod ratelimit;
pub mod reconcile;
pub mod registry;
pub mod service;
pub mod store;
pub mod sysctl;
pub mod tls;
pub mod tokens;
