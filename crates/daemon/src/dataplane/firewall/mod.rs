//! The exit node's nftables rules: one `inet` table that wgexitd alone owns (default name
//! [`DEFAULT_TABLE`]), described as typed objects of the `nftables` crate, written by the `nft`
//! binary in one transaction and verified by reading it back.
//!
//! Per egress `E` (WireGuard interface `WG`, uplink `UP`) the table holds:
//!
//! * `prerouting` (filter, mangle): packets from `WG` get [`FORWARD_MARK`], without which the
//!   [`RoutingGuard`] refuses to route them (failing closed when the table is gone), and so do
//!   packets from `UP` (for the reverse-path check of replies, see [`RoutingGuard`]);
//! * `postrouting` (nat, srcnat): `oifname UP ip saddr @pools4_E snat ip to ip saddr map
//!   @snat4_E` — the map sends each source block to its egress IP, so neither the number of
//!   egress IPs nor of leases adds rules — then a drop of pool sources no block covers; the
//!   same for IPv6 with a `pools6_E` set;
//! * `mangle_forward` (filter, forward, mangle): the TCP MSS clamp to the route MTU on SYNs in
//!   and out of `WG`;
//! * `forward` (filter, forward): drop spoofed sources from `WG`, refuse the exit nodes' own
//!   addresses the config names (`exit4_E`, `exit6_E`), send `WG` → `UP` through the
//!   egress's policy chain, accept established/related `UP` → `WG`, drop anything else in or
//!   out of `WG` (so no tenant reaches another's tunnel or containers);
//! * `input` (filter, input): accept ICMP echo requests from `WG` to the overlay addresses (and
//!   IPv6 neighbour discovery), refuse anything else from `WG`;
//! * `policy_E`: lookups in the interval sets of `allow` then `deny` rules (`allow4_E`,
//!   `allowp4_E` for address . protocol . port, `allowp_E` for ports alone, and the IPv6 and
//!   `deny` equivalents), the `private4`/`private6` sets, then the default — a constant number
//!   of lookups whatever the number of rules;
//! * `refuse_E`: counts in the named counter `refused_E`, then TCP reset or ICMP
//!   administratively prohibited.
//!
//! Per private network `N` (WireGuard interface `W`, prefix `P` in the set `net6_N`, gateway
//! `G` = `P::1`, resolver `D` = `P::3`), after every egress's rules:
//!
//! * `prerouting`: packets from `W` get [`FORWARD_MARK`]; without it the network's
//!   [`RoutingGuard::before_local`] refuses them, to other hosts and to this one alike;
//! * `forward`, in stages across all networks (so a packet from one network to another is
//!   counted where it comes from): from `W` with a source outside `P` dropped (counted;
//!   WireGuard's cryptokey routing already makes this impossible, this is the second lock);
//!   `W` → `W` within `P` accepted (member to member); anything else from `W` rejected
//!   (admin-prohibited, counted as leaving the network), then anything else to `W` (counted
//!   as entering it);
//! * `input`: from `W`, DNS (UDP and TCP 53) to `D` and ping of `G` or `D` accepted; anything
//!   else to the gateway itself dropped, counted.
//!
//! Every drop and reject at a network's tunnel counts in its rule's counter and in the
//! network's named counter `dropped_N`, which `wgexitd status` and `/metrics` read.
//!
//! Drops and SNAT carry counters; rule comments name the egress and purpose for people
//! reading `nft list`, but play no part in verification.
//!
//! `nft` acts in the network namespace of the thread that starts it.

mod compare;
mod elements;
mod guard;
mod ruleset;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use std::net::Ipv6Addr;

use ipnet::{IpNet, Ipv6Net};
use nftables::batch::Batch;
use nftables::schema::{NfListObject, Table};
use nftables::types::NfFamily;
use serde_json::Value;

use crate::space::Space;

pub use crate::config::policy::{Policy, Verdict};
pub use guard::{RoutingGuard, GUARD_PRIORITY, LOCAL_GUARD_PRIORITY};

/// The table name wgexitd uses unless told otherwise.
pub const DEFAULT_TABLE: &str = "wgexitd";

