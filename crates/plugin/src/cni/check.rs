//! CHECK: the attachment is still as ADD left it and as `prevResult` says: the link is in
//! the container, up, with its address and routes, its peer is the exit node, and a handshake
//! happened recently enough for traffic to flow.

use std::time::{Duration, SystemTime};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;

use crate::cni::config::NetConf;
use crate::cni::del::attached_here;
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, Code};
use crate::cni::state::{AttachmentState, StateDir};
use crate::cni::{container_device, link_error, open_backend, wg_error};
use wgexit::net::{Netlink, Netns};
use wgexit::wg::{DeviceStatus, WireGuard};

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
    pub routes6: Vec<Ipv6Net>,
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
    let dsts = parse_all("routes", "dst");
    let routes = dsts
        .iter()
        .filter_map(|r| r.parse::<Ipv4Net>().ok())
        .collect();
    let routes6 = dsts
        .iter()
        .filter_map(|r| r.parse::<Ipv6Net>().ok())
        .collect();
    Ok(Expected {
        addresses,
        routes,
        routes6,
    })
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
    let member_address = state.member.as_ref().and_then(|m| m.address);
    let egress_addresses = state.address.into_iter().chain(state.address6);
    for address in egress_addresses.chain(member_address) {
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
    check_link(&netns, ifname, &want, conf, &state).await?;
    check_device(&state, &netns, ifname).await
}

/// The container's link: there, up, with the expected addresses and routes.
async fn check_link(
    netns: &Netns,
    ifname: &str,
    want: &Expected,
    conf: &NetConf,
    state: &AttachmentState,
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
    if let Some(prefix) = state.member.as_ref().and_then(|m| m.prefix) {
        check_prefix_route(&nl, ifname, want, prefix, served_by_gvisor).await?;
    }
    let egress_routes = match state.server {
        Some(_) => conf.routes.destinations(),
        None => Vec::new(),
    };
    for dst in egress_routes {
        if !want.routes.contains(&dst) {
            return Err(failed(format!("prevResult does not list the route {dst}")));
        }
        if !served_by_gvisor && !routes.contains(&dst) {
            return Err(failed(format!("route {dst} via {ifname} is missing")));
        }
    }
    if state.server.is_some() && state.address6.is_some() {
        check_egress_routes6(&nl, ifname, want, conf, served_by_gvisor).await?;
    }
    Ok(())
}

/// An egress with `ip6`: its IPv6 routes in `prevResult` and into the link.
async fn check_egress_routes6(
    nl: &Netlink,
    ifname: &str,
    want: &Expected,
    conf: &NetConf,
    served_by_gvisor: bool,
) -> Result<(), CniError> {
    let routes = nl
        .routes6(ifname)
        .await
        .map_err(|e| link_error("reading IPv6 routes", e))?;
    for dst in conf.routes.destinations6() {
        if !want.routes6.contains(&dst) {
            return Err(failed(format!("prevResult does not list the route {dst}")));
        }
        if !served_by_gvisor && !routes.contains(&dst) {
            return Err(failed(format!("route {dst} via {ifname} is missing")));
        }
    }
    Ok(())
}

/// What a process with CAP_NET_ADMIN in the container could have changed: the key, the
/// peers (exactly the exit node and the gateway), the listen port, the fwmark.
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
        .filter(|p| {
            Some(p.public_key) != state.exit_public_key
                && state
                    .member
                    .as_ref()
                    .is_none_or(|m| Some(p.public_key) != m.gateway_public_key)
        })
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

/// The network's prefix: in `prevResult` and routed into the link.
async fn check_prefix_route(
    nl: &Netlink,
    ifname: &str,
    want: &Expected,
    prefix: Ipv6Net,
    served_by_gvisor: bool,
) -> Result<(), CniError> {
    if !want.routes6.contains(&prefix) {
        return Err(failed(format!(
            "prevResult does not list the route {prefix}"
        )));
    }
    let routes = nl
        .routes6(ifname)
        .await
        .map_err(|e| link_error("reading IPv6 routes", e))?;
    if !served_by_gvisor && !routes.contains(&prefix) {
        return Err(failed(format!("route {prefix} via {ifname} is missing")));
    }
    Ok(())
}

/// The WireGuard device: the leased key, the exit node and the gateway (whichever there
/// are) as its peers at their leased endpoints, each with a recent handshake.
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
    if state.server.is_some() {
        check_peer(
            &status,
            "exit node",
            state.exit_public_key,
            state.endpoint,
            ifname,
        )?;
    }
    if let Some(m) = state.member.as_ref().filter(|m| m.server.is_some()) {
        check_peer(&status, "gateway", m.gateway_public_key, m.endpoint, ifname)?;
    }
    Ok(())
}

/// `what` (the exit node, the gateway) is a peer of the device with key `key` at `endpoint`,
/// and shook hands recently enough for traffic to flow.
fn check_peer(
    status: &wgexit::wg::DeviceStatus,
    what: &str,
    key: Option<wgexit::keys::Key>,
    endpoint: Option<std::net::SocketAddr>,
    ifname: &str,
) -> Result<(), CniError> {
    let peer = status
        .peers
        .iter()
        .find(|p| Some(p.public_key) == key)
        .ok_or_else(|| failed(format!("{ifname} has no peer for the {what}")))?;
    if peer.endpoint != endpoint {
        return Err(failed(format!(
            "the {what}'s endpoint on {ifname} is {:?}, expected {endpoint:?}",
            peer.endpoint
        )));
    }
    let age = peer
        .last_handshake
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default());
    match age {
        Some(age) if age <= HANDSHAKE_MAX_AGE => Ok(()),
        Some(age) => Err(failed(format!(
            "last handshake with the {what} was {} s ago (more than {} s): the tunnel is down; check that it is up and UDP to {} is open",
            age.as_secs(),
            HANDSHAKE_MAX_AGE.as_secs(),
            endpoint.map(|e| e.to_string()).unwrap_or_default()
        ))),
        None => Err(failed(format!("no handshake with the {what} yet"))),
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
