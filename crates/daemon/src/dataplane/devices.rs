//! WireGuard devices (an egress's, a private network's), made to match the config and the
//! leases.
//!
//! Idempotent and minimal: a device that is right is left alone, a missing peer is added, a
//! peer without a lease is removed, and a peer that is right is not touched (so its session
//! and counters go on).

use std::collections::{HashMap, HashSet};

use std::net::IpAddr;

use ipnet::IpNet;

use super::{DataplaneError, Peer, SpaceDevice};
use wgexit::api::Lease;
use wgexit::keys::Key;
use wgexit::net::Netlink;
use wgexit::wg::{DeviceConfig, DeviceStatus, PeerConfig, WgError, WireGuard};

/// What a reconcile pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub created_device: bool,
    pub reconfigured_device: bool,
    pub peers_added: usize,
    pub peers_removed: usize,
}

/// The exit node's peer entry for a lease: its key, routed to its address, at its last
/// known endpoint.
pub fn peer_config(peer: &Peer) -> PeerConfig {
    PeerConfig {
        public_key: peer.public_key,
        endpoint: peer.endpoint,
        allowed_ips: allowed_ips(peer),
        persistent_keepalive: None,
    }
}

/// A peer's overlay addresses as host networks: the /32 (or a member's /128), and the /128
/// of its overlay IPv6 when it has one.
fn allowed_ips(peer: &Peer) -> Vec<IpNet> {
    let v6 = peer.address6.map(|a| IpNet::from(IpAddr::V6(a)));
    std::iter::once(IpNet::from(peer.address))
        .chain(v6)
        .collect()
}

/// The peer entry of a lease whose endpoint is not known here.
pub fn peer_of(lease: &Lease) -> Peer {
    Peer {
        public_key: lease.public_key,
        address: lease.address,
        address6: lease.address6,
        endpoint: None,
    }
}

/// Starts a handshake with each of `peers` that has an endpoint, without waiting for the
/// client: a peer given a keepalive on an up device sends one at once, and with no session
/// yet that is a handshake initiation; the keepalive is then taken off again.
async fn initiate_handshakes<W: WireGuard>(
    wg: &W,
    name: &str,
    peers: &[&Peer],
) -> Result<(), WgError> {
    let with_endpoint: Vec<PeerConfig> = peers
        .iter()
        .filter(|p| p.endpoint.is_some())
        .map(|p| peer_config(p))
        .collect();
    if with_endpoint.is_empty() {
        return Ok(());
    }
    let kicked: Vec<PeerConfig> = with_endpoint
        .iter()
        .map(|p| PeerConfig {
            persistent_keepalive: Some(1),
            ..p.clone()
        })
        .collect();
    wg.set_peers(name, &kicked).await?;
    wg.set_peers(name, &with_endpoint).await
}

/// Reads a space's device: `None` only when the backend answers that there is no working
/// device (no link, or no `wireguard-go` behind it). A device that is slow to answer (a
/// UAPI timeout) is an error, so the caller skips this round instead of recreating a device
/// that is merely busy and dropping every session on it.
pub async fn read_device<W: WireGuard, C: SpaceDevice>(
    wg: &W,
    space: &C,
) -> Result<Option<DeviceStatus>, DataplaneError> {
    read_wireguard(wg, space.wg_interface())
        .await
        .map_err(DataplaneError::wg(space))
}

