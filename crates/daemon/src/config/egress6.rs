//! An egress's IPv6 side: `ip6 = "..."` or `ips6 = [...]` (the static egress IPv6s) with
//! `pool6` (the overlay IPv6 prefix leases get a /128 from). Both or neither.
//!
//! `pool6` is split into one block per egress IPv6, as the IPv4 pool is per egress IP (see
//! [`crate::addresses::egress_ips`]): a lease's IPv6 overlay address lies in the block of
//! its egress IPv6, so the firewall's SNAT map from block to IP needs no change per lease.
//! A lease's egress IPv6 follows its egress IPv4: the IP at the same index in `ips6` (modulo
//! the number of `ips6`), so with as many IPv6s as IPv4s `exclusive` holds for both.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::Ipv6Net;

use super::{parsed, ConfigError, EgressConfig, Invalid, NetworkConfig};

/// The smallest block of `pool6` an egress IPv6 may get: room for the reserved first 256
/// addresses of a block and as many leases.
pub const MAX_BLOCK6_PREFIX: u8 = 119;

/// The IPv6 side of an egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressV6 {
    /// The static egress IPv6s, in the config's order (at least one).
    pub ips: Vec<Ipv6Addr>,
    /// The overlay prefix leases get their IPv6 from.
    pub pool: Ipv6Net,
}

impl EgressV6 {
    /// The exit node's own overlay IPv6: `<pool6>::1` (never leased).
    pub fn gateway(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.pool.network()) | 1)
    }

    /// Each egress IPv6's block of the pool, in the order of the IPs.
    pub fn blocks(&self) -> Vec<(Ipv6Net, Ipv6Addr)> {
        let prefix = (self.pool.prefix_len() + split_bits(self.ips.len())).min(128);
        self.pool
            .subnets(prefix)
            .map(|subnets| subnets.zip(self.ips.iter().copied()).collect())
            .unwrap_or_default()
    }

    /// Which of `ips` a lease whose egress IPv4 is the `v4_index`th leaves from.
    pub fn index_for(&self, v4_index: usize) -> usize {
        v4_index % self.ips.len().max(1)
    }

    /// The egress IPv6 a lease at overlay `address` leaves from, if it is in a block.
    pub fn ip_of(&self, address: IpAddr) -> Option<Ipv6Addr> {
        let IpAddr::V6(a) = address else {
            return None;
        };
        self.blocks()
            .into_iter()
            .find(|(net, _)| net.contains(&a))
            .map(|(_, ip)| ip)
    }
}

/// How many times a pool is halved to give `n` blocks.
fn split_bits(n: usize) -> u8 {
    n.max(1).next_power_of_two().trailing_zeros() as u8
}

/// `ip6`/`ips6` and `pool6` of one `[[egress]]` as written.
pub(super) struct Raw6<'a> {
    pub ip6: Option<&'a str>,
    pub ips6: Option<&'a [String]>,
    pub pool6: Option<&'a str>,
}

/// The IPv6 side, or `None` when the egress has none. Refused naming the key: both `ip6`
/// and `ips6`, one of them without `pool6` or the reverse, a non-global egress IPv6, a
/// `pool6` that is not ULA (fc00::/7) or documentation (2001:db8::/32) or too small.
pub(super) fn egress6(
    invalid: &Invalid,
    key: &dyn Fn(&str) -> String,
    raw: Raw6<'_>,
) -> Result<Option<EgressV6>, ConfigError> {
    let ips = match (raw.ip6, raw.ips6) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key("ips6"),
                "set either ip6 (one egress IPv6) or ips6 (a set), not both".into(),
            ))
        }
        (None, None) => None,
        (Some(ip), None) => Some(vec![global(invalid, key("ip6"), ip)?]),
        (None, Some(list)) => Some(ip_list(invalid, key, list)?),
    };
    let (ips, pool) = match (ips, raw.pool6) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(invalid(
                key("pool6"),
                "missing: an egress with ip6/ips6 needs pool6, the overlay IPv6 prefix its leases get an address from (e.g. \"fd77:0:1::/64\")".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                key("ip6"),
                "missing: pool6 is set, so set ip6 (one static egress IPv6) or ips6 (a set), or drop pool6".into(),
            ))
        }
        (Some(ips), Some(pool)) => (ips, overlay_prefix(invalid, key("pool6"), pool)?),
    };
    if pool.prefix_len() + split_bits(ips.len()) > MAX_BLOCK6_PREFIX {
        return Err(invalid(
            key("pool6"),
            format!(
                "{pool} is too small for {} egress IPv6s: each needs a /{MAX_BLOCK6_PREFIX} of it",
                ips.len()
            ),
        ));
    }
    Ok(Some(EgressV6 { ips, pool }))
}

