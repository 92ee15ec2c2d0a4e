//! The exit node's data path: WireGuard devices and their peers, the firewall (SNAT,
//! forwarding rules, MSS clamp, the private networks' rules) and the sysctls, behind the
//! [`Dataplane`] seam the lease services talk to.
//!
//! [`HostDataplane`] programs this host's network namespace, for both kinds of space: an
//! egress's device and a private network's are one mechanism ([`SpaceDevice`] says what
//! differs: the addresses the device holds), with one peer queue. In a pool of exit nodes
//! every member programs every lease on its own devices, while only the leader of an egress
//! holds its addresses; that split is made here, not in the lease service.

pub mod devices;
pub mod firewall;
pub mod peer_queue;
pub mod space_device;
pub mod sysctl;

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

use std::collections::BTreeMap;

use crate::config::{EgressConfig, NetworkConfig};
use crate::space::Space;
use wgexit::keys::Key;
use wgexit::net::{LinkError, Netlink};
use wgexit::wg::{Backend, BackendKind, DeviceStatus, WgError, WireGuard};

pub use devices::Changes;
use firewall::{
    EgressRules, Firewall, FirewallError, NetworkRules, RoutingGuard, Spaces, Verification,
    DEFAULT_TABLE,
};
use peer_queue::{PeerChange, PeerQueue};
pub use space_device::SpaceDevice;
use sysctl::SysctlError;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{space}: {source}")]
    Wg {
        space: Space,
        #[source]
        source: WgError,
    },
    #[error("{space}: {source}")]
    Link {
        space: Space,
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
    /// Maps a WireGuard error on `space`'s device.
    pub fn wg<C: SpaceDevice + ?Sized>(
        space: &C,
    ) -> impl Fn(WgError) -> DataplaneError + Copy + '_ {
        move |source| DataplaneError::Wg {
            space: space.space(),
            source,
        }
    }

    /// Maps a link error on `space`'s device.
    pub fn link<C: SpaceDevice + ?Sized>(
        space: &C,
    ) -> impl Fn(LinkError) -> DataplaneError + Copy + '_ {
        move |source| DataplaneError::Link {
            space: space.space(),
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

/// What a lease service needs from a data path, for spaces of one kind `C` (the egresses'
/// [`EgressConfig`] unless named): one device per space, its peers one per lease.
#[allow(async_fn_in_trait)]
pub trait Dataplane<C: SpaceDevice = EgressConfig>: Send + Sync {
    /// The space's device as it is: `None` when there is no working device. Called without
    /// the registry locked, since a device with many peers takes a while to read.
    async fn device(&self, space: &C) -> Result<Option<DeviceStatus>, DataplaneError>;
    /// Brings the space's device to its identity, its port, exactly `peers`, its addresses,
    /// MTU and up; peers it had to make anew whose endpoint is known are sent a handshake at
    /// once. `seen` is what [`Dataplane::device`] returned a moment ago; it may lag `peers` a
    /// little, which only costs an idempotent peer change.
    async fn reconcile_device(
        &self,
        space: &C,
        identity: &Key,
        seen: Option<DeviceStatus>,
        peers: &[Peer],
    ) -> Result<Changes, DataplaneError>;
    /// Queues adding (or updating) a peer behind every peer change queued before it and
    /// returns at once; the peer is on the device when the returned future resolves.
    /// Changes queued by concurrent requests reach the device together (see [`peer_queue`]).
    fn queue_peer<'a>(&'a self, space: &'a C, peer: &Peer) -> Queued<'a>;
    /// Adds (or updates) a peer.
    async fn add_peer(&self, space: &C, peer: &Peer) -> Result<(), DataplaneError>;
    /// Removes the peer of `key`; not an error if it is not there.
    async fn remove_peer(&self, space: &C, key: &Key) -> Result<(), DataplaneError>;
    /// Packets the firewall refused or dropped per space since its rules were last written
    /// (an egress's policy refusals, everything a network's rules drop), read at once for
    /// every space; a space the firewall has no count for (its table is being put back,
    /// say) is missing.
    async fn firewall_drops(&self) -> Result<BTreeMap<Space, u64>, DataplaneError>;
}

/// A data path for spaces of every kind, as the lease service needs one.
pub trait SpacesDataplane: Dataplane<EgressConfig> + Dataplane<NetworkConfig> {}

impl<D: Dataplane<EgressConfig> + Dataplane<NetworkConfig>> SpacesDataplane for D {}

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

impl<C: SpaceDevice> Dataplane<C> for HostDataplane {
    async fn device(&self, space: &C) -> Result<Option<DeviceStatus>, DataplaneError> {
        devices::read_device(&self.backend, space).await
    }

    async fn reconcile_device(
        &self,
        space: &C,
        identity: &Key,
        seen: Option<DeviceStatus>,
        peers: &[Peer],
    ) -> Result<Changes, DataplaneError> {
        devices::reconcile_device(&self.backend, &self.netlink, space, identity, seen, peers).await
    }

    fn queue_peer<'a>(&'a self, space: &'a C, peer: &Peer) -> Queued<'a> {
        let change = PeerChange::Set {
            device: space.wg_interface().to_string(),
            peer: devices::peer_config(peer),
        };
        let applied = self.peers.submit(&self.backend, change);
        Box::pin(async move { applied.await.map_err(DataplaneError::wg(space)) })
    }

    async fn add_peer(&self, space: &C, peer: &Peer) -> Result<(), DataplaneError> {
        self.queue_peer(space, peer).await
    }

    /// Through the queue too, so a removal never overtakes an add queued before it.
    async fn remove_peer(&self, space: &C, key: &Key) -> Result<(), DataplaneError> {
        let change = PeerChange::Remove {
            device: space.wg_interface().to_string(),
            key: *key,
        };
        self.peers
            .submit(&self.backend, change)
            .await
            .map_err(DataplaneError::wg(space))
    }

    async fn firewall_drops(&self) -> Result<BTreeMap<Space, u64>, DataplaneError> {
        let counts = self.firewall.space_counts()?;
        Ok(counts
            .into_iter()
            .map(|(s, (packets, _))| (s, packets))
            .collect())
    }
}

impl HostDataplane {
    /// Makes the firewall and forwarding for `egresses` and `networks` what they should be,
    /// the rules in place before forwarding is on; says what it had to repair (nothing when
    /// all was in place). Called at start and at every reconcile.
    pub async fn apply_rules(
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

    /// Removes the rules and the devices of `egresses` and `networks`.
    pub async fn teardown(
        &self,
        egresses: &[EgressConfig],
        networks: &[NetworkConfig],
    ) -> Result<(), DataplaneError> {
        self.firewall.teardown()?;
        Firewall::new(FORMER_NETWORK_TABLE).teardown()?;
        for guard in [RoutingGuard::default(), RoutingGuard::before_local()] {
            guard
                .remove(&self.netlink)
                .await
                .map_err(FirewallError::from)?;
        }
        for e in egresses {
            self.delete_device(e).await?;
        }
        for n in networks {
            self.delete_device(n).await?;
        }
        Ok(())
    }

    async fn delete_device<C: SpaceDevice>(&self, space: &C) -> Result<(), DataplaneError> {
        let name = space.wg_interface();
        self.backend
            .delete(name)
            .await
            .map_err(DataplaneError::wg(space))?;
        self.netlink
            .delete_link(name)
            .await
            .map_err(DataplaneError::link(space))
            .map(drop)
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