/// Device `name` as it is: `None` only when the backend answers that it is absent (for an
/// egress's or a network's device alike; see [`read_device`]).
pub async fn read_wireguard<W: WireGuard>(
    wg: &W,
    name: &str,
) -> Result<Option<DeviceStatus>, WgError> {
    match wg.status(name).await {
        Ok(status) => Ok(Some(status)),
        Err(WgError::NoSuchDevice(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Brings `egress`'s device to: key `private_key`, its listen port, exactly `peers`, the
/// exit's overlay address, its MTU, up. `device` is what [`read_device`] saw; it may be a
/// little older than `peers` (a lease made or released in between), which only costs a
/// redundant, idempotent single-peer change.
pub async fn reconcile_device<W: WireGuard, C: SpaceDevice>(
    wg: &W,
    netlink: &Netlink,
    space: &C,
    private_key: &Key,
    device: Option<DeviceStatus>,
    peers: &[Peer],
) -> Result<Changes, DataplaneError> {
    let name = space.wg_interface();
    let identity = Identity {
        private_key,
        listen_port: space.listen_port(),
    };
    let (changes, made) = reconcile_wireguard(wg, name, identity, device, peers)
        .await
        .map_err(DataplaneError::wg(space))?;
    bring_up(netlink, space).await?;
    initiate_handshakes(wg, name, &made)
        .await
        .map_err(DataplaneError::wg(space))?;
    Ok(changes)
}

/// A device's own key and port.
#[derive(Clone, Copy)]
pub struct Identity<'a> {
    pub private_key: &'a Key,
    pub listen_port: u16,
}

/// Brings WireGuard device `name` to `identity` and exactly `peers`, touching only what
/// differs from `device` (what [`WireGuard::status`] saw; `None`: no working device).
/// Shared by egresses and private networks; addresses, link state and handshakes are the
/// caller's. Returns what changed and the peers it made anew.
pub async fn reconcile_wireguard<'p, W: WireGuard>(
    wg: &W,
    name: &str,
    identity: Identity<'_>,
    device: Option<DeviceStatus>,
    peers: &'p [Peer],
) -> Result<(Changes, Vec<&'p Peer>), WgError> {
    let mut changes = Changes::default();
    let full = || DeviceConfig {
        private_key: *identity.private_key,
        listen_port: Some(identity.listen_port),
        peers: peers.iter().map(peer_config).collect(),
    };
    let made: Vec<&Peer> = match device {
        None => {
            // A stale link without a working WireGuard behind it (e.g. wireguard-go gone).
            let _ = wg.delete(name).await;
            wg.create(name).await?;
            wg.configure(name, &full()).await?;
            changes.created_device = true;
            peers.iter().collect()
        }
        Some(status)
            if status.public_key != Some(identity.private_key.public())
                || status.listen_port != identity.listen_port =>
        {
            wg.configure(name, &full()).await?;
            changes.reconfigured_device = true;
            peers.iter().collect()
        }
        Some(status) => {
            let (missing, removed) = sync_peers(wg, name, &status, peers).await?;
            changes.peers_added = missing.len();
            changes.peers_removed = removed;
            missing
        }
    };
    Ok((changes, made))
}

/// Removes the device's peers that hold no lease and adds (in one request) the leased ones
/// it lacks or has with other addresses. Returns those added, and how many were removed.
async fn sync_peers<'p, W: WireGuard>(
    wg: &W,
    name: &str,
    status: &DeviceStatus,
    peers: &'p [Peer],
) -> Result<(Vec<&'p Peer>, usize), WgError> {
    let want: HashSet<Key> = peers.iter().map(|p| p.public_key).collect();
    let mut removed = 0;
    for have in status
        .peers
        .iter()
        .filter(|p| !want.contains(&p.public_key))
    {
        wg.remove_peer(name, &have.public_key).await?;
        removed += 1;
    }
    let have: HashMap<Key, Vec<IpNet>> = status
        .peers
        .iter()
        .map(|p| (p.public_key, sorted(&p.allowed_ips)))
        .collect();
    let missing: Vec<&Peer> = peers
        .iter()
        .filter(|p| have.get(&p.public_key) != Some(&sorted(&allowed_ips(p))))
        .collect();
    if !missing.is_empty() {
        let configs: Vec<PeerConfig> = missing.iter().map(|p| peer_config(p)).collect();
        wg.set_peers(name, &configs).await?;
    }
    Ok((missing, removed))
}

/// The space's addresses on the device, its MTU, up.
async fn bring_up<C: SpaceDevice>(netlink: &Netlink, space: &C) -> Result<(), DataplaneError> {
    let link_err = DataplaneError::link(space);
    let name = space.wg_interface();
    for address in space.device_addresses() {
        netlink.add_address(name, address).await.map_err(link_err)?;
    }
    netlink
        .set_up(name, Some(space.mtu()))
        .await
        .map_err(link_err)
}

fn sorted(ips: &[IpNet]) -> Vec<IpNet> {
    let mut v = ips.to_vec();
    v.sort();
    v
}
