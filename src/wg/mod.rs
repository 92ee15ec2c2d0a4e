//! WireGuard devices behind one trait, with two backends:
//! [`kernel`] (rtnetlink + the WireGuard generic-netlink family) and
//! [`userspace`] (`wireguard-go`, configured over its UAPI socket in `/var/run/wireguard/`).
//!
//! A backend value talks to the network namespace it was opened in: create it in the
//! namespace that should own the device (for the plugin: the host namespace, so the UDP
//! socket stays there).

use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::Key;

pub mod kernel;
pub mod uapi;
pub mod userspace;

/// Which implementation to use, as written in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Kernel when the module is available, else userspace.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

/// A peer as it should be configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; `None` leaves keepalive off.
    pub persistent_keepalive: Option<u16>,
}

/// The device-wide settings plus an initial peer set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: Key,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerConfig>,
}

/// A peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub public_key: Option<Key>,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("backend \"kernel\" was asked for but this kernel has no WireGuard module ({0}); install it or use backend = \"userspace\" with wireguard-go")]
    KernelModuleMissing(String),
    #[error("backend \"userspace\" needs `wireguard-go` on PATH ({0}); install the wireguard-go package")]
    WireguardGoMissing(String),
    #[error("wireguard-go for {name} did not start: {detail}")]
    WireguardGoFailed { name: String, detail: String },
    #[error("WireGuard device {0} does not exist")]
    NoSuchDevice(String),
    #[error("WireGuard device {name}: UAPI error: {detail}")]
    Uapi { name: String, detail: String },
    #[error("WireGuard device {name}: netlink error: {detail}")]
    Netlink { name: String, detail: String },
    #[error("WireGuard device {name}: {source}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Operations on WireGuard devices in one network namespace.
///
/// Peer changes are incremental (`set_peer` / `remove_peer`): an exit node with 60k peers
/// never rewrites its whole peer set to add one.
#[allow(async_fn_in_trait)]
pub trait WireGuard {
    /// Creates device `name` (not yet up). Fails if it exists.
    async fn create(&self, name: &str) -> Result<(), WgError>;
    /// Sets private key and listen port, and replaces the peer set with `config.peers`.
    async fn configure(&self, name: &str, config: &DeviceConfig) -> Result<(), WgError>;
    /// Adds a peer, or updates it if its key is already there.
    async fn set_peer(&self, name: &str, peer: &PeerConfig) -> Result<(), WgError>;
    /// Removes a peer; not an error if it is not there.
    async fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), WgError>;
    async fn status(&self, name: &str) -> Result<DeviceStatus, WgError>;
    /// Whether device `name` can be configured through this backend.
    async fn exists(&self, name: &str) -> bool;
    /// Deletes the device and anything serving it; not an error if it is gone.
    async fn delete(&self, name: &str) -> Result<(), WgError>;
}
