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
pub mod network_rules;
pub mod sysctl;

use crate::api::Lease;
use crate::exit::config::EgressConfig;
use crate::keys::Key;
use crate::net::{LinkError, Netlink};
use crate::wg::{Backend, BackendKind, DeviceStatus, WgError, WireGuard};

pub use devices::Changes;
use firewall::{EgressRules, Firewall, NatError, DEFAULT_TABLE};
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
    Firewall(#[from] NatError),
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

/// What the lease service needs from a data path.
#[allow(async_fn_in_trait)]
pub trait Dataplane: Send + Sync {
    /// `egress`'s device as it is: `None` when there is no working device. Called without
    /// the registry locked, since a device with many peers takes a while to read.
    async fn device(&self, egress: &EgressConfig) -> Result<Option<DeviceStatus>, DataplaneError>;
    /// Brings `egress`'s device to its identity, its port, exactly the peers of `leases`, its
    /// overlay address, MTU and up. `seen` is what [`Dataplane::device`] returned a moment
    /// ago; it may lag `leases` a little, which only costs an idempotent peer change.
    async fn reconcile_device(
        &self,
        egress: &EgressConfig,
        identity: &Key,
        seen: Option<DeviceStatus>,
        leases: &[&Lease],
    ) -> Result<Changes, DataplaneError>;
    /// Adds (or updates) the peer of `lease`.
    async fn add_peer(&self, egress: &EgressConfig, lease: &Lease) -> Result<(), DataplaneError>;
    /// Removes the peer of `key`; not an error if it is not there.
    async fn remove_peer(&self, egress: &EgressConfig, key: &Key) -> Result<(), DataplaneError>;
    /// Forwarding and firewall rules for `egresses`, the rules in place before forwarding.
    async fn apply_rules(&self, egresses: &[EgressConfig]) -> Result<(), DataplaneError>;
    /// Removes the devices and the rules of `egresses`.
    async fn teardown(&self, egresses: &[EgressConfig]) -> Result<(), DataplaneError>;
}

/// The data path in this process's network namespace.
pub struct HostDataplane {
    backend: Backend,
    netlink: Netlink,
    firewall: Firewall,
}

impl HostDataplane {
    /// Opens the WireGuard backend of `kind` and netlink in the current namespace (inside a
    /// tokio runtime).
    pub fn open(kind: BackendKind) -> Result<HostDataplane, DataplaneError> {
        Ok(HostDataplane {
            backend: Backend::open(kind)?,
            netlink: Netlink::current()?,
            firewall: Firewall::new(DEFAULT_TABLE),
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}

/// What the firewall needs of an egress.
pub fn rules_for(e: &EgressConfig) -> EgressRules {
    EgressRules {
        name: e.name.clone(),
        wg_interface: e.wg_interface.to_string(),
        uplink: e.interface.to_string(),
        pool: e.pool,
        overlay_ip: e.overlay_ip(),
        egress_ip: e.ip,
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
        leases: &[&Lease],
    ) -> Result<Changes, DataplaneError> {
        let peers: Vec<_> = leases.iter().map(|l| devices::peer_of(l)).collect();
        devices::reconcile_device(&self.backend, &self.netlink, egress, identity, seen, &peers)
            .await
    }

    async fn add_peer(&self, egress: &EgressConfig, lease: &Lease) -> Result<(), DataplaneError> {
        self.backend
            .set_peer(&egress.wg_interface, &devices::peer_of(lease))
            .await
            .map_err(DataplaneError::wg(egress))
    }

    async fn remove_peer(&self, egress: &EgressConfig, key: &Key) -> Result<(), DataplaneError> {
        self.backend
            .remove_peer(&egress.wg_interface, key)
            .await
            .map_err(DataplaneError::wg(egress))
    }

    async fn apply_rules(&self, egresses: &[EgressConfig]) -> Result<(), DataplaneError> {
        let rules: Vec<_> = egresses.iter().map(rules_for).collect();
        self.firewall.apply(&rules)?;
        for e in egresses {
            sysctl::loose_rp_filter(&e.wg_interface)?;
        }
        sysctl::forward()?;
        Ok(())
    }

    async fn teardown(&self, egresses: &[EgressConfig]) -> Result<(), DataplaneError> {
        self.firewall.teardown()?;
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
