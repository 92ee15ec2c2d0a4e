//! `[[egress]]`: one tenant's static egress, checked alone and against the others.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::egress6::{self, EgressV6, Raw6};
use super::policy::{self, Policy};
use super::{ifname, parsed, ConfigError, Invalid, DEFAULT_MTU};
use crate::addresses::egress_ips::{Assign, EgressIps, IpUsage};
use crate::addresses::pool::Pool;
use wgexit::api::valid_egress_name;
use wgexit::net::IfName;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    name: String,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    ips: Option<Vec<String>>,
    #[serde(default)]
    assign: Option<String>,
    #[serde(default)]
    ip6: Option<String>,
    #[serde(default)]
    ips6: Option<Vec<String>>,
    #[serde(default)]
    pool6: Option<String>,
    interface: String,
    pool: String,
    wg_interface: String,
    listen_port: u16,
    endpoint: String,
    token_file: PathBuf,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    policy: Option<policy::RawPolicy>,
    /// In a pool: where the endpoint's address floats (see [`super::cluster`]).
    #[serde(default)]
    endpoint_interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    pub name: String,
    /// The static egress IPv4s (`ip` or `ips`) and how leases are given one.
    pub egress_ips: EgressIps,
    /// The static egress IPv6s and the overlay IPv6 pool (`ip6`/`ips6`, `pool6`), if any.
    pub v6: Option<EgressV6>,
    pub interface: IfName,
    pub pool: Ipv4Net,
    pub wg_interface: IfName,
    pub listen_port: u16,
    pub endpoint: SocketAddr,
    pub token_file: PathBuf,
    pub mtu: u32,
    /// What its containers may reach.
    pub policy: Policy,
    /// In a pool: the interface the leader adds the endpoint's address to.
    pub endpoint_interface: Option<IfName>,
}

impl EgressConfig {
    /// The exit node's own address in the pool.
    pub fn overlay_ip(&self) -> Ipv4Addr {
        Pool::gateway(self.pool)
    }

    /// Every static egress IPv4, in the config's order.
    pub fn ips(&self) -> &[Ipv4Addr] {
        self.egress_ips.ips()
    }

    /// Each egress IP's block of the pool: what the firewall SNATs and leases come from.
    pub fn ip_blocks(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.egress_ips.blocks(self.pool)
    }

    /// The egress IP a lease at `address` leaves from (the first IP for an address outside
    /// every block, which the registry never leases).
    pub fn egress_ip_of(&self, address: IpAddr) -> Ipv4Addr {
        IpUsage::new(&self.egress_ips, self.pool)
            .ip_of(address)
            .unwrap_or_else(|| self.egress_ips.first())
    }

    /// The egress IPv6 a lease at overlay `address6` leaves from (none without `ip6`, or
    /// for an address outside `pool6`'s blocks).
    pub fn egress_ip6_of(&self, address6: IpAddr) -> Option<std::net::Ipv6Addr> {
        self.v6.as_ref()?.ip_of(address6)
    }
}

/// Every `[[egress]]`, each checked alone and then against the ones before it.
pub(super) fn egresses(
    raw: Vec<RawEgress>,
    invalid: &Invalid,
) -> Result<Vec<EgressConfig>, ConfigError> {
    let mut out: Vec<EgressConfig> = Vec::new();
    for (i, e) in raw.into_iter().enumerate() {
        let e = egress(i, e, invalid)?;
        check_no_clash(i, &e, &out, invalid)?;
        out.push(e);
    }
    Ok(out)
}

