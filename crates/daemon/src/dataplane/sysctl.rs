//! The sysctls an exit node needs, set in the daemon's own network namespace.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("cannot set sysctl {key}={value}: {source}")]
pub struct SysctlError {
    pub key: String,
    pub value: String,
    #[source]
    pub source: std::io::Error,
}

/// Writes `value` to `/proc/sys/<parts…>` unless it is already set (so a read-only
/// /proc/sys with the right values set by the operator is fine). Parts are joined as
/// path components, so an interface name with a '.' stays one component.
pub fn ensure(parts: &[&str], value: &str) -> Result<(), SysctlError> {
    if read(parts).is_some_and(|v| v == value) {
        return Ok(());
    }
    let p: PathBuf = std::iter::once("/proc/sys")
        .chain(parts.iter().copied())
        .collect();
    let key = parts.join(".");
    std::fs::write(&p, value).map_err(|source| SysctlError {
        key,
        value: value.to_string(),
        source,
    })
}

/// IPv4 forwarding on. Only once the firewall's rules are in place.
pub fn forward() -> Result<(), SysctlError> {
    ensure(&["net", "ipv4", "ip_forward"], "1")
}

/// IPv6 forwarding on, for egresses with `ip6` and for networks. Only once the firewall's
/// rules are in place.
///
/// Turning forwarding on makes the kernel drop every default route learnt from router
/// advertisements on interfaces whose `accept_ra` is not 2, and ignore later advertisements
/// there: an exit node that got its IPv6 default route by SLAAC would lose it. So when
/// forwarding is still off, every interface that accepts advertisements (`accept_ra` = 1)
/// is first told to go on accepting them as a router (`accept_ra` = 2).
pub fn forward6() -> Result<(), SysctlError> {
    let forwarding = ["net", "ipv6", "conf", "all", "forwarding"];
    if read(&forwarding).as_deref() != Some("1") {
        for interface in accepting_router_advertisements() {
            tracing::info!(
                %interface,
                "accept_ra=2: IPv6 forwarding is going on; the interface keeps its router-advertised routes"
            );
            ensure(&["net", "ipv6", "conf", &interface, "accept_ra"], "2")?;
        }
    }
    ensure(&forwarding, "1")
}

/// A sysctl's value, trimmed; `None` when it cannot be read.
fn read(parts: &[&str]) -> Option<String> {
    let p: PathBuf = std::iter::once("/proc/sys")
        .chain(parts.iter().copied())
        .collect();
    std::fs::read_to_string(p)
        .ok()
        .map(|v| v.trim().to_string())
}

/// The interfaces with `accept_ra` = 1 (not `all`, `default`, nor loopback).
fn accepting_router_advertisements() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv6/conf") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !matches!(n.as_str(), "all" | "default" | "lo"))
        .filter(|n| read(&["net", "ipv6", "conf", n, "accept_ra"]).as_deref() == Some("1"))
        .collect();
    names.sort();
    names
}

/// Loose reverse-path filtering on the WireGuard interface (the kernel uses the larger of
/// `all` and the interface's value, so 2 is loose whatever `all` says), and `src_valid_mark`
/// on it and on the uplink: the reverse-path check of a forwarded packet looks its source up
/// as if it came in on the packet's way out, and must see the packet's mark, or the
/// fail-closed routing rule (which refuses unmarked packets "from" the WireGuard interface)
/// would refuse every reply on its way from the uplink to a container (see
/// [`super::firewall::RoutingGuard`]).
pub fn prepare_egress(wg_interface: &str, uplink: &str) -> Result<(), SysctlError> {
    ensure(&["net", "ipv4", "conf", wg_interface, "rp_filter"], "2")?;
    for dev in [wg_interface, uplink] {
        ensure(&["net", "ipv4", "conf", dev, "src_valid_mark"], "1")?;
    }
    Ok(())
}
