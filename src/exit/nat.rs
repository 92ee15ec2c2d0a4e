//! The exit node's nftables rules, written through netlink (libnftnl via the `nftnl` crate),
//! all inside one table that wgexitd alone owns.
//!
//! TODO(implementation): see the module's public API below.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// What the rules of one egress are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRules {
    /// The egress name from the config (used in rule comments / for diagnostics).
    pub name: String,
    /// The exit node's WireGuard interface for this egress.
    pub wg_interface: String,
    /// Where egress traffic leaves (the `interface` key).
    pub uplink: String,
    /// The overlay pool leased to containers.
    pub pool: Ipv4Net,
    /// The exit node's own overlay address (first host of the pool).
    pub overlay_ip: Ipv4Addr,
    /// The static egress IP: SNAT source.
    pub egress_ip: Ipv4Addr,
}
