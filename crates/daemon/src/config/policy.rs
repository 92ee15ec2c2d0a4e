//! What an egress's containers may reach: `[egress.policy]`.
//!
//! A rule is `[CIDR] [tcp|udp/PORT[-PORT]]` with at least one part. Forwarded traffic is judged
//! in this order, the first match deciding: `allow` rules (let through), `deny` rules (refused),
//! the [`PRIVATE`] ranges when `private` is [`Verdict::Deny`] (refused), then `default`.
//! [`Policy::judge`] is that order written out; the firewall compiles the same order to
//! nftables sets.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

use super::{ConfigError, Invalid};

/// Destinations refused by default: private, shared (CGNAT), link-local (cloud metadata
/// services), loopback, "this network", multicast, reserved, their IPv6 counterparts, and the
/// NAT64 prefixes (RFC 6052's well-known prefix and RFC 8215's local-use one), which lead to
/// private IPv4 addresses wherever a NAT64 translator serves them.
pub const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
];

/// [`PRIVATE`], parsed.
pub fn private_nets() -> Vec<IpNet> {
    PRIVATE.iter().filter_map(|n| n.parse().ok()).collect()
}

/// Let through or refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl FromStr for Verdict {
    type Err = String;

    fn from_str(s: &str) -> Result<Verdict, String> {
        match s {
            "allow" => Ok(Verdict::Allow),
            "deny" => Ok(Verdict::Deny),
            _ => Err(format!("{s:?} must be \"allow\" or \"deny\"")),
        }
    }
}

/// The transport protocols a rule's ports can belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The name nftables and rules use.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One `allow` or `deny` entry: a destination network, a port range, or both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub net: Option<IpNet>,
    /// Protocol and inclusive port range.
    pub ports: Option<(Proto, u16, u16)>,
}

impl Rule {
    /// Whether a packet to `dst` (with `port` for TCP/UDP) matches.
    pub fn matches(&self, dst: IpAddr, port: Option<(Proto, u16)>) -> bool {
        let net_ok = self.net.is_none_or(|n| n.contains(&dst));
        let ports_ok = match (self.ports, port) {
            (None, _) => true,
            (Some((p, lo, hi)), Some((q, n))) => p == q && (lo..=hi).contains(&n),
            (Some(_), None) => false,
        };
        net_ok && ports_ok
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(net) = self.net {
            parts.push(net.to_string());
        }
        match self.ports {
            Some((p, lo, hi)) if lo == hi => parts.push(format!("{}/{lo}", p.name())),
            Some((p, lo, hi)) => parts.push(format!("{}/{lo}-{hi}", p.name())),
            None => {}
        }
        f.write_str(&parts.join(" "))
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let net: IpNet = match s.parse() {
        Ok(net) => net,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                return Err(format!(
                    "{s:?} is neither a CIDR (\"198.18.7.0/24\", \"2001:db8::/32\") nor \
                     tcp/PORT, udp/PORT or PORT-PORT"
                ))
            }
        },
    };
    if net != net.trunc() {
        return Err(format!(
            "{net} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_ports(proto: Proto, s: &str) -> Result<(Proto, u16, u16), String> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!(
            "{}/{s}: {p:?} is not a port (1 to 65535)",
            proto.name()
        )),
        Ok(n) => Ok(n),
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => (port(s)?, port(s)?),
    };
    if lo > hi {
        return Err(format!(
            "{}/{s}: the range ends before it starts",
            proto.name()
        ));
    }
    Ok((proto, lo, hi))
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        let mut rule = Rule {
            net: None,
            ports: None,
        };
        for part in s.split_whitespace() {
            let proto = match part.split_once('/') {
                Some(("tcp", rest)) => Some((Proto::Tcp, rest)),
                Some(("udp", rest)) => Some((Proto::Udp, rest)),
                _ => None,
            };
            match proto {
                Some(_) if rule.ports.is_some() => {
                    return Err(format!("{part:?}: a rule has at most one port range"))
                }
                Some((proto, rest)) => rule.ports = Some(parse_ports(proto, rest)?),
                None if rule.ports.is_some() => {
                    return Err(format!("{part:?}: the CIDR comes before the ports"))
                }
                None if rule.net.is_some() => {
                    return Err(format!("{part:?}: a rule has at most one CIDR"))
                }
                None => rule.net = Some(parse_net(part)?),
            }
        }
        if rule.net.is_none() && rule.ports.is_none() {
            return Err("empty rule: write \"[CIDR] [tcp|udp/PORT[-PORT]]\"".into());
        }
        Ok(rule)
    }
}

/// The destinations an egress's containers may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What happens to [`PRIVATE`] destinations no `allow` or `deny` rule decided.
    pub private: Verdict,
    /// What happens to everything else no rule decided.
    pub default: Verdict,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            private: Verdict::Deny,
            default: Verdict::Allow,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

impl Policy {
    /// The verdict for a packet to `dst` (`port`: protocol and destination port for TCP/UDP).
    pub fn judge(&self, dst: IpAddr, port: Option<(Proto, u16)>) -> Verdict {
        if self.allow.iter().any(|r| r.matches(dst, port)) {
            return Verdict::Allow;
        }
        if self.deny.iter().any(|r| r.matches(dst, port)) {
            return Verdict::Deny;
        }
        if self.private == Verdict::Deny && private_nets().iter().any(|n| n.contains(&dst)) {
            return Verdict::Deny;
        }
        self.default
    }
}

/// `[egress.policy]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    private: Option<String>,
    default: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// `[egress.policy]`, checked; `key` is the policy's key (`egress[0].policy`).