fn egress(i: usize, e: RawEgress, invalid: &Invalid) -> Result<EgressConfig, ConfigError> {
    let key = |k: &str| format!("egress[{i}].{k}");
    if !valid_egress_name(&e.name) {
        return Err(invalid(
            key("name"),
            format!(
                "{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                e.name
            ),
        ));
    }
    let egress_ips = egress_ips(invalid, &key, &e)?;
    let raw6 = Raw6 {
        ip6: e.ip6.as_deref(),
        ips6: e.ips6.as_deref(),
        pool6: e.pool6.as_deref(),
    };
    let v6 = egress6::egress6(invalid, &key, raw6)?;
    let pool = overlay_pool(invalid, key("pool"), &e.pool)?;
    if !egress_ips.fit(pool) {
        let n = egress_ips.ips().len();
        return Err(invalid(
            key("pool"),
            format!(
                "{pool} is too small for {n} egress IPs: each needs a /29 of the pool; use a /{} or larger",
                EgressIps::widest_prefix_for(n)
            ),
        ));
    }
    if e.listen_port == 0 {
        return Err(invalid(key("listen_port"), "must not be 0".into()));
    }
    let endpoint = parsed(
        invalid,
        key("endpoint"),
        &e.endpoint,
        "an address:port (e.g. \"198.51.100.2:51820\")",
    )?;
    let mtu = e.mtu.unwrap_or(DEFAULT_MTU);
    if !(1280..=9000).contains(&mtu) {
        return Err(invalid(key("mtu"), format!("{mtu} is outside 1280..=9000")));
    }
    let endpoint_interface = match &e.endpoint_interface {
        Some(name) => Some(ifname(invalid, key("endpoint_interface"), name)?),
        None => None,
    };
    Ok(EgressConfig {
        endpoint_interface,
        interface: ifname(invalid, key("interface"), &e.interface)?,
        wg_interface: ifname(invalid, key("wg_interface"), &e.wg_interface)?,
        name: e.name,
        egress_ips,
        v6,
        pool,
        listen_port: e.listen_port,
        endpoint,
        token_file: e.token_file,
        mtu,
        policy: policy::parse(e.policy, &key("policy"), invalid)?,
    })
}

/// `ip` or `ips` (exactly one), and `assign`.
fn egress_ips(
    invalid: &Invalid,
    key: &dyn Fn(&str) -> String,
    e: &RawEgress,
) -> Result<EgressIps, ConfigError> {
    const IPV4: &str = "an IPv4 address (e.g. \"203.0.113.77\")";
    let assign = match &e.assign {
        None => Assign::default(),
        Some(a) => Assign::parse(a).ok_or_else(|| {
            invalid(
                key("assign"),
                format!("{a:?} is neither \"spread\" nor \"exclusive\""),
            )
        })?,
    };
    let list: Vec<Ipv4Addr> = match (&e.ip, &e.ips) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key("ips"),
                "set either ip (one egress IP) or ips (a set), not both".into(),
            ))
        }
        (None, None) => {
            return Err(invalid(
                key("ip"),
                "missing: set ip (one static egress IPv4) or ips (a set of them)".into(),
            ))
        }
        (Some(ip), None) => vec![parsed(invalid, key("ip"), ip, IPV4)?],
        (None, Some(list)) => {
            let mut out: Vec<Ipv4Addr> = Vec::new();
            for (j, ip) in list.iter().enumerate() {
                let ip: Ipv4Addr = parsed(invalid, key(&format!("ips[{j}]")), ip, IPV4)?;
                if out.contains(&ip) {
                    return Err(invalid(
                        key(&format!("ips[{j}]")),
                        format!("{ip} is listed twice"),
                    ));
                }
                out.push(ip);
            }
            out
        }
    };
    EgressIps::new(list, assign)
        .ok_or_else(|| invalid(key("ips"), "must list at least one IPv4 address".into()))
}

fn overlay_pool(invalid: &Invalid, key: String, value: &str) -> Result<Ipv4Net, ConfigError> {
    let pool: Ipv4Net = parsed(
        invalid,
        key.clone(),
        value,
        "an IPv4 network (e.g. \"100.96.0.0/20\")",
    )?;
    if pool != pool.trunc() {
        return Err(invalid(
            key,
            format!("{pool} has host bits set; did you mean {}?", pool.trunc()),
        ));
    }
    if pool.prefix_len() > 29 {
        return Err(invalid(
            key,
            format!("{pool} is too small: use a /29 or larger"),
        ));
    }
    Ok(pool)
}

