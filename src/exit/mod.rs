//! The exit-node daemon, `wgexitd`.
//!
//! A request's path: [`api`] (HTTPS, tokens) → [`leases`] (the lease service, its registry
//! and durable store) → [`dataplane`] (the WireGuard device's peers, firewall, sysctls).
//! [`daemon`] starts them in that order's reverse need: config → store → identities →
//! dataplane → API, and runs the reconcile and collection loops.

pub mod api;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod identity;
pub mod leases;
pub mod metrics;
pub mod status;
