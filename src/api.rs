//! The control API's wire types, shared by the plugin (client) and the daemon (server).
//!
//! Routes, all JSON, all under TLS:
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | `POST` | `/v1/egress/{egress}/leases` | [`LeaseRequest`] | 200 [`LeaseGrant`] |
//! | `GET` | `/v1/egress/{egress}/leases` | | 200 [`LeaseList`] |
//! | `DELETE` | `/v1/egress/{egress}/leases/{public_key}` | | 204 |
//! | `GET` | `/v1/egress/{egress}` | | 200 [`EgressInfo`] |
//! | `GET` | `/healthz` | | 200 `ok` |
//!
//! `/v1` routes need `Authorization: Bearer TOKEN` with a token of that egress.
//! `{public_key}` is the key in URL-safe base64 (standard base64, percent-encoded, works too).
//! Errors answer with an [`ApiError`] body.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::Key;

/// Largest request body the server reads.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the runtime told the plugin about the container a lease is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
    /// The container host's name.
    #[serde(default)]
    pub host: String,
    /// CNI args (`CNI_ARGS` and `args`), e.g. a pod or app name.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
}

impl Attachment {
    /// Bounds that keep a stored lease small whatever a client sends.
    pub fn validate(&self) -> Result<(), String> {
        const MAX_FIELD: usize = 256;
        const MAX_ARGS: usize = 32;
        for (name, v) in [
            ("container_id", &self.container_id),
            ("ifname", &self.ifname),
            ("host", &self.host),
        ] {
            if v.len() > MAX_FIELD {
                return Err(format!(
                    "attachment.{name} is longer than {MAX_FIELD} bytes"
                ));
            }
        }
        if self.args.len() > MAX_ARGS {
            return Err(format!("attachment.args has more than {MAX_ARGS} entries"));
        }
        if self
            .args
            .iter()
            .any(|(k, v)| k.len() > MAX_FIELD || v.len() > MAX_FIELD)
        {
            return Err(format!(
                "attachment.args keys and values must be at most {MAX_FIELD} bytes"
            ));
        }
        Ok(())
    }
}

/// `POST /v1/egress/{egress}/leases`. Idempotent per public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub public_key: Key,
    #[serde(default)]
    pub attachment: Attachment,
}

impl LeaseRequest {
    /// What the server checks before leasing: bounded attachment, a usable key.
    pub fn validate(&self) -> Result<(), String> {
        self.attachment.validate()?;
        if self.public_key.is_zero() {
            return Err("public_key must not be all zeros".into());
        }
        Ok(())
    }
}

/// A lease as the server keeps and lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub egress: String,
    pub public_key: Key,
    pub address: IpAddr,
    /// Unix seconds.
    pub created_at: u64,
    pub attachment: Attachment,
}

/// Everything a client needs to bring its tunnel up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub lease: Lease,
    /// The leased overlay address as a host network (/32 or /128).
    pub address: IpNet,
    /// The exit node's WireGuard public key for this egress.
    pub server_public_key: Key,
    /// Where to send WireGuard UDP.
    pub endpoint: SocketAddr,
    /// The exit node's own overlay address.
    pub gateway: IpAddr,
    /// The static IP traffic leaves from.
    pub egress_ip: IpAddr,
    /// Keepalive the client should use, seconds.
    pub persistent_keepalive: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseList {
    pub leases: Vec<Lease>,
}

/// `GET /v1/egress/{egress}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressInfo {
    pub name: String,
    pub egress_ip: IpAddr,
    pub endpoint: SocketAddr,
    pub server_public_key: Key,
    pub pool: IpNet,
    pub leases: usize,
    pub capacity: usize,
}

/// Every error answer's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable machine-readable code, e.g. `unauthorized`, `pool_exhausted`.
    pub error: String,
    /// What happened and what to do, for a person.
    pub message: String,
}

pub fn leases_path(egress: &str) -> String {
    format!("/v1/egress/{egress}/leases")
}

pub fn lease_path(egress: &str, key: &Key) -> String {
    format!("/v1/egress/{egress}/leases/{}", key.to_base64_url())
}

pub fn egress_path(egress: &str) -> String {
    format!("/v1/egress/{egress}")
}

/// Egress names appear in URL paths and nftables comments: keep them plain.
pub fn valid_egress_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}
