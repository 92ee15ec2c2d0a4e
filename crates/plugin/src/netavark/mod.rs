//! The netavark plugin (podman 5): `wgexit create`, `setup NETNS`, `teardown NETNS` and
//! `info`, as netavark's plugin API (version [`API_VERSION`]) has them. A front end only:
//! `setup` and `teardown` make the CNI environment and network config of netavark's input
//! and run the plugin's ADD and DEL ([`crate::cni::logged`]), so state, leases, logs and
//! error messages are the CNI plugin's; `create` checks the options as ADD would.

pub mod options;
pub mod types;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cni::config::{invalid, NetConf};
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, Code};
use crate::cni::Outcome;
use options::name_options;
use types::{ErrorAnswer, NetAddress, NetInterface, Network, PluginExec, StatusBlock};

/// The plugin API version netavark 1.x and 2.x expect.
pub const API_VERSION: &str = "1.0.0";

/// `info`: the plugin's version and the API version it speaks.
pub fn info() -> Outcome {
    Outcome {
        stdout: json!({ "version": env!("CARGO_PKG_VERSION"), "api_version": API_VERSION })
            .to_string(),
        exit_code: 0,
    }
}

/// What a command prints: its answer as JSON (nothing for `None`), or netavark's error JSON,
/// whose message netavark shows the podman user.
pub fn answer<T: Serialize>(result: Result<Option<T>, CniError>) -> Outcome {
    let (stdout, exit_code) = match result {
        Ok(Some(v)) => match serde_json::to_string(&v) {
            Ok(s) => (s, 0),
            Err(e) => (error_json(&format!("cannot write the answer: {e}")), 1),
        },
        Ok(None) => (String::new(), 0),
        Err(e) => (error_json(&e.to_string()), 1),
    };
    Outcome { stdout, exit_code }
}

fn error_json(msg: &str) -> String {
    let answer = ErrorAnswer { error: msg.into() };
    serde_json::to_string(&answer).unwrap_or_else(|_| "{\"error\":\"wgexit failed\"}".into())
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, stdin: &[u8]) -> Result<T, CniError> {
    serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(Code::Decode, format!("{what} on stdin is not valid"))
            .with_details(e.to_string())
    })
}

/// The network's options as a checked CNI config, with its bytes (what ADD and DEL read).
fn net_conf(network: &Network) -> Result<(NetConf, Vec<u8>), CniError> {
    let options = network.options.clone().unwrap_or_default();
    let bytes = options::net_conf(&network.name, &options)?
        .to_string()
        .into_bytes();
    let conf = NetConf::parse(&bytes).map_err(name_options)?;
    Ok((conf, bytes))
}

/// `create`: checks the network's options (an error names the option) and that the token
/// and CA files can be read, and returns the network for podman to store: no subnets and no
/// IPAM (the exit node and the gateway lease the addresses), no aardvark-dns (a private
/// network's names are answered by its gateway's resolver, which `setup` reports).
pub fn create(stdin: &[u8]) -> Result<Option<Network>, CniError> {
    let mut network: Network = decode("the network", stdin)?;
    if network.subnets.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(CniError::new(
            Code::InvalidConfig,
            "subnets: wgexit leases each container's addresses from the exit node and the gateway; create the network without --subnet",
        ));
    }
    let (conf, _) = net_conf(&network)?;
    conf.token().map_err(name_options)?;
    std::fs::read(&conf.ca_file)
        .map_err(|e| {
            invalid(
                "caFile",
                format!("cannot read {}: {e}", conf.ca_file.display()),
            )
        })
        .map_err(name_options)?;
    network.dns_enabled = false;
    network.ipam_options = Some(BTreeMap::from([("driver".into(), "none".into())]));
    Ok(Some(network))
}

/// The CNI environment of a `setup` (ADD) or `teardown` (DEL) of `exec` in `netns`.
fn cni_env(command: &str, netns: &Path, exec: &PluginExec) -> Result<CniEnv, CniError> {
    let mut args = BTreeMap::new();
    for (option, value) in exec.network_options.options.iter().flatten() {
        let arg = match option.as_str() {
            "app" => "APP",
            "region" => "REGION",
            other => {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!("container option {other:?}: unknown; a container's wgexit options are app and region"),
                ))
            }
        };
        args.insert(arg.to_string(), value.clone());
    }
    Ok(CniEnv {
        command: command.to_string(),
        container_id: Some(exec.container_id.clone()),
        netns: Some(netns.to_path_buf()),
        ifname: Some(exec.network_options.interface_name.clone()),
        args,
    })
}

/// `setup NETNS`: ADD, and the status block of what it made.
pub async fn setup(netns: &Path, stdin: &[u8]) -> Result<Option<StatusBlock>, CniError> {
    let exec: PluginExec = decode("the container's network options", stdin)?;
    let opts = &exec.network_options;
    if opts.static_ips.as_ref().is_some_and(|ips| !ips.is_empty()) {
        return Err(CniError::new(
            Code::InvalidConfig,
            "static_ips: the exit node and the gateway lease the container's addresses; run it without --ip",
        ));
    }
    let (_, conf) = net_conf(&exec.network)?;
    let env = cni_env("ADD", netns, &exec)?;
    let result = crate::cni::logged(&env, &conf)
        .await
        .map_err(name_options)?;
    status_block(&opts.interface_name, result.as_ref()).map(Some)
}

