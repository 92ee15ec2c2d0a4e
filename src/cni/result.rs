//! The ADD result, in the shape of the version asked for.

use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde_json::{json, Value};

/// What ADD made, independent of the spec version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub ifname: String,
    pub sandbox: PathBuf,
    pub mac: Option<String>,
    pub address: Ipv4Net,
    pub routes: Vec<Ipv4Net>,
}

impl Attached {
    /// The result JSON for `cni_version` (0.4.0 adds `"version": "4"` to each IP).
    pub fn to_result(&self, cni_version: &str) -> Value {
        let mut iface = json!({
            "name": self.ifname,
            "sandbox": self.sandbox.display().to_string(),
        });
        if let Some(mac) = &self.mac {
            iface["mac"] = json!(mac);
        }
        let mut ip = json!({ "address": self.address.to_string(), "interface": 0 });
        if cni_version.starts_with("0.") {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": cni_version,
            "interfaces": [iface],
            "ips": [ip],
            "routes": self.routes.iter().map(|r| json!({ "dst": r.to_string() })).collect::<Vec<_>>(),
            "dns": {},
        })
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
            address: "100.96.0.2/32".parse().unwrap(),
            routes: vec!["0.0.0.0/0".parse().unwrap()],
        }
    }

    #[test]
    fn result_1_0_0() {
        let r = attached().to_result("1.0.0");
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][0]["name"], "eth0");
        assert_eq!(r["interfaces"][0]["sandbox"], "/var/run/netns/c1");
        assert_eq!(r["ips"][0]["address"], "100.96.0.2/32");
        assert_eq!(r["ips"][0]["interface"], 0);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    }

    #[test]
    fn result_0_4_0_has_ip_versions() {
        assert_eq!(attached().to_result("0.4.0")["ips"][0]["version"], "4");
    }
}
