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
    let p: PathBuf = std::iter::once("/proc/sys")
        .chain(parts.iter().copied())
        .collect();
    let key = parts.join(".");
    if std::fs::read_to_string(&p).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
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

/// IPv6 forwarding on, for egresses with `ip6`. Only once the firewall's rules are in place.
pub fn forward6() -> Result<(), SysctlError> {
    ensure(&["net", "ipv6", "conf", "all", "forwarding"], "1")
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
