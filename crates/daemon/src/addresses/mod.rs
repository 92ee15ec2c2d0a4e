//! Addresses a space hands out and leaves from: the overlay address pools ([`pool`] for
//! IPv4, [`pool6`] for IPv6) and the assignment of egress IPs to leases ([`egress_ips`]).
//! Plain types with no knowledge of the config or the lease service, so both can use them:
//! the config validates and describes a space with them, the lease registry allocates from
//! them.

pub mod egress_ips;
pub mod pool;
pub mod pool6;
