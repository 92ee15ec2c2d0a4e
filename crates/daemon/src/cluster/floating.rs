//! The addresses that follow a space's leader: an egress's egress IPs on `interface` and
//! every space's endpoint address on `endpoint_interface` (`float = "address"`: added as
//! host addresses and announced), or whatever the hooks do (`float = "hooks"`: e.g. move a
//! cloud provider's IP), with `WGEXIT_EGRESS` or `WGEXIT_NETWORK`, `WGEXIT_IPS`,
//! `WGEXIT_ENDPOINT` and `WGEXIT_NODE` in their environment. With addresses, the leader's WireGuard packets
//! leave from the endpoint's address while it holds it ([`endpoint_source`]).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use super::announce::announce;
use super::election::Group;
use super::endpoint_source;
use super::led::Led;
use super::ClusterError;
use crate::config::cluster::Float;
use crate::space::Space;
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
    for (ifname, ip) in group.spaces.iter().flat_map(Led::addresses) {
        if !out.iter().any(|(_, a)| *a == ip) {
            out.push((ifname.to_string(), ip));
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
        for led in &group.spaces {
            run_hook(program, led, &self.node).await?;
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

/// `WGEXIT_IPS`: the egress IPs, IPv4 then IPv6, space-separated (empty for a network).
fn hook_ips(led: &Led) -> String {
    led.egress_ips()
        .iter()
        .map(|(_, ip)| ip.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run_hook(program: &Path, led: &Led, node: &str) -> Result<(), ClusterError> {
    let space = led.space();
    let named = match space {
        Space::Egress(_) => "WGEXIT_EGRESS",
        Space::Network(_) => "WGEXIT_NETWORK",
    };
    let out = tokio::process::Command::new(program)
        .env(named, space.name())
        .env("WGEXIT_IPS", hook_ips(led))
        .env("WGEXIT_ENDPOINT", led.endpoint().to_string())
        .env("WGEXIT_NODE", node)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .map_err(|_| {
            ClusterError::Float(format!(
                "{} for {space} did not finish within 30 s",
                program.display(),
            ))
        })?
        .map_err(|err| ClusterError::Float(format!("{}: {err}", program.display())))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ClusterError::Float(format!(
        "{} for {space} failed ({}): {}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::cluster::election::groups;
    use crate::config::network::tests::network;
    use crate::config::tests::egress;

    /// A hook that appends what it was told to `out`; it fails on node `broken`.
    fn hook(dir: &Path, out: &Path) -> std::path::PathBuf {
        let path = dir.join("hook");
        let script = format!(
            "#!/bin/sh\n[ \"$WGEXIT_NODE\" = broken ] && {{ echo no route >&2; exit 3; }}\n\
             echo \"egress=$WGEXIT_EGRESS network=$WGEXIT_NETWORK ips=$WGEXIT_IPS \
             endpoint=$WGEXIT_ENDPOINT node=$WGEXIT_NODE\" >> {}\n",
            out.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn hooks_are_told_each_space_of_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let program = hook(dir.path(), &out);
        let float = Float::Hooks {
            on_acquire: program.clone(),
            on_release: program,
        };
        // The network's endpoint shares the egress's address: one group, both told.
        let mut n = network("acme", "fdaa:0:1::/48", "wgn-acme");
        n.endpoint = "198.51.100.2:51830".parse().unwrap();
        let group = groups(vec![
            Led::Network(n),
            Led::Egress(egress("acme", "100.96.0.0/24")),
        ])
        .remove(0);
        Floating::new(float.clone(), "m1")
            .unwrap()
            .acquire(&group)
            .await
            .unwrap();
        let told = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            told,
            "egress=acme network= ips=203.0.113.77 endpoint=198.51.100.2:51820 node=m1\n\
             egress= network=acme ips= endpoint=198.51.100.2:51830 node=m1\n"
        );
        // A hook that fails is an error naming the space and saying what the hook said.
        let err = Floating::new(float, "broken")
            .unwrap()
            .release(&group)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("for egress acme failed") && err.contains("no route"),
            "{err}"
        );
    }
}