/// The packet-mark bit the table sets on packets from the tunnels, and the [`RoutingGuard`]
/// requires before it lets one be routed.
pub const FORWARD_MARK: u32 = 0x1000_0000;

/// What the rules of one egress are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRules {
    /// The egress name (letters, digits, '-', '_', '.'; up to 64): part of set and chain names.
    pub name: String,
    /// The exit node's WireGuard interface for this egress.
    pub wg_interface: String,
    /// Where egress traffic leaves.
    pub uplink: String,
    /// The overlay pools leased to containers (an IPv4 pool, and an IPv6 one when configured).
    pub pools: Vec<IpNet>,
    /// The exit node's own overlay address in each pool (what containers may ping).
    pub overlay_ips: Vec<IpAddr>,
    /// Source block inside a pool → the static egress IP its traffic leaves from.
    pub snat: Vec<(IpNet, IpAddr)>,
    /// Which destinations the egress's containers may reach.
    pub policy: Policy,
    /// The exit nodes' own addresses the config names (every egress's endpoint and egress
    /// IPs): refused from the tunnel before the policy, wherever they are held.
    pub exit_addresses: Vec<IpAddr>,
}

/// What the rules of one private network are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRules {
    /// The network's name (as an egress's): part of set names and comments.
    pub name: String,
    /// The gateway's WireGuard interface for this network.
    pub wg_interface: String,
    /// The network's prefix: its members' sources, and where they may send.
    pub prefix: Ipv6Net,
    /// The gateway's own address in the prefix (members may ping it).
    pub gateway: Ipv6Addr,
    /// The resolver's address (members may ask it, over UDP and TCP, and ping it).
    pub resolver: Ipv6Addr,
}

/// Everything the table holds: the rules of every egress and of every private network.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spaces<'a> {
    pub egresses: &'a [EgressRules],
    pub networks: &'a [NetworkRules],
}

/// What [`Firewall::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The table holds exactly the desired rules.
    Matches,
    /// There is no table.
    Missing,
    /// The table holds something else: the first difference.
    Differs(String),
}

/// Why the exit node's rules could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The rules asked for cannot be expressed (bad interface or egress name, overlaps, ...).
    #[error("invalid firewall configuration: {0}")]
    Invalid(String),
    #[error("cannot run {program}: {source}; install nftables (Debian/Ubuntu: apt-get install nftables)")]
    NftMissing {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "nftables: permission denied while {what}; run wgexitd as root (it needs CAP_NET_ADMIN)"
    )]
    PermissionDenied { what: String },
    #[error("nftables refused {what}: {stderr}")]
    Nft { what: String, stderr: String },
    #[error("nftables: unexpected output: {0}")]
    Unexpected(String),
    #[error("fail-closed routing rules: {0}")]
    Routing(#[from] wgexit::net::LinkError),
}

/// The nftables table that holds the exit node's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    table: String,
    nft: PathBuf,
}

impl Default for Firewall {
    fn default() -> Self {
        Firewall::new(DEFAULT_TABLE)
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && !name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b == b'"' || b.is_ascii_whitespace())
}

/// Refuses what the table cannot express, before anything touches the kernel.
fn check(e: &EgressRules) -> Result<(), FirewallError> {
    let bad = |what: String| {
        Err(FirewallError::Invalid(format!(
            "egress {:?}: {what}",
            e.name
        )))
    };
    if !valid_name(&e.name) {
        return bad("the name must be 1-64 letters, digits, '-', '_' or '.'".into());
    }
    for name in [&e.wg_interface, &e.uplink] {
        if !valid_ifname(name) {
            return bad(format!(
                "interface name {name:?} is not a valid Linux interface name (1 to 15 bytes, \
                 no '/', quotes, whitespace or NUL)"
            ));
        }
    }
    if e.pools.is_empty() {
        return bad("no overlay pool".into());
    }
    for (i, (block, ip)) in e.snat.iter().enumerate() {
        if block.addr().is_ipv4() != ip.is_ipv4() {
            return bad(format!("SNAT of {block} to {ip} mixes address families"));
        }
        if let Some((other, _)) = e.snat[..i]
            .iter()
            .find(|(o, _)| o.contains(block) || block.contains(o))
        {
            return bad(format!("SNAT blocks {other} and {block} overlap"));
        }
    }
    Ok(())
}

