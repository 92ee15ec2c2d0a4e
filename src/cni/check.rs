//! CHECK: the attachment is still as ADD left it and as `prevResult` says: the link is in
//! the container, up, with its address and routes, its peer is the exit node, and a handshake
//! happened recently enough for traffic to flow.

use std::time::{Duration, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

use crate::cni::config::NetConf;
use crate::cni::del::attached_here;
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, Code};
use crate::cni::state::{AttachmentState, StateDir};
use crate::cni::{container_device, link_error, open_backend, wg_error};
use crate::net::{Netlink, Netns};
use crate::wg::{DeviceStatus, WireGuard};

/// WireGuard drops a session this long after its handshake (REJECT_AFTER_TIME); with the
/// keepalive the exit node hands out, a live tunnel re-handshakes well within it.
pub const HANDSHAKE_MAX_AGE: Duration = Duration::from_secs(180);

fn failed(msg: impl Into<String>) -> CniError {
    CniError::new(Code::CheckFailed, msg)
}

/// What `prevResult` says about the interface `ifname` in `sandbox`.
#[derive(Debug, PartialEq, Eq)]
pub struct Expected {
    pub addresses: Vec<IpNet>,
    pub routes: Vec<Ipv4Net>,
}

/// Finds `ifname` in `prev` (its `sandbox` must be `sandbox` when given), its addresses and
/// the result's IPv4 routes.
pub fn expected(prev: &Value, ifname: &str, sandbox: &str) -> Result<Expected, CniError> {
    let interfaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let index = interfaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"].as_str().is_none_or(|s| s == sandbox))
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                format!("prevResult lists no interface {ifname} in sandbox {sandbox}"),
            )
        })?;
    let parse_all = |key: &str, field: &str| -> Vec<String> {
        prev[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|v| key != "ips" || v["interface"].as_u64() == Some(index as u64))
                    .filter_map(|v| v[field].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let addresses = parse_all("ips", "address")
        .iter()
        .map(|a| {
            a.parse::<IpNet>().map_err(|e| {
                CniError::new(
                    Code::InvalidConfig,
                    format!("prevResult address {a:?}: {e}"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let routes = parse_all("routes", "dst")
        .iter()
        .filter_map(|r| r.parse::<Ipv4Net>().ok())
        .collect();
    Ok(Expected { addresses, routes })
}

pub async fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    let prev = conf.raw.get("prevResult").ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "CHECK needs prevResult (the result of ADD) in the config",
        )
    })?;
    let want = expected(prev, ifname, &netns_path.display().to_string())?;
    let dir = StateDir::open(&conf.data_dir)?;
    let _lock = dir.lock(container_id, ifname)?;
    let state = dir.load(container_id, ifname)?.ok_or_else(|| {
        CniError::new(
            Code::UnknownContainer,
            format!("no wgexit attachment for container {container_id} on {ifname} (never added, or deleted)"),
        )
    })?;
    if let Some(address) = state.address {
        if !want.addresses.contains(&address) {
            return Err(failed(format!(
                "prevResult does not list the leased address {address} on {ifname}"
            )));
        }
    }
    let netns = Netns::open(netns_path).map_err(|e| link_error("cannot use CNI_NETNS", e))?;
    if !attached_here(&state, &netns)? {
        return Err(failed(format!(
            "{} names another network namespace than the one ADD attached {ifname} to",
            netns_path.display()
        )));
    }
    check_link(&netns, ifname, &want, conf).await?;
    check_device(&state, &netns, ifname).await
}

/// The container's link: there, up, with the expected addresses and routes.
async fn check_link(
    netns: &Netns,
    ifname: &str,
    want: &Expected,
    conf: &NetConf,
) -> Result<(), CniError> {
    let nl = Netlink::in_netns(netns).map_err(|e| link_error("netlink in the container", e))?;
    let link = nl
        .link_info(ifname)
        .await
        .map_err(|e| link_error("reading the container's link", e))?
        .ok_or_else(|| failed(format!("no link {ifname} in {}", netns.path().display())))?;
    if !link.up {
        return Err(failed(format!("link {ifname} is down")));
    }
    let have = nl
        .addresses(ifname)
        .await
        .map_err(|e| link_error("reading addresses", e))?;
    // gVisor takes the addresses off the interfaces it serves itself, and the kernel drops
    // the routes that used them: its own network stack holds both.
    let served_by_gvisor = conf.gvisor && have.is_empty();
    if !served_by_gvisor {
        if let Some(a) = want.addresses.iter().find(|a| !have.contains(a)) {
            return Err(failed(format!(
                "address {a} is missing on {ifname} (it has {have:?})"
            )));
        }
    }
    let routes = nl
        .routes(ifname)
        .await
        .map_err(|e| link_error("reading routes", e))?;
    for dst in conf.routes.destinations() {
        if !want.routes.contains(&dst) {
            return Err(failed(format!("prevResult does not list the route {dst}")));
        }
        if !served_by_gvisor && !routes.contains(&dst) {
            return Err(failed(format!("route {dst} via {ifname} is missing")));
        }
    }
    Ok(())
}

/// What a process with CAP_NET_ADMIN in the container could have changed: the key, the
/// peers (exactly the exit node), the listen port, the fwmark.
fn check_device_settings(
    state: &AttachmentState,
    status: &DeviceStatus,
    ifname: &str,
) -> Result<(), CniError> {
    if status.public_key.is_some_and(|k| k != state.public_key) {
        return Err(failed(format!(
            "{ifname} has another key than the one leased"
        )));
    }
    let strangers: Vec<String> = status
        .peers
        .iter()
        .filter(|p| Some(p.public_key) != state.exit_public_key)
        .map(|p| p.public_key.to_string())
        .collect();
    if !strangers.is_empty() {
        return Err(failed(format!(
            "{ifname} has peers ADD did not set: {}",
            strangers.join(", ")
        )));
    }
    if let Some(port) = state.listen_port.filter(|p| *p != status.listen_port) {
        return Err(failed(format!(
            "{ifname} listens on UDP port {}, not {port} as ADD left it",
            status.listen_port
        )));
    }
    if status.fwmark != 0 {
        return Err(failed(format!(
            "{ifname} has fwmark {:#x}; ADD sets none",
            status.fwmark
        )));
    }
    Ok(())
}

/// The WireGuard device: the leased key, the exit node as its peer at the leased endpoint,
/// and a recent handshake.
async fn check_device(
    state: &AttachmentState,
    netns: &Netns,
    ifname: &str,
) -> Result<(), CniError> {
    let (in_container, name) = container_device(state, netns)?;
    let backend = match in_container {
        Some(b) => b,
        None => open_backend(state.backend)?,
    };
    let status = backend
        .status(name)
        .await
        .map_err(|e| wg_error(&format!("reading WireGuard on {ifname}"), e))?;
    check_device_settings(state, &status, ifname)?;
    let peer = status
        .peers
        .iter()
        .find(|p| Some(p.public_key) == state.exit_public_key)
        .ok_or_else(|| failed(format!("{ifname} has no peer for the exit node")))?;
    if peer.endpoint != state.endpoint {
        return Err(failed(format!(
            "the exit node's endpoint on {ifname} is {:?}, expected {:?}",
            peer.endpoint, state.endpoint
        )));
    }
    let age = peer
        .last_handshake
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default());
    match age {
        Some(age) if age <= HANDSHAKE_MAX_AGE => Ok(()),
        Some(age) => Err(failed(format!(
            "last handshake with the exit node was {} s ago (more than {} s): the tunnel is down; check that the exit node is up and UDP to {} is open",
            age.as_secs(),
            HANDSHAKE_MAX_AGE.as_secs(),
            state.endpoint.map(|e| e.to_string()).unwrap_or_default()
        ))),
        None => Err(failed("no handshake with the exit node yet")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expected_picks_our_interface() {
        let prev = json!({
            "interfaces": [{"name": "eth0", "sandbox": "/other"}, {"name": "eth0", "sandbox": "/ns"}],
            "ips": [{"address": "10.0.0.2/24", "interface": 0}, {"address": "100.96.0.2/32", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "fd00::/8"}]
        });
        let e = expected(&prev, "eth0", "/ns").unwrap();
        assert_eq!(e.addresses, vec!["100.96.0.2/32".parse::<IpNet>().unwrap()]);
        assert_eq!(e.routes, vec!["0.0.0.0/0".parse::<Ipv4Net>().unwrap()]);
        let err = expected(&prev, "eth1", "/ns").unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(err.msg.contains("eth1"));
    }
}
