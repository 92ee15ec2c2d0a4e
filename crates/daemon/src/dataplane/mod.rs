//! The exit node's data path: WireGuard devices and their peers, the firewall (SNAT,
//! forwarding rules, MSS clamp) and the sysctls, behind the [`Dataplane`] seam the lease
//! service talks to.
//!
//! [`HostDataplane`] programs this host's network namespace. In a pool of exit nodes every
//! member programs every lease on its own devices, while only the leader of an egress holds
//! its addresses; that split is made here, not in the lease service.

pub mod devices;
pub mod firewall;
pub mod network;
pub mod peer_queue;
pub mod sysctl;

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

use crate::config::{EgressConfig, NetworkConfig};
use wgexit::keys::Key;
use wgexit::net::{LinkError, Netlink};
use wgexit::wg::{Backend, BackendKind, DeviceStatus, WgError, WireGuard};

pub use devices::Changes;
use firewall::{
    EgressRules, Firewall, FirewallError, NetworkRules, RoutingGuard, Spaces, Verification,
    DEFAULT_TABLE,
};
use peer_queue::{PeerChange, PeerQueue};
use sysctl::SysctlError;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("egress {egress}: {source}")]
    Wg {
        egress: String,
        #[source]
        source: WgError,
    },
    #[error("egress {egress}: {source}")]
    Link {
        egress: String,
        #[source]
        source: LinkError,
    },
    #[error(transparent)]
    Open(#[from] WgError),
    #[error(transparent)]
    Netlink(#[from] LinkError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
}

impl DataplaneError {
    /// Maps a WireGuard error on `egress`'s device.
    pub fn wg(egress: &EgressConfig) -> impl Fn(WgError) -> DataplaneError + Copy + '_ {
        let name = egress.name.as_str();
        move |source| DataplaneError::Wg {
            egress: name.to_string(),
            source,
        }
    }

    /// Maps a link error on `egress`'s device.
    pub fn link(egress: &EgressConfig) -> impl Fn(LinkError) -> DataplaneError + Copy + '_ {
        let name = egress.name.as_str();
        move |source| DataplaneError::Link {
            egress: name.to_string(),
            source,
        }
    }
}

/// A leased peer as the dataplane programs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub public_key: Key,
    /// Its overlay address: the one address it may send from and is routed.
    pub address: IpAddr,
    /// Its overlay IPv6, on an egress with `ip6`: routed and allowed as a source too.
    pub address6: Option<Ipv6Addr>,
    /// Where it was last seen, if known: set on a peer made anew so the exit node can start
    /// the handshake itself instead of waiting for the client's rekey.
    pub endpoint: Option<SocketAddr>,
}

/// A queued peer change; resolves once it is on the device.
pub type Queued<'a> = Pin<Box<dyn Future<Output = Result<(), DataplaneError>> + Send + 'a>>;

/// What the lease service needs from a data path.
#[allow(async_fn_in_trait)]
pub trait Dataplane: Send + Sync {
    /// `egress`'s device as it is: `None` when there is no working device. Called without
    /// the registry locked, since a device with many peers takes a while to read.
    async fn device(&self, egress: &EgressConfig) -> Result<Option<DeviceStatus>, DataplaneError>;
    /// Brings `egress`'s device to its identity, its port, exactly `peers`, its overlay
    /// address, MTU and up; peers it had to make anew whose endpoint is known are sent a
    /// handshake at once. `seen` is what [`Dataplane::device`] returned a moment ago; it may
    /// lag `peers` a little, which only costs an idempotent peer change.
    async fn reconcile_device(
        &self,
        egress: &EgressConfig,
        identity: &Key,
        seen: Option<DeviceStatus>,
        peers: &[Peer],
    ) -> Result<Changes, DataplaneError>;
    /// Queues adding (or updating) a peer behind every peer change queued before it and
    /// returns at once; the peer is on the device when the returned future resolves.
    /// Changes queued by concurrent requests reach the device together (see [`peer_queue`]).
    fn queue_peer<'a>(&'a self, egress: &'a EgressConfig, peer: &Peer) -> Queued<'a>;
    /// Adds (or updates) a peer.
    async fn add_peer(&self, egress: &EgressConfig, peer: &Peer) -> Result<(), DataplaneError>;
    /// Removes the peer of `key`; not an error if it is not there.
    async fn remove_peer(&self, egress: &EgressConfig, key: &Key) -> Result<(), DataplaneError>;
    /// Makes the firewall and forwarding for `egresses` and `networks` what they should be,
    /// the rules in place before forwarding is on; says what it had to repair (nothing when
    /// all was in place). Called at start and at every reconcile.
    async fn apply_rules(
        &self,
        egresses: &[EgressConfig],
        networks: &[NetworkConfig],
    ) -> Result<Vec<String>, DataplaneError>;
    /// Removes the devices and the rules of `egresses`.
    async fn teardown(&self, egresses: &[EgressConfig]) -> Result<(), DataplaneError>;
}

