//! The private networks' nftables rules, in a table of their own (`inet wgexitd-net`,
//! [`NETWORK_TABLE`]), apart from the egresses' `inet wgexitd`: each table holds only
//! accept-by-default base chains whose rules match their own interfaces, so the two never
//! decide on each other's packets and either can be rewritten alone.
//!
//! Per network (interface `W`, prefix `P`, gateway `G` = `P::1`, resolver `D` = `P::3`):
//!
//! * `forward`: from `W` with a source outside `P`: drop (counted; WireGuard's cryptokey
//!   routing already makes this impossible, this is the second lock); `W` → `W` within `P`:
//!   accept (member to member); anything else from or to `W` — another network, the
//!   gateway's other interfaces, the internet — rejected (admin-prohibited), counted as
//!   leaving the network it came from (or entering `W`, from elsewhere).
//! * `input`: from `W`, DNS (UDP and TCP 53) to `D` and ping of `G` or `D` accepted;
//!   anything else to the gateway itself dropped, counted.
//!
//! The table is written with the `nft` program in one transaction (create, flush by delete,
//! define), so there is never a moment without rules.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::config::NetworkConfig;

pub const NETWORK_TABLE: &str = "wgexitd-net";

#[derive(Debug, thiserror::Error)]
pub enum NetworkRulesError {
    #[error("cannot run nft ({0}); install the nftables package")]
    Spawn(std::io::Error),
    #[error("nft refused the private networks' rules: {0}")]
    Refused(String),
}

/// The whole `nft -f` script that makes the table hold exactly the rules of `networks`.
pub fn script(networks: &[NetworkConfig]) -> String {
    // Forward rules go in stages across all networks (spoofed sources, then traffic within
    // a network, then traffic leaving one, then traffic entering one), so that a packet from
    // one network to another is counted where it comes from.
    let mut stages: [String; 4] = Default::default();
    let mut input = String::new();
    for n in networks {
        let (w, p, name) = (n.wg_interface.as_str(), n.prefix, &n.name);
        let (g, d) = (n.gateway(), n.dns());
        let reject = "counter reject with icmpx type admin-prohibited";
        let rules = [
            format!("iifname \"{w}\" ip6 saddr != {p} counter drop comment \"{name}: spoofed source\""),
            format!("iifname \"{w}\" oifname \"{w}\" ip6 daddr {p} accept comment \"{name}: member to member\""),
            format!("iifname \"{w}\" {reject} comment \"{name}: leaves the network\""),
            format!("oifname \"{w}\" {reject} comment \"{name}: enters the network\""),
        ];
        for (stage, rule) in stages.iter_mut().zip(rules) {
            let _ = writeln!(stage, "    {rule}");
        }
        let _ = writeln!(
            input,
            "    iifname \"{w}\" ip6 daddr {d} udp dport 53 accept comment \"{name}: dns\"\n    \
             iifname \"{w}\" ip6 daddr {d} tcp dport 53 accept comment \"{name}: dns over tcp\"\n    \
             iifname \"{w}\" ip6 daddr {{ {g}, {d} }} icmpv6 type echo-request accept comment \"{name}: ping\"\n    \
             iifname \"{w}\" counter drop comment \"{name}: to the gateway\""
        );
    }
    let forward = stages.concat();
    format!(
        "table inet {NETWORK_TABLE} {{}}\n\
         delete table inet {NETWORK_TABLE}\n\
         table inet {NETWORK_TABLE} {{\n  \
           chain forward {{\n    type filter hook forward priority filter; policy accept;\n{forward}  }}\n  \
           chain input {{\n    type filter hook input priority filter; policy accept;\n{input}  }}\n\
         }}\n"
    )
}

fn nft(script: &str) -> Result<(), NetworkRulesError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetworkRulesError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NetworkRulesError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NetworkRulesError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkRulesError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Makes the table hold exactly the rules of `networks` (none: the table is removed).
pub fn apply(networks: &[NetworkConfig]) -> Result<(), NetworkRulesError> {
    if networks.is_empty() {
        return teardown();
    }
    nft(&script(networks))
}

/// Removes the table; not an error when it is absent.
pub fn teardown() -> Result<(), NetworkRulesError> {
    nft(&format!(
        "table inet {NETWORK_TABLE} {{}}\ndelete table inet {NETWORK_TABLE}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::network::tests::network;

    #[test]
    fn each_network_forwards_only_within_itself() {
        let s = script(&[
            network("acme", "fdaa:0:1::/48", "wgn-acme"),
            network("beta", "fdaa:0:2::/48", "wgn-beta"),
        ]);
        assert!(
            s.contains("iifname \"wgn-acme\" oifname \"wgn-acme\" ip6 daddr fdaa:0:1::/48 accept")
        );
        assert!(s.contains("iifname \"wgn-beta\" counter reject"));
        // Every network's "leaves" rule comes before any "enters" rule.
        let leaves = s.find("beta: leaves the network").unwrap();
        assert!(leaves < s.find("acme: enters the network").unwrap());
        assert!(s.contains("ip6 daddr fdaa:0:2::3 udp dport 53 accept"));
        assert!(s.contains("ip6 daddr { fdaa:0:1::1, fdaa:0:1::3 } icmpv6 type echo-request"));
        // Replaced whole, in one transaction.
        assert!(s.starts_with("table inet wgexitd-net {}\ndelete table inet wgexitd-net\n"));
    }
}
