//! The attachment's membership of a private network (`network` in the config): what is
//! asked of the gateway, what is recorded of its answer, the gateway as a WireGuard peer,
//! and leaving again. The same link and key pair carry the egress lease, when there is one.

use std::net::{IpAddr, SocketAddr};

use ipnet::{IpNet, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, Code};
use crate::cni::state::AttachmentState;
use wgexit::api::{valid_dns_label, Attachment, MemberGrant, MemberRequest};
use wgexit::client::Client;
use wgexit::keys::Key;
use wgexit::wg::PeerConfig;

/// What ADD recorded of the network lease (in the attachment's state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberState {
    pub network: String,
    /// Set once the gateway granted the lease: the server that did.
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub address: Option<IpNet>,
    #[serde(default)]
    pub prefix: Option<Ipv6Net>,
    #[serde(default)]
    pub gateway_public_key: Option<Key>,
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    #[serde(default)]
    pub dns: Option<IpAddr>,
}

impl MemberState {
    pub fn new(network: &str) -> MemberState {
        MemberState {
            network: network.to_string(),
            server: None,
            address: None,
            prefix: None,
            gateway_public_key: None,
            endpoint: None,
            dns: None,
        }
    }

    /// Records a granted lease (before anything else can fail, so an undo releases it).
    pub fn granted(&mut self, server: &str, grant: &MemberGrant) {
        self.server = Some(server.to_string());
        self.address = Some(grant.address);
        self.prefix = match grant.prefix {
            IpNet::V6(p) => Some(p),
            IpNet::V4(_) => None,
        };
        self.gateway_public_key = Some(grant.server_public_key);
        self.endpoint = Some(grant.endpoint);
        self.dns = Some(grant.dns);
    }
}

/// `key` from CNI_ARGS, else from runtime `args` (any section, e.g. `args.cni.APP`), else
/// `fallback`.
fn arg(env: &CniEnv, conf: &NetConf, key: &str, fallback: Option<&String>) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    env.args
        .get(key)
        .cloned()
        .or_else(|| {
            conf.args().into_iter().find_map(|(k, v)| {
                let name = k.rsplit('.').next().unwrap_or(&k).to_string();
                (name == key || name == lower).then_some(v)
            })
        })
        .or_else(|| fallback.cloned())
        .filter(|v| !v.is_empty())
}

/// The container's app and region: CNI_ARGS `APP`/`REGION`, runtime `args`, then the
/// config's `app`/`region`. An app is needed (it is the container's DNS name).
pub fn app_and_region(env: &CniEnv, conf: &NetConf) -> Result<(String, String), CniError> {
    let app = arg(env, conf, "APP", conf.app.as_ref()).ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "a network member needs an app (its name in DNS): set CNI_ARGS APP=…, args.cni.APP, or the config key \"app\"",
        )
    })?;
    let region = arg(env, conf, "REGION", conf.region.as_ref()).unwrap_or_default();
    for (what, v) in [("APP", &app), ("REGION", &region)] {
        if !v.is_empty() && !valid_dns_label(v) {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("{what} {v:?} must be a DNS label: 1-63 letters, digits or '-'"),
            ));
        }
    }
    Ok((app, region))
}

/// What the gateway is asked for: an address in the network for this key, with the app,
/// region and what the runtime told us about the container.
pub fn request(
    attachment: &Attachment,
    public_key: Key,
    app_region: (String, String),
) -> MemberRequest {
    MemberRequest {
        public_key,
        attachment: attachment.clone(),
        app: app_region.0,
        region: app_region.1,
    }
}

/// The gateway as the container's WireGuard peer: the network's prefix goes to it.
pub fn gateway_peer(grant: &MemberGrant) -> PeerConfig {
    PeerConfig {
        public_key: grant.server_public_key,
        endpoint: Some(grant.endpoint),
        allowed_ips: vec![grant.prefix],
        persistent_keepalive: Some(grant.persistent_keepalive),
    }
}

/// Leaves the network, when a lease was granted; `Err` says why it could not be released.
pub fn release(state: &AttachmentState, client: Option<&Client>) -> Result<(), String> {
    let Some(member) = &state.member else {
        return Ok(());
    };
    let Some(server) = &member.server else {
        return Ok(());
    };
    match client {
        Some(c) => c
            .release_member(server, &member.network, &state.public_key)
            .map_err(|e| e.to_string()),
        None => Err("tokenFile or caFile unusable".into()),
    }
}

/// Whether `conf`'s token may release what `state` holds: its egress is `conf`'s (or it has
/// none), and so is its network.
pub fn credentials_fit(state: &AttachmentState, conf: &NetConf) -> bool {
    let egress_fits = state.server.is_none() || conf.egress.as_deref() == Some(&state.egress);
    let network_fits = state
        .member
        .as_ref()
        .is_none_or(|m| conf.network.as_deref() == Some(&m.network));
    egress_fits && network_fits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        let text = format!(
            r#"{{ "cniVersion": "1.0.0", "name": "n", "type": "wgexit",
              "servers": ["https://198.51.100.2:7443"], "network": "acme",
              "tokenFile": "/t", "caFile": "/c" {extra} }}"#
        );
        NetConf::parse(text.as_bytes()).unwrap()
    }

    fn env(args: &str) -> CniEnv {
        let args = args.to_string();
        CniEnv::from_lookup(move |k| (k == "CNI_ARGS").then(|| args.clone()))
    }

    #[test]
    fn app_and_region_come_from_cni_args_then_runtime_args_then_config() {
        let c = conf(r#", "app": "cfg", "region": "fra", "args": {"cni": {"APP": "rt"}}"#);
        assert_eq!(
            app_and_region(&env("APP=web;REGION=ams"), &c).unwrap(),
            ("web".into(), "ams".into())
        );
        assert_eq!(
            app_and_region(&env(""), &c).unwrap(),
            ("rt".into(), "fra".into())
        );
        let c = conf(r#", "app": "cfg""#);
        assert_eq!(
            app_and_region(&env(""), &c).unwrap(),
            ("cfg".into(), "".into())
        );
        let e = app_and_region(&env(""), &conf("")).unwrap_err();
        assert!(e.msg.contains("APP"), "{}", e.msg);
        let e = app_and_region(&env("APP=no_way"), &conf("")).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
    }
}