fn ip_list(
    invalid: &Invalid,
    key: &dyn Fn(&str) -> String,
    list: &[String],
) -> Result<Vec<Ipv6Addr>, ConfigError> {
    let mut out: Vec<Ipv6Addr> = Vec::new();
    for (j, ip) in list.iter().enumerate() {
        let k = key(&format!("ips6[{j}]"));
        let ip = global(invalid, k.clone(), ip)?;
        if out.contains(&ip) {
            return Err(invalid(k, format!("{ip} is listed twice")));
        }
        out.push(ip);
    }
    if out.is_empty() {
        return Err(invalid(
            key("ips6"),
            "must list at least one IPv6 address".into(),
        ));
    }
    Ok(out)
}

/// A global unicast IPv6 (2000::/3; the documentation range 2001:db8::/32 included).
fn global(invalid: &Invalid, key: String, value: &str) -> Result<Ipv6Addr, ConfigError> {
    let ip: Ipv6Addr = parsed(
        invalid,
        key.clone(),
        value,
        "an IPv6 address (e.g. \"2001:db8:77::77\")",
    )?;
    let global_unicast: Ipv6Net = "2000::/3".parse().unwrap_or_default();
    if !global_unicast.contains(&ip) {
        return Err(invalid(
            key,
            format!("{ip} is not a global unicast IPv6 address (2000::/3)"),
        ));
    }
    Ok(ip)
}

/// A ULA (fc00::/7) or documentation (2001:db8::/32) prefix without host bits.
fn overlay_prefix(invalid: &Invalid, key: String, value: &str) -> Result<Ipv6Net, ConfigError> {
    let pool: Ipv6Net = parsed(
        invalid,
        key.clone(),
        value,
        "an IPv6 network (e.g. \"fd77:0:1::/64\")",
    )?;
    if pool != pool.trunc() {
        return Err(invalid(
            key,
            format!("{pool} has host bits set; did you mean {}?", pool.trunc()),
        ));
    }
    let allowed: [Ipv6Net; 2] = [
        "fc00::/7".parse().unwrap_or_default(),
        "2001:db8::/32".parse().unwrap_or_default(),
    ];
    if !allowed.iter().any(|a| a.contains(&pool)) || pool.prefix_len() < 16 {
        return Err(invalid(
            key,
            format!(
                "{pool} is not a unique local prefix (fc00::/7) of /16 or longer, e.g. \"fd77:0:1::/64\""
            ),
        ));
    }
    Ok(pool)
}

/// `pool6` overlaps no other egress's `pool6` and no network's prefix; egress IPv6s are
/// not inside any of them.
pub(super) fn check_no_clash(
    egresses: &[EgressConfig],
    networks: &[NetworkConfig],
    invalid: &Invalid,
) -> Result<(), ConfigError> {
    let overlap = |a: &Ipv6Net, b: &Ipv6Net| a.contains(b) || b.contains(a);
    for (i, e) in egresses.iter().enumerate() {
        let Some(v6) = &e.v6 else { continue };
        let key = format!("egress[{i}].pool6");
        for (j, other) in egresses[..i].iter().enumerate() {
            if let Some(o) = other.v6.as_ref().filter(|o| overlap(&o.pool, &v6.pool)) {
                return Err(invalid(
                    key,
                    format!("{} overlaps egress[{j}].pool6 {}", v6.pool, o.pool),
                ));
            }
        }
        if let Some((j, n)) = networks
            .iter()
            .enumerate()
            .find(|(_, n)| overlap(&n.prefix, &v6.pool))
        {
            return Err(invalid(
                key,
                format!("{} overlaps network[{j}].prefix {}", v6.pool, n.prefix),
            ));
        }
        let pools = egresses
            .iter()
            .filter_map(|e| e.v6.as_ref().map(|v| v.pool));
        for pool in pools.chain(networks.iter().map(|n| n.prefix)) {
            if let Some(ip) = v6.ips.iter().find(|ip| pool.contains(*ip)) {
                return Err(invalid(
                    format!("egress[{i}].ip6"),
                    format!("{ip} lies inside the overlay prefix {pool}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(ips: &[&str], pool: &str) -> EgressV6 {
        EgressV6 {
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            pool: pool.parse().unwrap(),
        }
    }

    #[test]
    fn blocks_split_the_pool_and_follow_the_ipv4_index() {
        let one = v6(&["2001:db8:77::77"], "fd77:0:1::/64");
        assert_eq!(one.gateway(), "fd77:0:1::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(one.blocks(), vec![(one.pool, one.ips[0])]);
        assert_eq!(one.index_for(2), 0);
        let three = v6(
            &["2001:db8:77::80", "2001:db8:77::81", "2001:db8:77::82"],
            "fd77:0:1::/64",
        );
        let blocks = three.blocks();
        assert_eq!(blocks.len(), 3);
        assert_eq!(
            blocks[1].0,
            "fd77:0:1:0:4000::/66".parse::<Ipv6Net>().unwrap()
        );
        assert_eq!(three.index_for(2), 2);
        assert_eq!(
            three.ip_of("fd77:0:1:0:8000::5".parse().unwrap()),
            Some(three.ips[2])
        );
        assert_eq!(three.ip_of("fd77:0:1:0:c000::5".parse().unwrap()), None);
        assert_eq!(three.ip_of("100.96.0.2".parse().unwrap()), None);
    }
}
