//! `wgexit oci-hook add|del`: the same ADD and DEL, driven by OCI runtime hooks instead of a
//! CNI runtime, for runc or runsc without containerd or podman. `add` belongs in the
//! `createRuntime` hook (or `prestart`), `del` in `poststop`. The runtime writes the
//! container's state on stdin; the network namespace is the one the bundle's `config.json`
//! names, else the container process's (`/proc/<pid>/ns/net`). The plugin config is a file
//! holding a network config or a conflist (its `wgexit` plugin is used).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::cni::add::{is_own_namespace, own_namespace};
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, Code};
use crate::cni::link_error;
use wgexit::net::Netns;

/// Which hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Add,
    Del,
}

/// The OCI state the runtime writes on a hook's stdin.
#[derive(Debug, Deserialize)]
pub struct OciState {
    pub id: String,
    #[serde(default)]
    pub pid: Option<i32>,
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

fn decode(what: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(Code::Decode, format!("{what} is not valid")).with_details(e.to_string())
}

/// The network config for the plugin from a config file: the file itself, or for a conflist
/// its `wgexit` plugin with the list's `name` and `cniVersion`, as a runtime passes them.
pub fn plugin_config(bytes: &[u8]) -> Result<Value, CniError> {
    let file: Value = serde_json::from_slice(bytes).map_err(|e| decode("the config file", e))?;
    let Some(plugins) = file.get("plugins").and_then(Value::as_array) else {
        return Ok(file);
    };
    let mut plugin = plugins
        .iter()
        .find(|p| p["type"] == "wgexit")
        .cloned()
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "the conflist has no plugin of type \"wgexit\"",
            )
        })?;
    for key in ["name", "cniVersion"] {
        if let Some(v) = file.get(key) {
            plugin[key] = v.clone();
        }
    }
    Ok(plugin)
}

/// The container's network namespace: the path in the bundle's `config.json`, else the
/// process's. `None` when neither is there (a `poststop` hook after the process is gone).
pub fn netns_of(state: &OciState) -> Result<Option<PathBuf>, CniError> {
    let config_path = state.bundle.join("config.json");
    let config: Value = match std::fs::read(&config_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| decode(&config_path.display().to_string(), e))?,
        Err(e) => {
            return Err(CniError::new(
                Code::Io,
                format!("cannot read the bundle's {}: {e}", config_path.display()),
            ))
        }
    };
    let from_config = config["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    if from_config.is_some() {
        return Ok(from_config);
    }
    Ok(state
        .pid
        .filter(|pid| *pid > 0)
        .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
        .filter(|p| p.exists()))
}

/// Refuses a container whose network namespace is the hook's own: one that `config.json`
/// gives no namespace of its own (a host-network container) runs in the runtime's, i.e. the
/// host's, and ADD would replace the host's default route.
fn refuse_host_network(id: &str, path: &Path) -> Result<(), CniError> {
    let netns = Netns::open(path)
        .map_err(|e| link_error("cannot use the container's network namespace", e))?;
    if is_own_namespace(&netns, own_namespace()?)? {
        return Err(CniError::new(
            Code::InvalidEnv,
            format!(
                "container {id}: its network namespace ({}) is the host's: config.json gives it none of its own (a host-network container), and a wgexit interface there would replace the host's default route; add {{\"type\": \"network\"}} to linux.namespaces in config.json, or leave the wgexit hook out of this container's hooks",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Runs the hook: the OCI state on `stdin`, the plugin config in `config`.
pub async fn run(
    phase: Phase,
    config: &Path,
    ifname: &str,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let state: OciState = serde_json::from_slice(stdin).map_err(|e| decode("the OCI state", e))?;
    let bytes = std::fs::read(config).map_err(|e| {
        CniError::new(
            Code::Io,
            format!("cannot read the plugin config {}: {e}", config.display()),
        )
    })?;
    let conf = plugin_config(&bytes)?;
    let netns = netns_of(&state)?;
    if phase == Phase::Add && netns.is_none() {
        return Err(CniError::new(
            Code::InvalidEnv,
            format!(
                "container {}: no network namespace in config.json and no process; run `oci-hook add` as a createRuntime or prestart hook",
                state.id
            ),
        ));
    }
    if let (Phase::Add, Some(path)) = (phase, &netns) {
        refuse_host_network(&state.id, path)?;
    }
    let env = CniEnv {
        command: match phase {
            Phase::Add => "ADD",
            Phase::Del => "DEL",
        }
        .to_string(),
        container_id: Some(state.id.clone()),
        netns,
        ifname: Some(ifname.to_string()),
        args: BTreeMap::new(),
    };
    let conf_bytes = serde_json::to_vec(&conf).map_err(|e| decode("the config", e))?;
    super::logged(&env, &conf_bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conflist_yields_its_wgexit_plugin() {
        let list = json!({"cniVersion": "1.0.0", "name": "egress", "plugins": [
            {"type": "loopback"}, {"type": "wgexit", "egress": "acme"}]});
        let c = plugin_config(list.to_string().as_bytes()).unwrap();
        assert_eq!(c["type"], "wgexit");
        assert_eq!(c["name"], "egress");
        assert_eq!(c["cniVersion"], "1.0.0");
        let single = json!({"cniVersion": "1.1.0", "name": "n", "type": "wgexit"});
        assert_eq!(
            plugin_config(single.to_string().as_bytes()).unwrap(),
            single
        );
        let none = json!({"plugins": [{"type": "ptp"}]});
        assert_eq!(
            plugin_config(none.to_string().as_bytes()).unwrap_err().code,
            Code::InvalidConfig
        );
    }

    #[test]
    fn example_configs_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../plugin-configs");
        let mut seen = 0;
        for sub in ["", "podman", "containerd", "runsc"] {
            for entry in std::fs::read_dir(Path::new(dir).join(sub)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "conflist") {
                    let conf = plugin_config(&std::fs::read(&path).unwrap()).unwrap();
                    let bytes = serde_json::to_vec(&conf).unwrap();
                    crate::cni::config::NetConf::parse(&bytes)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 4);
    }

    #[test]
    fn netns_from_config_else_process() {
        let t = tempfile::tempdir().unwrap();
        let write = |ns: Value| {
            std::fs::write(
                t.path().join("config.json"),
                json!({"linux": {"namespaces": ns}}).to_string(),
            )
            .unwrap()
        };
        let state = |pid| OciState {
            id: "c1".into(),
            pid,
            bundle: t.path().to_path_buf(),
            annotations: BTreeMap::new(),
        };
        write(json!([{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]));
        assert_eq!(
            netns_of(&state(Some(1))).unwrap(),
            Some(PathBuf::from("/var/run/netns/x"))
        );
        write(json!([{"type": "network"}]));
        let me = std::process::id() as i32;
        assert_eq!(
            netns_of(&state(Some(me))).unwrap(),
            Some(PathBuf::from(format!("/proc/{me}/ns/net")))
        );
        assert_eq!(netns_of(&state(None)).unwrap(), None);
    }
}