/// `teardown NETNS`: DEL (idempotent: a container never set up, or gone, tears down too).
pub async fn teardown(netns: &Path, stdin: &[u8]) -> Result<(), CniError> {
    let exec: PluginExec = decode("the container's network options", stdin)?;
    let (_, conf) = net_conf(&exec.network)?;
    let env = cni_env("DEL", netns, &exec)?;
    crate::cni::logged(&env, &conf)
        .await
        .map(|_| ())
        .map_err(name_options)
}

/// The part of ADD's CNI result a status block shows.
#[derive(Deserialize)]
struct CniResult {
    interfaces: Vec<CniInterface>,
    #[serde(default)]
    ips: Vec<CniIp>,
    #[serde(default)]
    dns: CniDns,
}

#[derive(Deserialize)]
struct CniInterface {
    name: String,
    #[serde(default)]
    mac: Option<String>,
}

#[derive(Deserialize)]
struct CniIp {
    address: IpNet,
    interface: Option<usize>,
}

#[derive(Default, Deserialize)]
struct CniDns {
    #[serde(default)]
    nameservers: Vec<IpAddr>,
}

/// The status block of ADD's `result`: interface `ifname`, its MAC (the pseudo MAC ADD
/// reports, `report_mac`), its addresses, and the private network's resolver.
fn status_block(ifname: &str, result: Option<&Value>) -> Result<StatusBlock, CniError> {
    let unexpected = |why: String| CniError::new(Code::Decode, format!("ADD's result: {why}"));
    let result: CniResult = result
        .map(|v| serde_json::from_value(v.clone()))
        .ok_or_else(|| unexpected("missing".into()))?
        .map_err(|e| unexpected(e.to_string()))?;
    let index = result
        .interfaces
        .iter()
        .position(|i| i.name == ifname)
        .ok_or_else(|| unexpected(format!("no interface {ifname}")))?;
    let subnets = result
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(index))
        .map(|ip| NetAddress {
            gateway: None,
            ipnet: ip.address,
        })
        .collect();
    let interface = NetInterface {
        mac_address: result.interfaces[index].mac.clone().unwrap_or_default(),
        subnets: Some(subnets),
    };
    Ok(StatusBlock {
        dns_search_domains: Some(Vec::new()),
        dns_server_ips: Some(result.dns.nameservers),
        interfaces: Some(BTreeMap::from([(ifname.to_string(), interface)])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_block_shows_the_interface_its_addresses_and_resolver() {
        let result = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/c", "mac": "02:11:22:33:44:55", "mtu": 1420}],
            "ips": [{"address": "100.96.0.2/32", "interface": 0},
                    {"address": "fdaa:0:1:2::5/128", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["fdaa:0:1::3"]}
        });
        let block = status_block("eth0", Some(&result)).unwrap();
        let v = serde_json::to_value(&block).unwrap();
        assert_eq!(v["interfaces"]["eth0"]["mac_address"], "02:11:22:33:44:55");
        assert_eq!(
            v["interfaces"]["eth0"]["subnets"],
            json!([{"gateway": null, "ipnet": "100.96.0.2/32"},
                   {"gateway": null, "ipnet": "fdaa:0:1:2::5/128"}])
        );
        assert_eq!(v["dns_server_ips"], json!(["fdaa:0:1::3"]));
        assert!(status_block("eth1", Some(&result)).is_err());
    }

    #[test]
    fn create_refuses_subnets_and_names_a_bad_option() {
        let network = json!({"name": "wg", "id": "2f25", "driver": "wgexit",
            "created": "0001-01-01T00:00:00Z", "ipv6_enabled": false, "internal": false,
            "dns_enabled": true, "options": {"servers": "https://198.51.100.2:7443",
            "egress": "acme", "token_file": "/nonexistent/token", "ca_file": "/nonexistent/ca.pem"}});
        let e = create(network.to_string().as_bytes()).unwrap_err();
        assert!(e.msg.contains("option \"token_file\""), "{}", e.msg);
        let mut with_subnet = network.clone();
        with_subnet["subnets"] = json!([{"subnet": "10.0.0.0/24"}]);
        let e = create(with_subnet.to_string().as_bytes()).unwrap_err();
        assert!(e.msg.starts_with("subnets"), "{}", e.msg);
    }

    #[test]
    fn create_keeps_what_podman_wrote_and_sets_no_ipam_and_no_dns() {
        let dir = tempfile::tempdir().unwrap();
        let (token, ca) = (dir.path().join("token"), dir.path().join("ca.pem"));
        std::fs::write(&token, "t0k3n\n").unwrap();
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let network = json!({"name": "wg", "id": "2f25", "driver": "wgexit",
            "created": "2026-01-01T00:00:00Z", "labels": {"team": "a"}, "ipv6_enabled": false,
            "internal": false, "dns_enabled": true, "options": {"servers": "https://198.51.100.2:7443",
            "egress": "acme", "token_file": token, "ca_file": ca}});
        let out = answer(create(network.to_string().as_bytes()));
        assert_eq!(out.exit_code, 0, "{}", out.stdout);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["created"], network["created"]);
        assert_eq!(v["labels"], network["labels"]);
        assert_eq!(v["options"], network["options"]);
        assert_eq!(
            (
                v["dns_enabled"].clone(),
                v["ipam_options"]["driver"].clone()
            ),
            (json!(false), json!("none"))
        );
        let bad = answer(create(b"{\"name\": 1}"));
        assert_eq!(bad.exit_code, 1);
        let e: ErrorAnswer = serde_json::from_str(&bad.stdout).unwrap();
        assert!(e.error.contains("not valid"), "{}", e.error);
    }
}
