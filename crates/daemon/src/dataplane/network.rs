//! The private networks' data path: one WireGuard device per network, holding the gateway
//! (`<prefix>::1`) and resolver (`<prefix>::3`) addresses and one peer per member (allowed
//! IP: the member's /128). Their firewall rules and fail-closed guard are the host's, in
//! [`super::firewall`] beside the egresses'.

use ipnet::{IpNet, Ipv6Net};

use super::devices::{self, Changes, Identity};
use crate::config::NetworkConfig;
use wgexit::api::Lease;
use wgexit::keys::Key;
use wgexit::net::{LinkError, Netlink};
use wgexit::wg::{Backend, BackendKind, DeviceStatus, WgError, WireGuard};

#[derive(Debug, thiserror::Error)]
pub enum NetworkPlaneError {
    #[error("network {network}: {source}")]
    Wg {
        network: String,
        #[source]
        source: WgError,
    },
    #[error("network {network}: {source}")]
    Link {
        network: String,
        #[source]
        source: LinkError,
    },
    #[error(transparent)]
    Open(#[from] WgError),
    #[error(transparent)]
    Netlink(#[from] LinkError),
}

fn wg_err(n: &NetworkConfig) -> impl Fn(WgError) -> NetworkPlaneError + Copy + '_ {
    move |source| NetworkPlaneError::Wg {
        network: n.name.clone(),
        source,
    }
}

fn link_err(n: &NetworkConfig) -> impl Fn(LinkError) -> NetworkPlaneError + Copy + '_ {
    move |source| NetworkPlaneError::Link {
        network: n.name.clone(),
        source,
    }
}

/// The networks' devices and rules in this process's network namespace.
pub struct NetworkDataplane {
    backend: Backend,
    netlink: Netlink,
}

/// The gateway's addresses on a network's device: `<prefix>::1` with the prefix (its route)
/// and the resolver's `<prefix>::3/128`.
pub fn gateway_addresses(n: &NetworkConfig) -> Vec<IpNet> {
    let mut out = Vec::new();
    if let Ok(gw) = Ipv6Net::new(n.gateway(), n.prefix.prefix_len()) {
        out.push(IpNet::V6(gw));
    }
    if let Ok(dns) = Ipv6Net::new(n.dns(), 128) {
        out.push(IpNet::V6(dns));
    }
    out
}

impl NetworkDataplane {
    /// Opens the WireGuard backend of `kind` and netlink in the current namespace (inside a
    /// tokio runtime).
    pub fn open(kind: BackendKind) -> Result<NetworkDataplane, NetworkPlaneError> {
        Ok(NetworkDataplane {
            backend: Backend::open(kind)?,
            netlink: Netlink::current()?,
        })
    }

    /// The network's device as it is: `None` when there is no working device.
    pub async fn device(
        &self,
        n: &NetworkConfig,
    ) -> Result<Option<DeviceStatus>, NetworkPlaneError> {
        // As for egresses: only an answer that the device is absent makes it anew; a slow
        // wireguard-go is an error, and the round is skipped.
        devices::read_wireguard(&self.backend, n.wg_interface.as_str())
            .await
            .map_err(wg_err(n))
    }

    /// Brings the network's device to its identity, port, exactly the peers of `members`,
    /// the gateway's addresses, MTU and up.
    pub async fn reconcile(
        &self,
        n: &NetworkConfig,
        private_key: &Key,
        seen: Option<DeviceStatus>,
        members: &[&Lease],
    ) -> Result<Changes, NetworkPlaneError> {
        let name = n.wg_interface.as_str();
        let peers: Vec<_> = members.iter().map(|l| devices::peer_of(l)).collect();
        let identity = Identity {
            private_key,
            listen_port: n.listen_port,
        };
        let (changes, _) =
            devices::reconcile_wireguard(&self.backend, name, identity, seen, &peers)
                .await
                .map_err(wg_err(n))?;
        for addr in gateway_addresses(n) {
            self.netlink
                .add_address(name, addr)
                .await
                .map_err(link_err(n))?;
        }
        self.netlink
            .set_up(name, Some(n.mtu))
            .await
            .map_err(link_err(n))?;
        Ok(changes)
    }

    pub async fn add_peer(
        &self,
        n: &NetworkConfig,
        lease: &Lease,
    ) -> Result<(), NetworkPlaneError> {
        self.backend
            .set_peer(
                n.wg_interface.as_str(),
                &devices::peer_config(&devices::peer_of(lease)),
            )
            .await
            .map_err(wg_err(n))
    }

    pub async fn remove_peer(&self, n: &NetworkConfig, key: &Key) -> Result<(), NetworkPlaneError> {
        self.backend
            .remove_peer(n.wg_interface.as_str(), key)
            .await
            .map_err(wg_err(n))
    }

    /// Removes the networks' devices.
    pub async fn teardown(&self, networks: &[NetworkConfig]) -> Result<(), NetworkPlaneError> {
        for n in networks {
            let name = n.wg_interface.as_str();
            self.backend.delete(name).await.map_err(wg_err(n))?;
            self.netlink.delete_link(name).await.map_err(link_err(n))?;
        }
        Ok(())
    }
}
