//! Failing closed when the table is gone.
//!
//! nftables alone cannot fail closed: a flushed ruleset (`nft flush ruleset`, a reload of the
//! host's nftables service) takes SNAT and filtering with it, and until the daemon re-applies
//! its table the kernel would forward tunnel traffic with its overlay source. Policy routing
//! closes that gap: per WireGuard interface and family,
//! `ip rule add pref 10 iif WG fwmark 0/FORWARD_MARK prohibit` refuses to route every packet
//! from the tunnel that does not carry [`FORWARD_MARK`], and only the table's `prerouting`
//! chain sets that bit. With the table, tunnel packets are marked and routed as usual (then
//! filtered and SNATed by the table); without it, none is forwarded and the sender gets ICMP
//! administratively prohibited. Packets to the exit node's own addresses are unaffected: the
//! `local` table (rule 0) is consulted first.
//!
//! One catch: the kernel's reverse-path check of a forwarded packet looks its source up as if
//! the packet came in on its way *out*, with the packet's mark only where `src_valid_mark` is
//! set, else mark 0. For a reply from the uplink to a container that lookup is "from the
//! WireGuard interface, unmarked": the guard would refuse it and, with `rp_filter` on the
//! uplink, the reply would be dropped. So the table marks packets from the uplink too, and
//! the daemon sets `src_valid_mark` on the uplink and the WireGuard interface.
//!
//! A private network's tunnel must not reach the gateway itself either while the table is
//! gone (its rules allow only DNS and ping there). Its guard, [`RoutingGuard::before_local`],
//! sits at priority 0 *before* the `local` table's lookup, which it moves to priority 1 when
//! it finds it at 0 (as VRF setups do): an unmarked packet from a network's tunnel is then
//! refused whether it is addressed to another host or to this one.
//!
//! The rules live in routing, not nftables, so they have their own lifecycle: put in place
//! before forwarding is turned on, re-checked with the table, removed by teardown.

use std::collections::BTreeSet;

use wgexit::net::{LinkError, Netlink, ProhibitRule};

use super::FORWARD_MARK;

/// The routing-rule priority of the egresses' guard: before `main` (32766) and any table a
/// host is likely to consult for forwarded traffic; after `local` (0).
pub const GUARD_PRIORITY: u32 = 10;

/// The routing-rule priority of the private networks' guard, before the `local` lookup.
pub const LOCAL_GUARD_PRIORITY: u32 = 0;

/// The routing rules that refuse unmarked packets from the egresses' WireGuard interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingGuard {
    priority: u32,
}

impl Default for RoutingGuard {
    fn default() -> Self {
        RoutingGuard {
            priority: GUARD_PRIORITY,
        }
    }
}

impl RoutingGuard {
    /// The guard that also refuses unmarked packets addressed to this host.
    pub fn before_local() -> RoutingGuard {
        RoutingGuard {
            priority: LOCAL_GUARD_PRIORITY,
        }
    }

    /// Moves the `local` lookup after this guard's priority where it is not already (adds
    /// it one later, then deletes the earlier one, so local delivery never stops).
    async fn after_local_lookup(&self, netlink: &Netlink) -> Result<(), LinkError> {
        if self.priority >= GUARD_PRIORITY {
            return Ok(());
        }
        let later = self.priority + 1;
        for v6 in [false, true] {
            let local = netlink.local_lookup_priorities(v6).await?;
            if !local.iter().any(|p| *p <= self.priority) {
                continue;
            }
            if !local.contains(&later) {
                netlink.add_local_lookup(v6, later).await?;
            }
            for p in local.into_iter().filter(|p| *p <= self.priority) {
                netlink.delete_local_lookup(v6, p).await?;
            }
        }
        Ok(())
    }

    /// Puts the `local` lookup back at priority 0 where [`Self::after_local_lookup`] moved it.
    async fn restore_local_lookup(&self, netlink: &Netlink) -> Result<(), LinkError> {
        if self.priority >= GUARD_PRIORITY {
            return Ok(());
        }
        let later = self.priority + 1;
        for v6 in [false, true] {
            let local = netlink.local_lookup_priorities(v6).await?;
            if local.contains(&later) && !local.contains(&0) {
                netlink.add_local_lookup(v6, 0).await?;
                netlink.delete_local_lookup(v6, later).await?;
            }
        }
        Ok(())
    }

    fn wanted(&self, wg_interfaces: &[String]) -> BTreeSet<ProhibitRule> {
        let mut out = BTreeSet::new();
        for iif in wg_interfaces {
            for v6 in [false, true] {
                out.insert(ProhibitRule {
                    v6,
                    priority: self.priority,
                    iif: iif.clone(),
                    mark: 0,
                    mask: FORWARD_MARK,
                });
            }
        }
        out
    }

    /// Our rules in place now (both families).
    async fn present(&self, netlink: &Netlink) -> Result<BTreeSet<ProhibitRule>, LinkError> {
        let mut out = BTreeSet::new();
        for v6 in [false, true] {
            for rule in netlink.prohibit_rules(v6).await? {
                if rule.priority == self.priority && rule.mark == 0 && rule.mask == FORWARD_MARK {
                    out.insert(rule);
                }
            }
        }
        Ok(out)
    }

    /// Makes the guard cover exactly `wg_interfaces`; returns what it added and removed.
    pub async fn ensure(
        &self,
        netlink: &Netlink,
        wg_interfaces: &[String],
    ) -> Result<(Vec<ProhibitRule>, Vec<ProhibitRule>), LinkError> {
        let want = self.wanted(wg_interfaces);
        if !want.is_empty() {
            self.after_local_lookup(netlink).await?;
        }
        let have = self.present(netlink).await?;
        let mut added = Vec::new();
        for rule in want.difference(&have) {
            netlink.add_prohibit_rule(rule).await?;
            added.push(rule.clone());
        }
        let mut removed = Vec::new();
        for rule in have.difference(&want) {
            if netlink.delete_prohibit_rule(rule).await? {
                removed.push(rule.clone());
            }
        }
        Ok((added, removed))
    }

    /// Whether every rule for `wg_interfaces` is in place.
    pub async fn covers(
        &self,
        netlink: &Netlink,
        wg_interfaces: &[String],
    ) -> Result<bool, LinkError> {
        let have = self.present(netlink).await?;
        Ok(self.wanted(wg_interfaces).is_subset(&have))
    }

    /// Removes every guard rule (idempotent).
    pub async fn remove(&self, netlink: &Netlink) -> Result<(), LinkError> {
        for rule in self.present(netlink).await? {
            netlink.delete_prohibit_rule(&rule).await?;
        }
        self.restore_local_lookup(netlink).await
    }
}
