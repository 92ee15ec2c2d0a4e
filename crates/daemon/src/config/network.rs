//! `[[network]]`: one organisation's private IPv6 network, checked alone, against the others
//! and against the egresses (interfaces and ports are shared by both kinds).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::Ipv6Net;
use serde::Deserialize;

use super::{ifname, parsed, ConfigError, EgressConfig, Invalid, DEFAULT_MTU};
use wgexit::api::valid_egress_name;
use wgexit::net::IfName;

/// The port DNS upstreams get when none is written.
const DNS_PORT: u16 = 53;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetwork {
    name: String,
    prefix: String,
    wg_interface: String,
    listen_port: u16,
    endpoint: String,
    token_file: PathBuf,
    #[serde(default)]
    dns_upstream: Vec<String>,
    #[serde(default)]
    mtu: Option<u32>,
    /// In a pool: where the endpoint's address floats (see [`super::cluster`]).
    #[serde(default)]
    endpoint_interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub name: String,
    /// A ULA prefix; members get /128s in it.
    pub prefix: Ipv6Net,
    pub wg_interface: IfName,
    pub listen_port: u16,
    pub endpoint: SocketAddr,
    pub token_file: PathBuf,
    /// Where the resolver sends names outside `.internal`; none: it refuses them.
    pub dns_upstream: Vec<SocketAddr>,
    pub mtu: u32,
    /// In a pool: the interface the network's leader adds the endpoint's address to.
    pub endpoint_interface: Option<IfName>,
}

impl NetworkConfig {
    /// The gateway's own address: `<prefix>::1`.
    pub fn gateway(&self) -> Ipv6Addr {
        host(self.prefix, 1)
    }

    /// The resolver's address: `<prefix>::3`.
    pub fn dns(&self) -> Ipv6Addr {
        host(self.prefix, 3)
    }
}

/// `<prefix>::n`.
pub fn host(prefix: Ipv6Net, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) | n)
}

/// Every `[[network]]`, each checked alone, then against the ones before it and the egresses.
pub(super) fn networks(
    raw: Vec<RawNetwork>,
    egresses: &[EgressConfig],
    invalid: &Invalid,
) -> Result<Vec<NetworkConfig>, ConfigError> {
    let mut out: Vec<NetworkConfig> = Vec::new();
    for (i, n) in raw.into_iter().enumerate() {
        let n = network(i, n, invalid)?;
        check_no_clash(i, &n, &out, invalid)?;
        check_no_egress_clash(i, &n, egresses, invalid)?;
        out.push(n);
    }
    Ok(out)
}

fn network(i: usize, n: RawNetwork, invalid: &Invalid) -> Result<NetworkConfig, ConfigError> {
    let key = |k: &str| format!("network[{i}].{k}");
    if !valid_egress_name(&n.name) {
        return Err(invalid(
            key("name"),
            format!(
                "{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                n.name
            ),
        ));
    }
    let prefix = ula_prefix(invalid, key("prefix"), &n.prefix)?;
    if n.listen_port == 0 {
        return Err(invalid(key("listen_port"), "must not be 0".into()));
    }
    let endpoint = parsed(
        invalid,
        key("endpoint"),
        &n.endpoint,
        "an address:port (e.g. \"198.51.100.2:51830\")",
    )?;
    let dns_upstream = n
        .dns_upstream
        .iter()
        .map(|u| upstream(invalid, key("dns_upstream"), u))
        .collect::<Result<_, _>>()?;
    let mtu = n.mtu.unwrap_or(DEFAULT_MTU);
    if !(1280..=9000).contains(&mtu) {
        return Err(invalid(key("mtu"), format!("{mtu} is outside 1280..=9000")));
    }
    let endpoint_interface = match &n.endpoint_interface {
        Some(name) => Some(ifname(invalid, key("endpoint_interface"), name)?),
        None => None,
    };
    Ok(NetworkConfig {
        endpoint_interface,
        wg_interface: ifname(invalid, key("wg_interface"), &n.wg_interface)?,
        name: n.name,
        prefix,
        listen_port: n.listen_port,
        endpoint,
        token_file: n.token_file,
        dns_upstream,
        mtu,
    })
}