/// The data path in this process's network namespace.
pub struct HostDataplane {
    backend: Backend,
    netlink: Netlink,
    firewall: Firewall,
    peers: PeerQueue,
}

impl HostDataplane {
    /// Opens the WireGuard backend of `kind` and netlink in the current namespace (inside a
    /// tokio runtime).
    pub fn open(kind: BackendKind) -> Result<HostDataplane, DataplaneError> {
        Ok(HostDataplane {
            backend: Backend::open(kind)?,
            netlink: Netlink::current()?,
            firewall: Firewall::new(DEFAULT_TABLE),
            peers: PeerQueue::default(),
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}

/// What the firewall needs of an egress: its IPv4 pool, overlay address and SNAT blocks,
/// and with `ip6` the same for IPv6.
pub fn rules_for(e: &EgressConfig) -> EgressRules {
    let mut rules = EgressRules {
        name: e.name.clone(),
        wg_interface: e.wg_interface.to_string(),
        uplink: e.interface.to_string(),
        pools: vec![e.pool.into()],
        overlay_ips: vec![e.overlay_ip().into()],
        snat: e
            .ip_blocks()
            .into_iter()
            .map(|(block, ip)| (block.into(), ip.into()))
            .collect(),
        policy: e.policy.clone(),
        exit_addresses: Vec::new(),
    };
    if let Some(v6) = &e.v6 {
        rules.pools.push(v6.pool.into());
        rules.overlay_ips.push(v6.gateway().into());
        let blocks = v6.blocks().into_iter();
        rules
            .snat
            .extend(blocks.map(|(block, ip)| (block.into(), ip.into())));
    }
    rules
}

/// What the firewall needs of a private network: its interface, prefix, gateway and
/// resolver addresses.
pub fn network_rules_for(n: &NetworkConfig) -> NetworkRules {
    NetworkRules {
        name: n.name.clone(),
        wg_interface: n.wg_interface.to_string(),
        prefix: n.prefix,
        gateway: n.gateway(),
        resolver: n.dns(),
    }
}

/// The table the private networks' rules had apart before they joined [`DEFAULT_TABLE`];
/// removed where an earlier version left it.
const FORMER_NETWORK_TABLE: &str = "wgexitd-net";

/// Every egress's endpoint address and static IPs (IPv4 and IPv6), without repeats: the
/// exit nodes' own addresses as the config names them.
pub fn exit_addresses(egresses: &[EgressConfig]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for e in egresses {
        let v4 = e.ips().iter().map(|ip| IpAddr::V4(*ip));
        let v6 = e.v6.iter().flat_map(|v6| &v6.ips).map(|ip| IpAddr::V6(*ip));
        for ip in std::iter::once(e.endpoint.ip()).chain(v4).chain(v6) {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

impl HostDataplane {
    /// The nftables table, by content.
    fn ensure_table(&self, spaces: Spaces) -> Result<Option<String>, DataplaneError> {
        let repair = match self.firewall.verify_spaces(spaces)? {
            Verification::Matches => return Ok(None),
            Verification::Missing => format!("table inet {DEFAULT_TABLE} was missing; applied it"),
            Verification::Differs(what) => {
                format!("table inet {DEFAULT_TABLE} differed from the config ({what}); replaced it")
            }
        };
        self.firewall.apply_spaces(spaces)?;
        Firewall::new(FORMER_NETWORK_TABLE).teardown()?;
        Ok(Some(repair))
    }

    /// The fail-closed routing rules, one per WireGuard interface and family: the egresses'
    /// before forwarding, the networks' before local delivery too.
    async fn ensure_guards(
        &self,
        egresses: &[EgressConfig],
        networks: &[NetworkConfig],
    ) -> Result<Vec<String>, DataplaneError> {
        let egress_wg: Vec<String> = egresses
            .iter()
            .map(|e| e.wg_interface.to_string())
            .collect();
        let network_wg: Vec<String> = networks
            .iter()
            .map(|n| n.wg_interface.to_string())
            .collect();
        let mut repairs = Vec::new();
        for (guard, wg) in [
            (RoutingGuard::default(), egress_wg),
            (RoutingGuard::before_local(), network_wg),
        ] {
            repairs.extend(Self::ensure_guard(&self.netlink, guard, &wg).await?);
        }
        Ok(repairs)
    }

    async fn ensure_guard(
        netlink: &Netlink,
        guard: RoutingGuard,
        wg: &[String],
    ) -> Result<Vec<String>, DataplaneError> {
        let (added, removed) = guard
            .ensure(netlink, wg)
            .await
            .map_err(FirewallError::from)?;
        Ok(added
            .iter()
            .map(|r| format!("added fail-closed routing rule {r:?}"))
            .chain(
                removed
                    .iter()
                    .map(|r| format!("removed stale routing rule {r:?}")),
            )
            .collect())
    }
}

impl Dataplane for HostDataplane {
    async fn device(&self, egress: &EgressConfig) -> Result<Option<DeviceStatus>, DataplaneError> {
        devices::read_device(&self.backend, egress).await
    }

    async fn reconcile_device(
        &self,
        egress: &EgressConfig,
        identity: &Key,
        seen: Option<DeviceStatus>,
        peers: &[Peer],
    ) -> Result<Changes, DataplaneError> {
        devices::reconcile_device(&self.backend, &self.netlink, egress, identity, seen, peers).await
    }

    fn queue_peer<'a>(&'a self, egress: &'a EgressConfig, peer: &Peer) -> Queued<'a> {
        let change = PeerChange::Set {
            device: egress.wg_interface.to_string(),
            peer: devices::peer_config(peer),
        };
        let applied = self.peers.submit(&self.backend, change);
        Box::pin(async move { applied.await.map_err(DataplaneError::wg(egress)) })
    }

    async fn add_peer(&self, egress: &EgressConfig, peer: &Peer) -> Result<(), DataplaneError> {
        self.queue_peer(egress, peer).await
    }

    /// Through the queue too, so a removal never overtakes an add queued before it.
    async fn remove_peer(&self, egress: &EgressConfig, key: &Key) -> Result<(), DataplaneError> {
        let change = PeerChange::Remove {
            device: egress.wg_interface.to_string(),
            key: *key,
        };
        self.peers
            .submit(&self.backend, change)
            .await
            .map_err(DataplaneError::wg(egress))
    }

    async fn apply_rules(
        &self,
        egresses: &[EgressConfig],
        networks: &[NetworkConfig],
    ) -> Result<Vec<String>, DataplaneError> {
        let own = exit_addresses(egresses);
        let rules: Vec<_> = egresses
            .iter()
            .map(|e| EgressRules {
                exit_addresses: own.clone(),
                ..rules_for(e)
            })
            .collect();
        let network_rules: Vec<_> = networks.iter().map(network_rules_for).collect();
        let spaces = Spaces {
            egresses: &rules,
            networks: &network_rules,
        };
        let mut repairs: Vec<String> = self.ensure_table(spaces)?.into_iter().collect();
        repairs.extend(self.ensure_guards(egresses, networks).await?);
        for e in egresses {
            sysctl::prepare_egress(&e.wg_interface, &e.interface)?;
        }
        sysctl::forward()?;
        if egresses.iter().any(|e| e.v6.is_some()) || !networks.is_empty() {
            sysctl::forward6()?;
        }
        Ok(repairs)
    }

    async fn teardown(&self, egresses: &[EgressConfig]) -> Result<(), DataplaneError> {
        self.firewall.teardown()?;
        Firewall::new(FORMER_NETWORK_TABLE).teardown()?;
        for guard in [RoutingGuard::default(), RoutingGuard::before_local()] {
            guard
                .remove(&self.netlink)
                .await
                .map_err(FirewallError::from)?;
        }
        for e in egresses {
            self.backend
                .delete(&e.wg_interface)
                .await
                .map_err(DataplaneError::wg(e))?;
            self.netlink
                .delete_link(&e.wg_interface)
                .await
                .map_err(DataplaneError::link(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::egress6::EgressV6;
    use crate::config::tests::egress;

    #[test]
    fn an_egress_with_ip6_gets_its_ipv6_pool_gateway_and_snat_blocks() {
        let mut e = egress("acme", "100.96.0.0/24");
        assert_eq!(rules_for(&e).pools.len(), 1);
        e.v6 = Some(EgressV6 {
            ips: vec!["2001:db8:77::77".parse().unwrap()],
            pool: "fd77:0:1::/64".parse().unwrap(),
        });
        let r = rules_for(&e);
        let pool6: ipnet::IpNet = "fd77:0:1::/64".parse().unwrap();
        assert_eq!(r.pools[1], pool6);
        assert_eq!(r.overlay_ips[1], "fd77:0:1::1".parse::<IpAddr>().unwrap());
        assert_eq!(r.snat[1], (pool6, "2001:db8:77::77".parse().unwrap()));
    }
}
