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
use crate::net::IfName;

pub mod kernel;
pub mod uapi;
pub mod userspace;

#[cfg(test)]
mod tests;

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
    /// The mark on the device's UDP packets; 0 when none.
    pub fwmark: u32,
    pub peers: Vec<PeerStatus>,
}

/// A failed link operation on device `name`, as a [`WgError`].
pub(crate) fn link_err(name: &str) -> impl FnOnce(crate::net::LinkError) -> WgError + '_ {
    move |e| match e {
        crate::net::LinkError::NoRuntime => WgError::NoRuntime,
        e => WgError::Netlink {
            name: name.to_string(),
            detail: e.to_string(),
        },
    }
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
    #[error("WireGuard device {0} already exists")]
    AlreadyExists(String),
    #[error("{0:?} is not a valid interface name (1 to 15 bytes; not \".\" or \"..\"; no '/', ':' or whitespace)")]
    InvalidName(String),
    #[error("WireGuard backends must be opened inside a tokio runtime")]
    NoRuntime,
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
    /// Adds peers, or updates those whose key is already there, in one request where the
    /// backend allows; the other peers are left alone.
    async fn set_peers(&self, name: &str, peers: &[PeerConfig]) -> Result<(), WgError>;
    /// Adds a peer, or updates it if its key is already there.
    async fn set_peer(&self, name: &str, peer: &PeerConfig) -> Result<(), WgError> {
        self.set_peers(name, std::slice::from_ref(peer)).await
    }
    /// Removes a peer; not an error if it is not there.
    async fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), WgError>;
    /// Adds `peer` again as a new peer (removed, then set), so that it starts a handshake
    /// at once where its keepalive is on: WireGuard sends a peer at most one handshake
    /// initiation per `REKEY_TIMEOUT` (5 s), and a new peer has sent none.
    async fn initiate_again(&self, name: &str, peer: &PeerConfig) -> Result<(), WgError> {
        self.remove_peer(name, &peer.public_key).await?;
        self.set_peer(name, peer).await
    }
    async fn status(&self, name: &str) -> Result<DeviceStatus, WgError>;
    /// Whether device `name` can be configured through this backend.
    async fn exists(&self, name: &str) -> bool;
    /// Deletes the device and anything serving it; not an error if it is gone.
    async fn delete(&self, name: &str) -> Result<(), WgError>;
}

/// Checks that `name` is an interface name the kernel accepts (see [`IfName`]); such a
/// name is also safe as a file name under `/var/run/wireguard/`.
pub fn validate_name(name: &str) -> Result<(), WgError> {
    IfName::new(name)
        .map(|_| ())
        .map_err(|e| WgError::InvalidName(e.0))
}

/// An opened backend of either kind.
///
/// Open it with [`Backend::open`] on a thread that is in the network namespace that should
/// own the devices, inside a tokio runtime; afterwards it may be used from any thread.
pub enum Backend {
    Kernel(kernel::KernelBackend),
    Userspace(userspace::UserspaceBackend),
}

impl Backend {
    /// Opens a backend of `kind` in the current thread's network namespace.
    ///
    /// `Auto` resolves to `Kernel` when the WireGuard module is loaded (`/sys/module/wireguard`)
    /// or can be loaded (the kernel's own module autoload, triggered by looking up the
    /// "wireguard" generic-netlink family, then `modprobe -q wireguard` if present),
    /// else to `Userspace`. `Kernel` without the module fails with
    /// [`WgError::KernelModuleMissing`]; `Userspace` without `wireguard-go` fails with
    /// [`WgError::WireguardGoMissing`].
    pub fn open(kind: BackendKind) -> Result<Backend, WgError> {
        match kind {
            BackendKind::Kernel => {
                kernel::ensure_module().map_err(WgError::KernelModuleMissing)?;
                Ok(Backend::Kernel(kernel::KernelBackend::open()?))
            }
            BackendKind::Userspace => Ok(Backend::Userspace(userspace::UserspaceBackend::open()?)),
            BackendKind::Auto => match kernel::ensure_module() {
                Ok(()) => Ok(Backend::Kernel(kernel::KernelBackend::open()?)),
                Err(why) => {
                    tracing::debug!(
                        "WireGuard kernel module unavailable ({why}); using wireguard-go"
                    );
                    Ok(Backend::Userspace(userspace::UserspaceBackend::open()?))
                }
            },
        }
    }

    /// The kind this backend resolved to: `Kernel` or `Userspace`, never `Auto`.
    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Kernel(_) => BackendKind::Kernel,
            Backend::Userspace(_) => BackendKind::Userspace,
        }
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Kernel(_) => f.write_str("Backend::Kernel"),
            Backend::Userspace(u) => write!(f, "Backend::Userspace({})", u.binary().display()),
        }
    }
}

/// Calls the same method on whichever backend this is.
macro_rules! on_backend {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            Backend::Kernel($b) => $call,
            Backend::Userspace($b) => $call,
        }
    };
}

impl WireGuard for Backend {
    async fn create(&self, name: &str) -> Result<(), WgError> {
        on_backend!(self, b => b.create(name).await)
    }

    async fn configure(&self, name: &str, config: &DeviceConfig) -> Result<(), WgError> {
        on_backend!(self, b => b.configure(name, config).await)
    }

    async fn set_peers(&self, name: &str, peers: &[PeerConfig]) -> Result<(), WgError> {
        on_backend!(self, b => b.set_peers(name, peers).await)
    }

    async fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), WgError> {
        on_backend!(self, b => b.remove_peer(name, public_key).await)
    }

    async fn status(&self, name: &str) -> Result<DeviceStatus, WgError> {
        on_backend!(self, b => b.status(name).await)
    }

    async fn exists(&self, name: &str) -> bool {
        on_backend!(self, b => b.exists(name).await)
    }

    async fn delete(&self, name: &str) -> Result<(), WgError> {
        on_backend!(self, b => b.delete(name).await)
    }
}
