//! The exit-node daemon, `wgexitd`.
//!
//! A request's path: [`api`] (HTTPS, tokens) → [`leases`] (the lease service, its registry
//! and durable store) → [`dataplane`] (the WireGuard device's peers, firewall, sysctls).
//! [`daemon`] starts them in that order's reverse need: config → store → identities →
//! dataplane → API, and runs the reconcile and collection loops. Egresses and private
//! networks are two kinds of [`space`]: networks take the same path ([`leases::members`],
//! the same [`dataplane`] and firewall table) and add a resolver each ([`dns`]).

pub mod addresses;
pub mod api;
pub mod attribution;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod descriptors;
pub mod dns;
pub mod identity;
pub mod leases;
pub mod metrics;
pub mod redb_file;
pub mod space;
pub mod status;
