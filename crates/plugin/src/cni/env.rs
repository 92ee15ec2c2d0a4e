//! The `CNI_*` environment a runtime sets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::cni::error::{CniError, Code};
use wgexit::net::IfName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    /// `CNI_ARGS`: `K=V;K2=V2`.
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    pub fn from_env() -> CniEnv {
        CniEnv::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> CniEnv {
        let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
        CniEnv {
            command: non_empty("CNI_COMMAND").unwrap_or_default(),
            container_id: non_empty("CNI_CONTAINERID"),
            netns: non_empty("CNI_NETNS").map(PathBuf::from),
            ifname: non_empty("CNI_IFNAME"),
            args: non_empty("CNI_ARGS")
                .map(|a| parse_args(&a))
                .unwrap_or_default(),
        }
    }

    pub fn container_id(&self) -> Result<&str, CniError> {
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_CONTAINERID is not set"))?;
        // The spec: alphanumerics plus '_', '.' and '-', starting with an alphanumeric.
        let ok = id.len() <= 256
            && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
        if !ok {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_CONTAINERID {id:?} must be letters, digits, '_', '.' or '-'"),
            ));
        }
        Ok(id)
    }

    pub fn ifname(&self) -> Result<&str, CniError> {
        let name = self
            .ifname
            .as_deref()
            .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_IFNAME is not set"))?;
        IfName::new(name)
            .map_err(|e| CniError::new(Code::InvalidEnv, format!("CNI_IFNAME: {e}")))?;
        Ok(name)
    }

    pub fn netns(&self) -> Result<&PathBuf, CniError> {
        self.netns
            .as_ref()
            .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_NETNS is not set"))
    }
}

fn parse_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> CniEnv {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn reads_and_validates() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1.2_3"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web;bad"),
        ]);
        assert_eq!(e.container_id().unwrap(), "abc-1.2_3");
        assert_eq!(e.ifname().unwrap(), "eth0");
        assert_eq!(e.args.get("K8S_POD_NAME").map(String::as_str), Some("web"));
        assert_eq!(e.args.len(), 2);
        let bad = env(&[
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_IFNAME", "waytoolonginterface"),
        ]);
        assert_eq!(bad.container_id().unwrap_err().code, Code::InvalidEnv);
        assert_eq!(bad.ifname().unwrap_err().code, Code::InvalidEnv);
        assert_eq!(bad.netns().unwrap_err().code, Code::InvalidEnv);
    }
}