/// Refuses a network the table cannot express, before anything touches the kernel.
fn check_network(n: &NetworkRules) -> Result<(), FirewallError> {
    let bad = |what: &str| {
        Err(FirewallError::Invalid(format!(
            "network {:?}: {what}",
            n.name
        )))
    };
    if !valid_name(&n.name) {
        return bad("the name must be 1-64 letters, digits, '-', '_' or '.'");
    }
    if !valid_ifname(&n.wg_interface) {
        return bad("its wg_interface is not a valid Linux interface name");
    }
    Ok(())
}

impl Firewall {
    /// A handle on the `inet` table named `table` (nothing is read or written yet).
    pub fn new(table: &str) -> Firewall {
        Firewall {
            table: table.to_owned(),
            nft: PathBuf::from("nft"),
        }
    }

    /// The same table, written and read by `program` instead of the `nft` on `PATH`.
    pub fn with_nft(mut self, program: impl Into<PathBuf>) -> Firewall {
        self.nft = program.into();
        self
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn check_table(&self) -> Result<(), FirewallError> {
        if !valid_name(&self.table) {
            return Err(FirewallError::Invalid(format!(
                "table name {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                self.table
            )));
        }
        Ok(())
    }

    fn desired(&self, spaces: Spaces) -> Result<Vec<NfListObject<'static>>, FirewallError> {
        self.check_table()?;
        ruleset::build(&self.table, spaces)
    }

    /// [`Firewall::apply_spaces`] with egresses only.
    pub fn apply(&self, egresses: &[EgressRules]) -> Result<(), FirewallError> {
        self.apply_spaces(Spaces {
            egresses,
            networks: &[],
        })
    }

    /// Makes the table hold exactly the rules for `spaces`: left alone (counters keep
    /// counting) when it already does, else replaced in one transaction that deletes and
    /// recreates it, so there is never a moment without rules.
    pub fn apply_spaces(&self, spaces: Spaces) -> Result<(), FirewallError> {
        let desired = self.desired(spaces)?;
        if self.compare(&desired)? == Verification::Matches {
            return Ok(());
        }
        let mut batch = self.recreate_table();
        // What rules refer to (chains, sets, maps, counters) before the rules.
        let (rules, others): (Vec<_>, Vec<_>) = desired
            .into_iter()
            .partition(|o| matches!(o, NfListObject::Rule(_)));
        for object in others.into_iter().chain(rules) {
            batch.add(object);
        }
        self.run_batch(batch, &format!("the rules of table inet {}", self.table))
    }

    /// Whether the table holds exactly the rules for `egresses` (and no network's).
    pub fn verify(&self, egresses: &[EgressRules]) -> Result<Verification, FirewallError> {
        self.verify_spaces(Spaces {
            egresses,
            networks: &[],
        })
    }

    /// Whether the table holds exactly the rules for `spaces`.
    pub fn verify_spaces(&self, spaces: Spaces) -> Result<Verification, FirewallError> {
        let desired = self.desired(spaces)?;
        self.compare(&desired)
    }

    fn compare(&self, desired: &[NfListObject]) -> Result<Verification, FirewallError> {
        if !self.exists()? {
            return Ok(Verification::Missing);
        }
        let listed = self.list(&["list", "table", "inet", &self.table])?;
        Ok(match compare::difference(desired, &listed)? {
            None => Verification::Matches,
            Some(what) => Verification::Differs(what),
        })
    }

    /// Deletes the table if present (no error if absent).
    pub fn teardown(&self) -> Result<(), FirewallError> {
        self.check_table()?;
        let batch = self.recreate_table();
        self.run_batch(batch, &format!("deleting table inet {}", self.table))
    }

    /// Whether the table exists.
    pub fn exists(&self) -> Result<bool, FirewallError> {
        self.check_table()?;
        let listed: Value = parse(&self.list(&["list", "tables", "inet"])?)?;
        let objects = listed["nftables"].as_array().cloned().unwrap_or_default();
        Ok(objects
            .iter()
            .any(|o| o["table"]["name"].as_str() == Some(self.table.as_str())))
    }

