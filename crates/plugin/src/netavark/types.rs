//! The JSON netavark's plugin API exchanges, matched field for field to netavark 2.1's
//! `network::types` (`Network`, `NetworkPluginExec`, `PerNetworkOptions`, `StatusBlock`,
//! `NetInterface`, `NetAddress`) and its `{"error": …}` answer. The `netavark` crate itself is
//! not used: it brings netavark's whole dependency tree (gRPC, D-Bus, nftables) into a
//! one-shot plugin; docs/podman5.md has the numbers.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A podman network, as `create` gets and returns it and as `setup` and `teardown` get it in
/// [`PluginExec::network`]. The fields wgexit reads or sets are typed; the rest (`created`,
/// `labels`, `routes`, …) is kept as podman wrote it, since `create` hands the network back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub id: String,
    pub driver: String,
    #[serde(default)]
    pub dns_enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam_options: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnets: Option<Vec<Value>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// What `setup` and `teardown` get on stdin (netavark's `NetworkPluginExec`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PluginExec {
    pub container_id: String,
    pub container_name: String,
    pub network: Network,
    pub network_options: PerNetworkOptions,
}

/// The container's options for this network (netavark's `PerNetworkOptions`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PerNetworkOptions {
    pub interface_name: String,
    #[serde(default)]
    pub static_ips: Option<Vec<IpAddr>>,
    #[serde(default)]
    pub static_mac: Option<String>,
    /// Driver-specific options of this container: wgexit reads `app` and `region`.
    #[serde(default)]
    pub options: Option<BTreeMap<String, String>>,
}

/// What `setup` prints: the interface made in the container and its addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusBlock {
    pub dns_search_domains: Option<Vec<String>>,
    pub dns_server_ips: Option<Vec<IpAddr>>,
    pub interfaces: Option<BTreeMap<String, NetInterface>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetInterface {
    pub mac_address: String,
    pub subnets: Option<Vec<NetAddress>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetAddress {
    pub gateway: Option<IpAddr>,
    pub ipnet: IpNet,
}

/// A failed command's answer; netavark shows `error` to the podman user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
}
