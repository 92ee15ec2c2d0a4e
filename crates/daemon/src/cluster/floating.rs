//! The addresses that follow an egress's leader: its egress IPs on `interface` and its
//! endpoint's address on `endpoint_interface` (`float = "address"`: added as host
//! addresses and announced), or whatever the hooks do (`float = "hooks"`: e.g. move a
//! cloud provider's IP), with `WGEXIT_EGRESS`, `WGEXIT_IPS`, `WGEXIT_ENDPOINT` and
//! `WGEXIT_NODE` in their environment. With addresses, the leader's WireGuard packets
//! leave from the endpoint's address while it holds it ([`endpoint_source`]).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use super::announce::announce;
use super::election::Group;
use super::endpoint_source;
use super::ClusterError;
use crate::config::cluster::Float;
use crate::config::EgressConfig;
use wgexit::net::Netlink;

/// When announcements are repeated after taking an address (a lost one is not waited for).
const ANNOUNCE_AT: [Duration; 3] = [
    Duration::from_millis(0),
    Duration::from_millis(200),
    Duration::from_millis(1000),
];

pub struct Floating {
    netlink: Netlink,
    float: Float,
    node: String,
}

/// Where each of the group's addresses goes, without repeats.
fn placements(group: &Group) -> Vec<(String, IpAddr)> {
    let mut out: Vec<(String, IpAddr)> = Vec::new();
    for e in &group.egresses {
        let mut add = |ifname: &str, ip: IpAddr| {
            if !out.iter().any(|(_, a)| *a == ip) {
                out.push((ifname.to_string(), ip));
            }
        };
        for ip in e.ips() {
            add(e.interface.as_str(), IpAddr::V4(*ip));
        }
        for ip in e.v6.iter().flat_map(|v6| &v6.ips) {
            add(e.interface.as_str(), IpAddr::V6(*ip));
        }
        if let Some(ifname) = &e.endpoint_interface {
            add(ifname.as_str(), e.endpoint.ip());
        }
    }
    out
}

impl Floating {
    /// Floating addresses in the current network namespace (inside a tokio runtime).
    pub fn new(float: Float, node: &str) -> Result<Floating, ClusterError> {
        Ok(Floating {
            netlink: Netlink::current().map_err(|e| ClusterError::Float(e.to_string()))?,
            float,
            node: node.to_string(),
        })
    }

    /// Takes the group's addresses (and tells the segments), or runs `on_acquire`.
    pub async fn acquire(&self, group: &Group) -> Result<(), ClusterError> {
        match &self.float {
            Float::Hooks { on_acquire, .. } => self.run_hooks(on_acquire, group).await,
            Float::Address => {
                let placed = placements(group);
                for (ifname, ip) in &placed {
                    self.netlink
                        .add_address(ifname, IpNet::from(*ip))
                        .await
                        .map_err(|e| ClusterError::Float(e.to_string()))?;
                }
                tokio::spawn(announce_repeatedly(placed));
                endpoint_source::set(group).await
            }
        }
    }

    /// Gives the group's addresses up, or runs `on_release`.
    pub async fn release(&self, group: &Group) -> Result<(), ClusterError> {
        match &self.float {
            Float::Hooks { on_release, .. } => self.run_hooks(on_release, group).await,
            Float::Address => {
                // WireGuard stops using the endpoint's address before it goes.
                let mut failed = endpoint_source::clear(group).await.err();
                for (ifname, ip) in placements(group) {
                    if let Err(e) = self.netlink.delete_address(&ifname, IpNet::from(ip)).await {
                        failed = Some(ClusterError::Float(e.to_string()));
                    }
                }
                failed.map_or(Ok(()), Err)
            }
        }
    }

    async fn run_hooks(&self, program: &Path, group: &Group) -> Result<(), ClusterError> {
        for e in &group.egresses {
            run_hook(program, e, &self.node).await?;
        }
        Ok(())
    }
}

async fn announce_repeatedly(placed: Vec<(String, IpAddr)>) {
    let start = tokio::time::Instant::now();
    for at in ANNOUNCE_AT {
        tokio::time::sleep_until(start + at).await;
        for (ifname, ip) in &placed {
            if let Err(e) = announce(ifname, *ip) {
                tracing::warn!(%ifname, %ip, error = %e, "cannot announce a floating address");
            }
        }
    }
}

/// `WGEXIT_IPS`: the egress IPs, IPv4 then IPv6, space-separated.
fn hook_ips(e: &EgressConfig) -> String {
    let v4 = e.ips().iter().map(|ip| IpAddr::V4(*ip));
    let v6 = e.v6.iter().flat_map(|v6| &v6.ips).map(|ip| IpAddr::V6(*ip));
    v4.chain(v6)
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run_hook(program: &Path, e: &EgressConfig, node: &str) -> Result<(), ClusterError> {
    let out = tokio::process::Command::new(program)
        .env("WGEXIT_EGRESS", &e.name)
        .env("WGEXIT_IPS", hook_ips(e))
        .env("WGEXIT_ENDPOINT", e.endpoint.to_string())
        .env("WGEXIT_NODE", node)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .map_err(|_| {
            ClusterError::Float(format!(
                "{} for egress {} did not finish within 30 s",
                program.display(),
                e.name
            ))
        })?
        .map_err(|err| ClusterError::Float(format!("{}: {err}", program.display())))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ClusterError::Float(format!(
        "{} for egress {} failed ({}): {}",
        program.display(),
        e.name,
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}
