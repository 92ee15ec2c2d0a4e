//! The control API's wire types, shared by the plugin (client) and the daemon (server).
//!
//! Routes, all JSON, all under TLS, each with its request and answer, are listed in
//! `docs/exit-node.md` ("The control API"): leases under `/v1/egress/{egress}` ([`LeaseRequest`],
//! [`LeaseGrant`], [`LeaseList`], [`EgressInfo`]), members and peers under
//! `/v1/network/{network}` ([`MemberRequest`], [`PeerRequest`], [`MemberGrant`],
//! [`MemberList`], [`NetworkInfo`]), and `/healthz`.
//!
//! `/v1` routes need `Authorization: Bearer TOKEN` with a token of that egress or network.
//! `{public_key}` is the key in URL-safe base64 (standard base64, percent-encoded, works too).
//! Errors answer with an [`ApiError`] body.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::Key;

/// The error code of a 503 that says "the lease store (a pool's etcd) cannot take
/// writes right now; try again", which the plugin reports as CNI error 11.
pub const STORE_UNAVAILABLE: &str = "store_unavailable";

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
    /// The overlay IPv6 of a lease on an egress with `ip6` (absent otherwise, and in
    /// leases stored before egresses had IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// Unix seconds.
    pub created_at: u64,
    pub attachment: Attachment,
    /// Set for a member of a private network (see [`MemberInfo`]); absent for egress leases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<Box<MemberInfo>>,
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
    /// The static IP this lease's traffic leaves from (one of the egress's IPs).
    pub egress_ip: IpAddr,
    /// Keepalive the client should use, seconds.
    pub persistent_keepalive: u16,
    /// On an egress with `ip6`: the leased overlay IPv6 as a /128 ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<IpNet>,
    /// ... the exit node's own overlay IPv6 ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<IpAddr>,
    /// ... and the static IPv6 this lease's traffic leaves from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ip6: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseList {
    pub leases: Vec<Lease>,
}

/// `GET /v1/egress/{egress}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressInfo {
    pub name: String,
    /// The egress's first static IP (all of them are in `ips`).
    pub egress_ip: IpAddr,
    pub endpoint: SocketAddr,
    pub server_public_key: Key,
    pub pool: IpNet,
    pub leases: usize,
    pub capacity: usize,
    /// Every static egress IP with how many leases leave from it.
    #[serde(default)]
    pub ips: Vec<EgressIpInfo>,
    /// The overlay IPv6 pool, on an egress with `ip6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool6: Option<IpNet>,
    /// Every static egress IPv6 with how many leases leave from it (empty without `ip6`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips6: Vec<EgressIpInfo>,
}

/// One static egress IP of an egress and its live leases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressIpInfo {
    pub ip: IpAddr,
    pub leases: usize,
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

/// What kind of member of a private network a lease is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberKind {
    /// A container, attached by the plugin; collected when idle like an egress lease.
    Container,
    /// A laptop or other peer joined with `wgexit peer create`; never collected.
    Peer,
}

/// What a private network's DNS knows of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub network: String,
    pub kind: MemberKind,
    /// The container's app (`<app>.internal`); empty for peers.
    #[serde(default)]
    pub app: String,
    /// The container's region (`<region>.<app>.internal`); empty for peers.
    #[serde(default)]
    pub region: String,
    /// The peer's name (`<name>._peer.internal`); empty for containers.
    #[serde(default)]
    pub name: String,
}

/// DNS labels (apps, regions, peer names): 1-63 of letters, digits and '-', not starting or
/// ending with '-'.
pub fn valid_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `POST /v1/network/{network}/members`: a container joins. Idempotent per public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRequest {
    pub public_key: Key,
    #[serde(default)]
    pub attachment: Attachment,
    pub app: String,
    #[serde(default)]
    pub region: String,
}

impl MemberRequest {
    pub fn validate(&self) -> Result<(), String> {
        self.attachment.validate()?;
        if self.public_key.is_zero() {
            return Err("public_key must not be all zeros".into());
        }
        if !valid_dns_label(&self.app) {
            return Err(format!(
                "app {:?} must be a DNS label: 1-63 letters, digits or '-'",
                self.app
            ));
        }
        if !self.region.is_empty() && !valid_dns_label(&self.region) {
            return Err(format!(
                "region {:?} must be a DNS label: 1-63 letters, digits or '-'",
                self.region
            ));
        }
        Ok(())
    }
}

/// `POST /v1/network/{network}/peers`: a laptop joins. Idempotent per public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRequest {
    pub public_key: Key,
    pub name: String,
}

impl PeerRequest {
    pub fn validate(&self) -> Result<(), String> {
        if self.public_key.is_zero() {
            return Err("public_key must not be all zeros".into());
        }
        if !valid_dns_label(&self.name) {
            return Err(format!(
                "peer name {:?} must be a DNS label: 1-63 letters, digits or '-'",
                self.name
            ));
        }
        Ok(())
    }
}

/// A member of a private network as the gateway lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub network: String,
    pub kind: MemberKind,
    pub public_key: Key,
    pub address: IpAddr,
    /// Unix seconds.
    pub created_at: u64,
    #[serde(default)]
    pub app: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub attachment: Attachment,
}

/// Everything a member needs to reach its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberGrant {
    pub member: Member,
    /// The member's address as a host network (/128).
    pub address: IpNet,
    /// The network's prefix: what to route to the gateway.
    pub prefix: IpNet,
    /// The gateway's WireGuard public key for this network.
    pub server_public_key: Key,
    pub endpoint: SocketAddr,
    /// The gateway's own address in the network (`<prefix>::1`).
    pub gateway: IpAddr,
    /// The network's resolver (`<prefix>::3`).
    pub dns: IpAddr,
    pub persistent_keepalive: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberList {
    pub members: Vec<Member>,
}

/// `GET /v1/network/{network}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub prefix: IpNet,
    pub endpoint: SocketAddr,
    pub server_public_key: Key,
    pub gateway: IpAddr,
    pub dns: IpAddr,
    /// Containers and peers.
    pub members: usize,
    pub peers: usize,
}

pub fn network_path(network: &str) -> String {
    format!("/v1/network/{network}")
}

pub fn members_path(network: &str) -> String {
    format!("/v1/network/{network}/members")
}

pub fn member_path(network: &str, key: &Key) -> String {
    format!("/v1/network/{network}/members/{}", key.to_base64_url())
}

pub fn peers_path(network: &str) -> String {
    format!("/v1/network/{network}/peers")
}

pub fn peer_path(network: &str, key: &Key) -> String {
    format!("/v1/network/{network}/peers/{}", key.to_base64_url())
}