/// A unique local IPv6 prefix (fc00::/7) of /16 to /64, without host bits.
fn ula_prefix(invalid: &Invalid, key: String, value: &str) -> Result<Ipv6Net, ConfigError> {
    let prefix: Ipv6Net = parsed(
        invalid,
        key.clone(),
        value,
        "an IPv6 network (e.g. \"fdaa:0:1::/48\")",
    )?;
    if prefix != prefix.trunc() {
        return Err(invalid(
            key,
            format!(
                "{prefix} has host bits set; did you mean {}?",
                prefix.trunc()
            ),
        ));
    }
    let ula: Ipv6Net = "fc00::/7".parse().unwrap_or_default();
    if !ula.contains(&prefix) {
        return Err(invalid(
            key,
            format!("{prefix} is not a unique local prefix (fc00::/7), e.g. \"fdaa:0:1::/48\""),
        ));
    }
    if !(16..=64).contains(&prefix.prefix_len()) {
        return Err(invalid(
            key,
            format!("{prefix}: use a prefix of /16 to /64 (/48 is usual)"),
        ));
    }
    Ok(prefix)
}

/// `ip:port`, `[ip6]:port`, or a bare address (port 53).
fn upstream(invalid: &Invalid, key: String, value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(s) = value.parse::<SocketAddr>() {
        return Ok(s);
    }
    value
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
        .map_err(|_| {
            invalid(
                key,
                format!("{value:?} is not an address or address:port (e.g. \"198.18.0.53:53\")"),
            )
        })
}

/// Names, interfaces, ports and prefixes are each one network's own.
fn check_no_clash(
    i: usize,
    n: &NetworkConfig,
    before: &[NetworkConfig],
    invalid: &Invalid,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("network[{i}].{k}");
    for (j, other) in before.iter().enumerate() {
        let clash = |what: &str| {
            invalid(
                key(what),
                format!("is the same as network[{j}].{what} ({})", other.name),
            )
        };
        if other.name == n.name {
            return Err(clash("name"));
        }
        if other.wg_interface == n.wg_interface {
            return Err(clash("wg_interface"));
        }
        if other.listen_port == n.listen_port {
            return Err(clash("listen_port"));
        }
        if other.prefix.contains(&n.prefix) || n.prefix.contains(&other.prefix) {
            return Err(invalid(
                key("prefix"),
                format!("{} overlaps network[{j}].prefix {}", n.prefix, other.prefix),
            ));
        }
    }
    Ok(())
}