    /// Packets and bytes refused by each egress's policy (and at the exit node's own
    /// addresses), since the table was last written.
    pub fn refused_counts(&self) -> Result<BTreeMap<String, (u64, u64)>, FirewallError> {
        self.by_prefix("refused_")
    }

    /// Packets and bytes dropped or rejected at each network's tunnel, since the table was
    /// last written.
    pub fn dropped_counts(&self) -> Result<BTreeMap<String, (u64, u64)>, FirewallError> {
        self.by_prefix("dropped_")
    }

    fn by_prefix(&self, prefix: &str) -> Result<BTreeMap<String, (u64, u64)>, FirewallError> {
        let counts = self.named_counts()?;
        Ok(counts
            .into_iter()
            .filter_map(|(name, c)| Some((name.strip_prefix(prefix)?.to_owned(), c)))
            .collect())
    }

    /// Both of the above, by space, from one listing.
    pub fn space_counts(&self) -> Result<BTreeMap<Space, (u64, u64)>, FirewallError> {
        let mut out = BTreeMap::new();
        for (name, c) in self.named_counts()? {
            if let Some(e) = name.strip_prefix("refused_") {
                out.insert(Space::Egress(e.to_owned()), c);
            } else if let Some(n) = name.strip_prefix("dropped_") {
                out.insert(Space::Network(n.to_owned()), c);
            }
        }
        Ok(out)
    }

    /// Every named counter's packets and bytes, by name (none while the table is missing).
    fn named_counts(&self) -> Result<BTreeMap<String, (u64, u64)>, FirewallError> {
        let mut out = BTreeMap::new();
        if !self.exists()? {
            return Ok(out);
        }
        let listed: Value =
            parse(&self.list(&["list", "counters", "table", "inet", &self.table])?)?;
        for object in listed["nftables"].as_array().into_iter().flatten() {
            let counter = &object["counter"];
            let name = counter["name"].as_str().unwrap_or_default();
            let packets = counter["packets"].as_u64().unwrap_or(0);
            let bytes = counter["bytes"].as_u64().unwrap_or(0);
            out.insert(name.to_owned(), (packets, bytes));
        }
        Ok(out)
    }

    /// A batch that creates the table if missing (so the delete cannot fail) and deletes it.
    fn recreate_table(&self) -> Batch<'static> {
        let table = || {
            NfListObject::Table(Table {
                family: NfFamily::INet,
                name: self.table.clone().into(),
                handle: None,
            })
        };
        let mut batch = Batch::new();
        batch.add(table());
        batch.delete(table());
        batch
    }

    fn run_batch(&self, batch: Batch, what: &str) -> Result<(), FirewallError> {
        let payload = serde_json::to_vec(&batch.to_nftables())
            .map_err(|e| FirewallError::Unexpected(e.to_string()))?;
        self.nft(&["-j", "-f", "-"], Some(&payload), what).map(drop)
    }

    fn list(&self, args: &[&str]) -> Result<String, FirewallError> {
        let what = format!("reading table inet {}", self.table);
        self.nft(&[&["-j"], args].concat(), None, &what)
    }

    /// Runs `nft ARGS` (with `input` on its standard input) and returns what it printed.
    fn nft(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
        what: &str,
    ) -> Result<String, FirewallError> {
        let missing = |source| FirewallError::NftMissing {
            program: self.nft.display().to_string(),
            source,
        };
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(missing)?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // nft reads all of its input before it answers; a write error shows in its status.
            let _ = stdin.write_all(input);
        }
        let out = child.wait_with_output().map_err(missing)?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if out.status.success() {
            return String::from_utf8(out.stdout)
                .map_err(|e| FirewallError::Unexpected(format!("nft printed invalid UTF-8: {e}")));
        }
        if stderr.contains("Operation not permitted") {
            return Err(FirewallError::PermissionDenied {
                what: what.to_owned(),
            });
        }
        Err(FirewallError::Nft {
            what: what.to_owned(),
            stderr,
        })
    }
}

fn parse(text: &str) -> Result<Value, FirewallError> {
    serde_json::from_str(text)
        .map_err(|e| FirewallError::Unexpected(format!("nft printed invalid JSON: {e}")))
}