/// Names, WireGuard interfaces, ports and pools are each one egress's own.
fn check_no_clash(
    i: usize,
    e: &EgressConfig,
    before: &[EgressConfig],
    invalid: &Invalid,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("egress[{i}].{k}");
    for (j, other) in before.iter().enumerate() {
        let clash = |what: &str| {
            invalid(
                key(what),
                format!("is the same as egress[{j}].{what} ({})", other.name),
            )
        };
        if other.name == e.name {
            return Err(clash("name"));
        }
        if other.wg_interface == e.wg_interface {
            return Err(clash("wg_interface"));
        }
        if other.listen_port == e.listen_port {
            return Err(clash("listen_port"));
        }
        if other.pool.contains(&e.pool) || e.pool.contains(&other.pool) {
            return Err(invalid(
                key("pool"),
                format!("{} overlaps egress[{j}].pool {}", e.pool, other.pool),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;
    use super::*;

    fn config(ip_lines: &str, pool: &str) -> Result<Config, ConfigError> {
        let text = format!(
            r#"
state_dir = "/var/lib/wgexitd"
[api]
listen = "198.51.100.2:7443"
[[egress]]
name = "acme"
{ip_lines}
interface = "isp0"
pool = "{pool}"
wg_interface = "wgx-acme"
listen_port = 51820
endpoint = "198.51.100.2:51820"
token_file = "/etc/wgexitd/acme.tokens"
"#
        );
        Config::parse(Path::new("t.toml"), &text)
    }

    fn err(ip_lines: &str, pool: &str) -> String {
        config(ip_lines, pool).unwrap_err().to_string()
    }

    #[test]
    fn ips_and_assign_are_read_and_split_the_pool() {
        let c = config(
            "ips = [\"203.0.113.80\", \"203.0.113.81\", \"203.0.113.82\"]\nassign = \"exclusive\"",
            "100.96.0.0/24",
        )
        .unwrap();
        let e = &c.egress[0];
        assert_eq!(e.ips().len(), 3);
        assert_eq!(e.egress_ips.assign, Assign::Exclusive);
        let blocks = e.ip_blocks();
        assert_eq!(blocks[2].0, "100.96.0.128/26".parse::<Ipv4Net>().unwrap());
        assert_eq!(
            e.egress_ip_of("100.96.0.130".parse().unwrap()),
            "203.0.113.82".parse::<Ipv4Addr>().unwrap()
        );
        // Today's `ip` is a set of one, spread, over the whole pool.
        let one = config("ip = \"203.0.113.77\"", "100.96.0.0/24").unwrap();
        assert_eq!(one.egress[0].egress_ips.assign, Assign::Spread);
        assert_eq!(one.egress[0].ip_blocks().len(), 1);
    }

    #[test]
    fn bad_ip_sets_are_refused_naming_the_key() {
        let three = "ips = [\"203.0.113.80\", \"203.0.113.81\", \"203.0.113.82\"]";
        for (lines, pool, key, says) in [
            (
                "ip = \"203.0.113.77\"\nips = [\"203.0.113.80\"]",
                "100.96.0.0/24",
                "egress[0].ips",
                "not both",
            ),
            ("", "100.96.0.0/24", "egress[0].ip", "missing"),
            ("ips = []", "100.96.0.0/24", "egress[0].ips", "at least one"),
            (
                "ips = [\"203.0.113.80\", \"nope\"]",
                "100.96.0.0/24",
                "egress[0].ips[1]",
                "not an IPv4",
            ),
            (
                "ips = [\"203.0.113.80\", \"203.0.113.80\"]",
                "100.96.0.0/24",
                "egress[0].ips[1]",
                "twice",
            ),
            (three, "100.96.0.0/28", "egress[0].pool", "/27 or larger"),
            (
                "ip = \"203.0.113.77\"\nassign = \"random\"",
                "100.96.0.0/24",
                "egress[0].assign",
                "exclusive",
            ),
        ] {
            let msg = err(lines, pool);
            assert!(msg.contains(key) && msg.contains(says), "{lines:?}: {msg}");
        }
        assert!(config(three, "100.96.0.0/27").is_ok());
    }

    #[test]
    fn ip6_and_pool6_are_read_together() {
        let c = config(
            "ip = \"203.0.113.77\"\nip6 = \"2001:db8:77::77\"\npool6 = \"fd77:0:1::/64\"",
            "100.96.0.0/24",
        )
        .unwrap();
        let v6 = c.egress[0].v6.as_ref().unwrap();
        assert_eq!(
            v6.ips,
            vec!["2001:db8:77::77".parse::<std::net::Ipv6Addr>().unwrap()]
        );
        assert_eq!(v6.gateway().to_string(), "fd77:0:1::1");
        let e = &c.egress[0];
        assert_eq!(
            e.egress_ip6_of("fd77:0:1::1234".parse().unwrap()),
            Some(v6.ips[0])
        );
        let sets = "ip = \"203.0.113.77\"\nips6 = [\"2001:db8:77::80\", \"2001:db8:77::81\"]\npool6 = \"2001:db8:ff::/64\"";
        assert_eq!(
            config(sets, "100.96.0.0/24").unwrap().egress[0]
                .v6
                .as_ref()
                .unwrap()
                .blocks()
                .len(),
            2
        );
        assert!(config("ip = \"203.0.113.77\"", "100.96.0.0/24")
            .unwrap()
            .egress[0]
            .v6
            .is_none());
    }

    #[test]
    fn bad_ipv6_settings_are_refused_naming_the_key() {
        let ip = "ip = \"203.0.113.77\"\n";
        for (lines, key, says) in [
            (
                "ip6 = \"2001:db8::1\"\nips6 = [\"2001:db8::2\"]\npool6 = \"fd77::/64\"",
                "egress[0].ips6",
                "not both",
            ),
            ("ip6 = \"2001:db8::1\"", "egress[0].pool6", "missing"),
            ("pool6 = \"fd77::/64\"", "egress[0].ip6", "missing"),
            (
                "ip6 = \"fd77::9\"\npool6 = \"fd78::/64\"",
                "egress[0].ip6",
                "global unicast",
            ),
            (
                "ip6 = \"203.0.113.9\"\npool6 = \"fd78::/64\"",
                "egress[0].ip6",
                "not an IPv6",
            ),
            (
                "ips6 = []\npool6 = \"fd78::/64\"",
                "egress[0].ips6",
                "at least one",
            ),
            (
                "ips6 = [\"2001:db8::1\", \"2001:db8::1\"]\npool6 = \"fd78::/64\"",
                "egress[0].ips6[1]",
                "twice",
            ),
            (
                "ip6 = \"2001:db8::1\"\npool6 = \"2a00::/64\"",
                "egress[0].pool6",
                "unique local",
            ),
            (
                "ip6 = \"2001:db8::1\"\npool6 = \"fd78::1/64\"",
                "egress[0].pool6",
                "host bits",
            ),
            (
                "ip6 = \"2001:db8::1\"\npool6 = \"fd78::/124\"",
                "egress[0].pool6",
                "too small",
            ),
            (
                "ip6 = \"2001:db8:ff::1\"\npool6 = \"2001:db8:ff::/64\"",
                "egress[0].ip6",
                "inside the overlay",
            ),
        ] {
            let msg = err(&format!("{ip}{lines}"), "100.96.0.0/24");
            assert!(msg.contains(key) && msg.contains(says), "{lines:?}: {msg}");
        }
    }
}