/// A network's WireGuard interface and port are not an egress's.
fn check_no_egress_clash(
    i: usize,
    n: &NetworkConfig,
    egresses: &[EgressConfig],
    invalid: &Invalid,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("network[{i}].{k}");
    for (j, e) in egresses.iter().enumerate() {
        if e.wg_interface == n.wg_interface || e.interface == n.wg_interface {
            return Err(invalid(
                key("wg_interface"),
                format!(
                    "{} is already egress[{j}]'s interface ({})",
                    n.wg_interface, e.name
                ),
            ));
        }
        if e.listen_port == n.listen_port {
            return Err(invalid(
                key("listen_port"),
                format!(
                    "{} is already egress[{j}].listen_port ({})",
                    n.listen_port, e.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::Config;
    use super::NetworkConfig;
    use std::path::Path;
    use wgexit::net::IfName;

    /// A network as tests of other modules need one.
    pub fn network(name: &str, prefix: &str, wg: &str) -> NetworkConfig {
        NetworkConfig {
            name: name.into(),
            prefix: prefix.parse().unwrap(),
            wg_interface: IfName::new(wg).unwrap(),
            listen_port: 51830,
            endpoint: "198.51.100.2:51830".parse().unwrap(),
            token_file: "/dev/null".into(),
            dns_upstream: Vec::new(),
            mtu: 1420,
            endpoint_interface: None,
        }
    }

    use crate::config::tests::VALID as BASE;

    const NETWORK: &str = r#"
[[network]]
name = "acme"
prefix = "fdaa:0:1::/48"
wg_interface = "wgn-acme"
listen_port = 51830
endpoint = "198.51.100.2:51830"
token_file = "/etc/wgexitd/acme-net.tokens"
dns_upstream = ["198.18.0.53:53", "2001:db8::53"]
"#;

    fn err(text: &str) -> String {
        Config::parse(Path::new("t.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(Path::new("t.toml"), &format!("{BASE}{NETWORK}")).unwrap();
        let n = &c.network[0];
        assert_eq!(n.name, "acme");
        assert_eq!(n.gateway().to_string(), "fdaa:0:1::1");
        assert_eq!(n.dns().to_string(), "fdaa:0:1::3");
        assert_eq!(
            n.dns_upstream,
            vec![
                "198.18.0.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
        assert_eq!(c.network("acme"), Some(n));
    }

    #[test]
    fn a_network_in_a_pool_says_where_its_endpoint_floats() {
        let cluster = "[cluster]\nname = \"eu-1\"\nnode = \"exit-a\"\n\
                       etcd = [\"http://127.0.0.1:2379\"]\nsecret_file = \"/etc/wgexitd/pool.secret\"\n";
        let pooled = BASE.replace(
            "[[egress]]\n",
            "[[egress]]\nendpoint_interface = \"core0\"\n",
        );
        // Without endpoint_interface the network's leader could not hold its endpoint.
        let e = err(&format!("{pooled}{NETWORK}{cluster}"));
        assert!(e.contains("network[0].endpoint_interface"), "{e}");
        let floating = NETWORK.replace(
            "listen_port = 51830\n",
            "listen_port = 51830\nendpoint_interface = \"core0\"\n",
        );
        let c =
            Config::parse(Path::new("t.toml"), &format!("{pooled}{floating}{cluster}")).unwrap();
        assert_eq!(
            c.network[0].endpoint_interface.as_ref().map(|i| i.as_str()),
            Some("core0")
        );
        // Alone it means nothing, and a typo is not ignored.
        let e = err(&format!("{BASE}{floating}"));
        assert!(e.contains("network[0].endpoint_interface"), "{e}");
    }

    #[test]
    fn a_network_alone_is_a_whole_config() {
        let no_egress = BASE.split("[[egress]]").next().unwrap();
        let c = Config::parse(Path::new("t.toml"), &format!("{no_egress}{NETWORK}")).unwrap();
        assert!(c.egress.is_empty());
        assert!(err(no_egress).contains("[[network]]"));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("fdaa:0:1::/48", "fdaa:0:1::5/48", "network[0].prefix"),
            ("fdaa:0:1::/48", "2001:db8::/48", "network[0].prefix"),
            ("fdaa:0:1::/48", "fdaa::/96", "network[0].prefix"),
            ("fdaa:0:1::/48", "10.0.0.0/8", "network[0].prefix"),
            ("wgn-acme", "wgx-acme", "network[0].wg_interface"),
            ("wgn-acme", "isp0", "network[0].wg_interface"),
            (
                "listen_port = 51830",
                "listen_port = 51820",
                "network[0].listen_port",
            ),
            ("\"2001:db8::53\"", "\"nowhere\"", "network[0].dns_upstream"),
            (
                "name = \"acme\"\nprefix",
                "name = \"a b\"\nprefix",
                "network[0].name",
            ),
            ("dns_upstream", "typo = 1\ndns_upstream", "typo"),
        ];
        for (from, to, key) in cases {
            let msg = err(&format!("{BASE}{}", NETWORK.replace(from, to)));
            assert!(msg.contains(key), "{to:?}: {msg:?} should name {key}");
        }
    }

    #[test]
    fn networks_do_not_clash_with_each_other() {
        let second = NETWORK
            .replace("name = \"acme\"", "name = \"beta\"")
            .replace("wgn-acme", "wgn-beta")
            .replace("51830", "51831");
        let msg = err(&format!("{BASE}{NETWORK}{second}"));
        assert!(msg.contains("network[1].prefix"), "{msg}");
        let second = second.replace("fdaa:0:1::/48", "fdaa:0:2::/48");
        let c = Config::parse(Path::new("t.toml"), &format!("{BASE}{NETWORK}{second}")).unwrap();
        assert_eq!(c.network.len(), 2);
        let same_name = second.replace("name = \"beta\"", "name = \"acme\"");
        assert!(err(&format!("{BASE}{NETWORK}{same_name}")).contains("network[1].name"));
    }
}