pub(super) fn parse(
    raw: Option<RawPolicy>,
    key: &str,
    invalid: &Invalid,
) -> Result<Policy, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Policy::default());
    };
    let mut policy = Policy::default();
    for (name, text, verdict) in [
        ("private", raw.private, &mut policy.private),
        ("default", raw.default, &mut policy.default),
    ] {
        if let Some(text) = text {
            *verdict = text
                .parse::<Verdict>()
                .map_err(|e| invalid(format!("{key}.{name}"), e))?;
        }
    }
    for (name, texts, rules) in [
        ("allow", raw.allow, &mut policy.allow),
        ("deny", raw.deny, &mut policy.deny),
    ] {
        for (j, text) in texts.into_iter().enumerate() {
            let rule = text
                .parse::<Rule>()
                .map_err(|e| invalid(format!("{key}.{name}[{j}]"), format!("{text:?}: {e}")))?;
            rules.push(rule);
        }
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_documented_rules() {
        assert_eq!(
            rule("198.18.9.0/24 tcp/443"),
            Rule {
                net: Some("198.18.9.0/24".parse().unwrap()),
                ports: Some((Proto::Tcp, 443, 443)),
            }
        );
        assert_eq!(rule("tcp/25").ports, Some((Proto::Tcp, 25, 25)));
        assert_eq!(rule("tcp/25").net, None);
        assert_eq!(rule("198.18.7.0/24").ports, None);
        assert_eq!(
            rule("2001:db8:bad::/48").net,
            Some("2001:db8:bad::/48".parse().unwrap())
        );
        assert_eq!(
            rule("198.18.8.0/24 udp/5000-5100").ports,
            Some((Proto::Udp, 5000, 5100))
        );
        // A bare address is a /32 or /128.
        assert_eq!(
            rule("169.254.169.254").net,
            Some("169.254.169.254/32".parse().unwrap())
        );
        for s in [
            "198.18.9.0/24 tcp/443",
            "tcp/25",
            "2001:db8:bad::/48",
            "198.18.8.0/24 udp/5000-5100",
        ] {
            assert_eq!(rule(s).to_string(), s);
        }
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (text, says) in [
            ("", "empty rule"),
            ("   ", "empty rule"),
            ("198.18.9.1/24", "host bits"),
            ("198.18.9.0/33", "neither a CIDR"),
            ("sctp/80", "neither a CIDR"),
            ("tcp/0", "not a port"),
            ("tcp/65536", "not a port"),
            ("tcp/", "not a port"),
            ("udp/90-80", "ends before it starts"),
            ("tcp/80 udp/53", "at most one port range"),
            ("198.18.0.0/16 198.18.1.0/24", "at most one CIDR"),
            ("tcp/80 198.18.0.0/16", "comes before the ports"),
            ("tcp/http", "not a port"),
        ] {
            let err = text.parse::<Rule>().unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_default_refuses_private_destinations_only() {
        let p = Policy::default();
        for dst in [
            "169.254.169.254",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "127.0.0.1",
            "224.0.0.1",
            "::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            // NAT64: 10.0.0.1 and 169.254.169.254 behind the well-known and local prefixes.
            "64:ff9b::a00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1:2::a00:1",
        ] {
            assert_eq!(p.judge(ip(dst), None), Verdict::Deny, "{dst}");
        }
        for dst in [
            "198.18.0.10",
            "203.0.113.9",
            "2001:db8::1",
            "172.32.0.1",
            "64:ff9b:2::1",
        ] {
            assert_eq!(p.judge(ip(dst), None), Verdict::Allow, "{dst}");
        }
        let open = Policy {
            private: Verdict::Allow,
            ..Policy::default()
        };
        assert_eq!(open.judge(ip("10.1.2.3"), None), Verdict::Allow);
    }

    #[test]
    fn allow_beats_deny_beats_private_beats_default() {
        let p = Policy {
            private: Verdict::Deny,
            default: Verdict::Allow,
            allow: vec![rule("169.254.169.254 tcp/80"), rule("198.18.7.7")],
            deny: vec![rule("tcp/8081"), rule("198.18.7.0/24")],
        };
        let tcp = |n| Some((Proto::Tcp, n));
        assert_eq!(p.judge(ip("198.18.0.10"), tcp(8080)), Verdict::Allow);
        assert_eq!(p.judge(ip("198.18.0.10"), tcp(8081)), Verdict::Deny);
        assert_eq!(
            p.judge(ip("198.18.0.10"), Some((Proto::Udp, 8081))),
            Verdict::Allow
        );
        assert_eq!(p.judge(ip("198.18.7.1"), tcp(443)), Verdict::Deny);
        assert_eq!(p.judge(ip("198.18.7.7"), tcp(8081)), Verdict::Allow);
        assert_eq!(p.judge(ip("169.254.169.254"), tcp(80)), Verdict::Allow);
        assert_eq!(p.judge(ip("169.254.169.254"), tcp(443)), Verdict::Deny);
        assert_eq!(p.judge(ip("169.254.169.254"), None), Verdict::Deny);
        let closed = Policy {
            default: Verdict::Deny,
            ..p
        };
        assert_eq!(closed.judge(ip("198.18.0.10"), tcp(8080)), Verdict::Deny);
        assert_eq!(closed.judge(ip("198.18.7.7"), None), Verdict::Allow);
    }

    #[test]
    fn private_ranges_parse() {
        assert_eq!(private_nets().len(), PRIVATE.len());
    }
}
