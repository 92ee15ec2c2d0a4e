//! An egress's WireGuard device, made to match the config and the leases.
//!
//! Idempotent and minimal: a device that is right is left alone, a missing peer is added, a
//! peer without a lease is removed, and a peer that is right is not touched (so its session
//! and counters go on).

use std::collections::{HashMap, HashSet};

use ipnet::{IpNet, Ipv4Net};

use super::DataplaneError;
use crate::api::Lease;
use crate::exit::config::EgressConfig;
use crate::keys::Key;
use crate::net::{LinkError, Netlink};
use crate::wg::{DeviceConfig, DeviceStatus, PeerConfig, WgError, WireGuard};

/// What a reconcile pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub created_device: bool,
    pub reconfigured_device: bool,
    pub peers_added: usize,
    pub peers_removed: usize,
}

/// The exit node's peer entry for a lease: its key, routed to its address.
pub fn peer_of(lease: &Lease) -> PeerConfig {
    PeerConfig {
        public_key: lease.public_key,
        endpoint: None,
        allowed_ips: vec![IpNet::from(lease.address)],
        persistent_keepalive: None,
    }
}

/// Reads `egress`'s device: `None` when there is no working device.
pub async fn read_device<W: WireGuard>(
    wg: &W,
    egress: &EgressConfig,
) -> Result<Option<DeviceStatus>, DataplaneError> {
    let name = egress.wg_interface.as_str();
    if !wg.exists(name).await {
        return Ok(None);
    }
    wg.status(name)
        .await
        .map(Some)
        .map_err(DataplaneError::wg(egress))
}

/// Brings `egress`'s device to: key `private_key`, its listen port, exactly `peers`, the
/// exit's overlay address, its MTU, up. `device` is what [`read_device`] saw; it may be a
/// little older than `peers` (a lease made or released in between), which only costs a
/// redundant, idempotent single-peer change.
pub async fn reconcile_device<W: WireGuard>(
    wg: &W,
    netlink: &Netlink,
    egress: &EgressConfig,
    private_key: &Key,
    device: Option<DeviceStatus>,
    peers: &[PeerConfig],
) -> Result<Changes, DataplaneError> {
    let name = egress.wg_interface.as_str();
    let identity = Identity {
        private_key,
        listen_port: egress.listen_port,
    };
    let changes = reconcile_wireguard(wg, name, identity, device, peers)
        .await
        .map_err(DataplaneError::wg(egress))?;
    let link_err = DataplaneError::link(egress);
    let overlay = Ipv4Net::new(egress.overlay_ip(), egress.pool.prefix_len()).map_err(|e| {
        link_err(LinkError::Netlink {
            what: "overlay address".into(),
            detail: e.to_string(),
            errno: None,
        })
    })?;
    netlink
        .add_address(name, IpNet::V4(overlay))
        .await
        .map_err(link_err)?;
    netlink
        .set_up(name, Some(egress.mtu))
        .await
        .map_err(link_err)?;
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
/// Shared by egresses and private networks; addresses and link state are the caller's.
pub async fn reconcile_wireguard<W: WireGuard>(
    wg: &W,
    name: &str,
    identity: Identity<'_>,
    device: Option<DeviceStatus>,
    peers: &[PeerConfig],
) -> Result<Changes, WgError> {
    let mut changes = Changes::default();
    let full = DeviceConfig {
        private_key: *identity.private_key,
        listen_port: Some(identity.listen_port),
        peers: peers.to_vec(),
    };
    match device {
        None => {
            // A stale link without a working WireGuard behind it (e.g. wireguard-go gone).
            let _ = wg.delete(name).await;
            wg.create(name).await?;
            wg.configure(name, &full).await?;
            changes.created_device = true;
        }
        Some(status)
            if status.public_key != Some(identity.private_key.public())
                || status.listen_port != identity.listen_port =>
        {
            wg.configure(name, &full).await?;
            changes.reconfigured_device = true;
        }
        Some(status) => {
            let want: HashSet<Key> = peers.iter().map(|p| p.public_key).collect();
            for have in &status.peers {
                if !want.contains(&have.public_key) {
                    wg.remove_peer(name, &have.public_key).await?;
                    changes.peers_removed += 1;
                }
            }
            let have: HashMap<Key, Vec<IpNet>> = status
                .peers
                .iter()
                .map(|p| (p.public_key, sorted(&p.allowed_ips)))
                .collect();
            for p in peers {
                if have.get(&p.public_key) != Some(&sorted(&p.allowed_ips)) {
                    wg.set_peer(name, p).await?;
                    changes.peers_added += 1;
                }
            }
        }
    }
    Ok(changes)
}

fn sorted(ips: &[IpNet]) -> Vec<IpNet> {
    let mut v = ips.to_vec();
    v.sort();
    v
}
