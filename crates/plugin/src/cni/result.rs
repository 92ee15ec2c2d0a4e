//! The ADD result, in the shape of the version asked for, merged into a `prevResult` when
//! wgexit is not the first plugin of a chain.

use std::path::PathBuf;

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};

use crate::cni::config::at_least;
use wgexit::keys::Key;

/// What ADD made, independent of the spec version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub ifname: String,
    pub sandbox: PathBuf,
    pub mac: Option<String>,
    pub mtu: u32,
    /// The egress lease's address and the network lease's, as leased.
    pub addresses: Vec<IpNet>,
    pub routes: Vec<IpNet>,
    /// The private network's resolver, when there is one.
    pub nameservers: Vec<IpAddr>,
}

/// A stable, locally administered unicast MAC derived from a WireGuard public key. A
/// WireGuard link has no hardware address; this exists for runtimes that refuse an interface
/// without one (podman 4.3). It is reported unless `reportMac` is false, never set on the
/// link.
pub fn pseudo_mac(key: &Key) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(key.0);
    let mut b = [0u8; 6];
    b.copy_from_slice(&h[..6]);
    b[0] = (b[0] & 0xfc) | 0x02;
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Attached {
    /// The result JSON for `cni_version`: 0.4.0 adds `"version": "4"` to each IP, 1.1.0 adds
    /// the interface's `mtu`. With `prev` (the chain's `prevResult`, already in `cni_version`),
    /// our interface, address and routes are appended to it and the rest passed on unchanged.
    pub fn to_result(&self, cni_version: &str, prev: Option<&Value>) -> Value {
        let mut iface = json!({
            "name": self.ifname,
            "sandbox": self.sandbox.display().to_string(),
        });
        if let Some(mac) = &self.mac {
            iface["mac"] = json!(mac);
        }
        if at_least(cni_version, "1.1.0") {
            iface["mtu"] = json!(self.mtu);
        }
        let mut result: Map<String, Value> =
            prev.and_then(Value::as_object).cloned().unwrap_or_default();
        let list = |result: &mut Map<String, Value>, key: &str| -> Vec<Value> {
            match result.remove(key) {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            }
        };
        let mut interfaces = list(&mut result, "interfaces");
        let mut ips = list(&mut result, "ips");
        let mut routes = list(&mut result, "routes");
        let index = interfaces.len();
        interfaces.push(iface);
        for address in &self.addresses {
            let mut ip = json!({ "address": address.to_string(), "interface": index });
            if !at_least(cni_version, "1.0.0") {
                ip["version"] = json!(if address.addr().is_ipv4() { "4" } else { "6" });
            }
            ips.push(ip);
        }
        routes.extend(self.routes.iter().map(|r| json!({ "dst": r.to_string() })));
        result.insert("cniVersion".into(), json!(cni_version));
        result.insert("interfaces".into(), Value::Array(interfaces));
        result.insert("ips".into(), Value::Array(ips));
        result.insert("routes".into(), Value::Array(routes));
        let dns = result.entry("dns").or_insert_with(|| json!({}));
        if !self.nameservers.is_empty() {
            if !dns.is_object() {
                *dns = json!({});
            }
            let mut servers = dns["nameservers"].as_array().cloned().unwrap_or_default();
            servers.extend(self.nameservers.iter().map(|n| json!(n.to_string())));
            dns["nameservers"] = Value::Array(servers);
        }
        Value::Object(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached() -> Attached {
        Attached {
            ifname: "eth0".into(),
            sandbox: "/var/run/netns/c1".into(),
            mac: None,
            mtu: 1420,
            addresses: vec!["100.96.0.2/32".parse().unwrap()],
            routes: vec!["0.0.0.0/0".parse().unwrap()],
            nameservers: Vec::new(),
        }
    }

    #[test]
    fn a_network_member_adds_its_address_route_and_resolver() {
        let mut a = attached();
        a.addresses.push("fdaa:0:1:2::5/128".parse().unwrap());
        a.routes.push("fdaa:0:1::/48".parse().unwrap());
        a.nameservers.push("fdaa:0:1::3".parse().unwrap());
        let r = a.to_result("0.4.0", None);
        assert_eq!(r["ips"][1]["address"], "fdaa:0:1:2::5/128");
        assert_eq!(r["ips"][1]["version"], "6");
        assert_eq!(r["ips"][1]["interface"], 0);
        assert_eq!(r["routes"][1]["dst"], "fdaa:0:1::/48");
        assert_eq!(r["dns"]["nameservers"][0], "fdaa:0:1::3");
        let prev = json!({"cniVersion": "0.4.0", "dns": {"nameservers": ["10.1.0.1"]}});
        let r = a.to_result("0.4.0", Some(&prev));
        assert_eq!(r["dns"]["nameservers"], json!(["10.1.0.1", "fdaa:0:1::3"]));
    }

    #[test]
    fn result_1_0_0() {
        let r = attached().to_result("1.0.0", None);
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][0]["name"], "eth0");
        assert_eq!(r["interfaces"][0]["sandbox"], "/var/run/netns/c1");
        assert!(r["interfaces"][0].get("mac").is_none());
        assert!(r["interfaces"][0].get("mtu").is_none());
        assert_eq!(r["ips"][0]["address"], "100.96.0.2/32");
        assert_eq!(r["ips"][0]["interface"], 0);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    }

    #[test]
    fn result_0_4_0_has_ip_versions_and_1_1_0_mtu() {
        assert_eq!(
            attached().to_result("0.4.0", None)["ips"][0]["version"],
            "4"
        );
        assert_eq!(
            attached().to_result("1.1.0", None)["interfaces"][0]["mtu"],
            1420
        );
    }

    #[test]
    fn appends_to_a_previous_result() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1"}, {"name": "net1", "sandbox": "/var/run/netns/c1", "mac": "aa:bb:cc:dd:ee:ff"}],
            "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1}],
            "routes": [{"dst": "10.9.0.0/16", "gw": "10.1.0.1"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        });
        let r = attached().to_result("1.0.0", Some(&prev));
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(r["interfaces"][1], prev["interfaces"][1]);
        assert_eq!(r["interfaces"][2]["name"], "eth0");
        assert_eq!(r["ips"][0], prev["ips"][0]);
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["routes"][0], prev["routes"][0]);
        assert_eq!(r["routes"][1]["dst"], "0.0.0.0/0");
        assert_eq!(r["dns"], prev["dns"]);
    }

    #[test]
    fn pseudo_mac_is_stable_local_unicast() {
        let k = Key([7; 32]);
        let mac = pseudo_mac(&k);
        assert_eq!(mac, pseudo_mac(&k));
        assert_ne!(mac, pseudo_mac(&Key([8; 32])));
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{mac}");
        assert_eq!(mac.len(), 17);
    }
}
