//! Leases: who holds which overlay address in which space (egress or network). Nothing here
//! knows of the pool: its etcd store implements [`store::LeaseStore`] in [`crate::cluster`].
//!
//! The [`service`] is what the API calls; it keeps the in-memory [`registry`] (addresses
//! from each egress's [`pool`]) and the dataplane in step. Every change reaches the durable
//! [`store`] (the embedded [`redb`] one by default; in a pool etcd's,
//! [`crate::cluster::lease_store`]) through [`commit`], which shares one
//! fsync among concurrent requests. [`collect`] decides which leases belong to peers that
//! have gone away.

pub mod collect;
pub mod commit;
pub mod members;
pub mod overlay6;
pub mod redb;
pub mod registry;
pub mod service;
pub mod store;

/// The address pools and egress IP assignment leases are made from (see [`crate::addresses`]).
pub use crate::addresses::{egress_ips, pool, pool6};
