//! `[cluster]`: a pool of exit nodes sharing leases, identities and the CA in etcd.
//!
//! Without the table the daemon runs alone on its embedded store. With it, `node` names
//! this member, `etcd` lists the cluster's client URLs, `leader_ttl` bounds how long a
//! silent leader keeps its egresses, `takeover_after_ms` how long a leader's pulse may be
//! silent before another member takes its egresses over (see `cluster::pulse`), and `float` says how an egress's addresses follow its
//! leader: the leader adds them itself (`address`) or runs the hooks (`hooks`).
//!
//! etcd is reached over TLS: `https://` endpoints verified against `etcd_ca`, with this
//! member's client certificate (`etcd_cert`, `etcd_key`) for etcd's `--client-cert-auth`.
//! Plain `http://` is accepted only to an etcd on this machine's loopback (it never crosses
//! a network), and the daemon warns about it at start. `secret_file` seals the private keys
//! the pool keeps in etcd and signs every record members write (see `cluster::secret`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, EgressConfig, Invalid, NetworkConfig};
use wgexit::api::valid_egress_name;

pub const DEFAULT_LEADER_TTL: Duration = Duration::from_secs(2);
/// How long a leader's pulse may be silent before another member takes over.
pub const DEFAULT_TAKEOVER_AFTER: Duration = Duration::from_millis(400);
/// The shortest `takeover_after_ms`: a pulse every fifth of it, at most 20 a second.
const MIN_TAKEOVER_AFTER_MS: u64 = 250;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    name: String,
    node: String,
    etcd: Vec<String>,
    #[serde(default)]
    etcd_ca: Option<PathBuf>,
    #[serde(default)]
    etcd_cert: Option<PathBuf>,
    #[serde(default)]
    etcd_key: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    #[serde(default)]
    leader_ttl: Option<u64>,
    #[serde(default)]
    takeover_after_ms: Option<u64>,
    #[serde(default)]
    float: Option<String>,
    #[serde(default)]
    on_acquire: Option<PathBuf>,
    #[serde(default)]
    on_release: Option<PathBuf>,
}

/// How an egress's addresses move to its leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Float {
    /// The leader adds the egress IPs (on `interface`) and the endpoint address (on
    /// `endpoint_interface`) and announces them.
    Address,
    /// The leader only runs these programs (e.g. to move a cloud provider's IP).
    Hooks {
        on_acquire: PathBuf,
        on_release: PathBuf,
    },
}

/// How this member proves itself to etcd and checks etcd's certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that issued the etcd servers' certificates.
    pub ca: PathBuf,
    /// This member's client certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Members share everything under `/wgexit/<name>/`.
    pub name: String,
    /// This member, unique in the pool.
    pub node: String,
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// TLS to etcd; `None` only for `http://` endpoints on loopback.
    pub etcd_tls: Option<EtcdTls>,
    /// The pool's secret, the same on every member.
    pub secret_file: PathBuf,
    /// How long a silent leader keeps its egresses.
    pub leader_ttl: Duration,
    /// How long a leader's pulse may be silent before another member takes over (never
    /// more than `leader_ttl`: the lease's expiry ends a leadership anyway).
    pub takeover_after: Duration,
    pub float: Float,
}

impl ClusterConfig {
    /// The etcd key prefix of this pool, ending in '/'.
    pub fn prefix(&self) -> String {
        format!("/wgexit/{}/", self.name)
    }
}

pub(super) fn cluster(raw: RawCluster, invalid: &Invalid) -> Result<ClusterConfig, ConfigError> {
    let key = |k: &str| format!("cluster.{k}");
    for (k, v) in [("name", &raw.name), ("node", &raw.node)] {
        if !valid_egress_name(v) {
            return Err(invalid(
                key(k),
                format!("{v:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"),
            ));
        }
    }
    if raw.etcd.is_empty() {
        return Err(invalid(
            key("etcd"),
            "list at least one etcd client URL (e.g. \"http://198.51.100.21:2379\")".into(),
        ));
    }
    let etcd_tls = etcd_tls(&raw, invalid)?;
    let Some(secret_file) = raw.secret_file.clone() else {
        return Err(invalid(
            key("secret_file"),
            "name the pool's secret (the same file on every member, mode 0600), e.g. made with `openssl rand -base64 48`".into(),
        ));
    };
    let leader_ttl = match raw.leader_ttl {
        None => DEFAULT_LEADER_TTL,
        Some(n) if (1..=60).contains(&n) => Duration::from_secs(n),
        Some(n) => {
            return Err(invalid(
                key("leader_ttl"),
                format!("{n} is outside 1..=60 (seconds)"),
            ))
        }
    };
    let takeover_after = takeover_after(raw.takeover_after_ms, leader_ttl, invalid)?;
    let float = match (raw.float.as_deref(), raw.on_acquire, raw.on_release) {
        (None | Some("address"), None, None) => Float::Address,
        (None | Some("address"), _, _) => {
            return Err(invalid(
                key("on_acquire"),
                "hooks run only with float = \"hooks\"".into(),
            ))
        }
        (Some("hooks"), Some(on_acquire), Some(on_release)) => Float::Hooks {
            on_acquire,
            on_release,
        },
        (Some("hooks"), None, _) => {
            return Err(invalid(
                key("on_acquire"),
                "float = \"hooks\" needs on_acquire and on_release".into(),
            ))
        }
        (Some("hooks"), _, None) => {
            return Err(invalid(
                key("on_release"),
                "float = \"hooks\" needs on_acquire and on_release".into(),
            ))
        }
        (Some(other), _, _) => {
            return Err(invalid(
                key("float"),
                format!("{other:?} is not \"address\" or \"hooks\""),
            ))
        }
    };
    Ok(ClusterConfig {
        name: raw.name,
        node: raw.node,
        etcd: raw.etcd,
        etcd_tls,
        secret_file,
        leader_ttl,
        takeover_after,
        float,
    })
}

/// `takeover_after_ms`: at least [`MIN_TAKEOVER_AFTER_MS`], at most `leader_ttl`.
fn takeover_after(
    ms: Option<u64>,
    leader_ttl: Duration,
    invalid: &Invalid,
) -> Result<Duration, ConfigError> {
    let Some(ms) = ms else {
        return Ok(DEFAULT_TAKEOVER_AFTER.min(leader_ttl));
    };
    let most = leader_ttl.as_millis() as u64;
    if (MIN_TAKEOVER_AFTER_MS..=most).contains(&ms) {
        return Ok(Duration::from_millis(ms));
    }
    Err(invalid(
        "cluster.takeover_after_ms".into(),
        format!(
            "{ms} is outside {MIN_TAKEOVER_AFTER_MS}..={most} (milliseconds, at most leader_ttl)"
        ),
    ))
}

/// The scheme and host of an etcd client URL `SCHEME://HOST:PORT`.
fn url_parts(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (host, port) = rest.rsplit_once(':')?;
    if host.is_empty() || rest.contains('/') || port.parse::<u16>().is_err() {
        return None;
    }
    Some((scheme, host))
}

fn loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `https://` endpoints with `etcd_ca`, `etcd_cert` and `etcd_key`; or `http://` ones on
/// loopback without them.
fn etcd_tls(raw: &RawCluster, invalid: &Invalid) -> Result<Option<EtcdTls>, ConfigError> {
    let key = |k: &str| format!("cluster.{k}");
    let mut plain = 0;
    for url in &raw.etcd {
        match url_parts(url) {
            Some(("https", _)) => {}
            Some(("http", host)) if loopback(host) => plain += 1,
            Some(("http", _)) => {
                return Err(invalid(
                    key("etcd"),
                    format!("{url:?}: etcd is reached over TLS (\"https://HOST:PORT\" with etcd_ca, etcd_cert and etcd_key); plain http:// only to an etcd on loopback"),
                ))
            }
            _ => {
                return Err(invalid(
                    key("etcd"),
                    format!("{url:?} is not an etcd client URL of the form \"https://HOST:PORT\""),
                ))
            }
        }
    }
    let files = [
        ("etcd_ca", &raw.etcd_ca),
        ("etcd_cert", &raw.etcd_cert),
        ("etcd_key", &raw.etcd_key),
    ];
    if plain > 0 {
        if plain < raw.etcd.len() {
            return Err(invalid(
                key("etcd"),
                "mixes http:// and https:// endpoints; use https:// for all".into(),
            ));
        }
        if let Some((k, _)) = files.iter().find(|(_, v)| v.is_some()) {
            return Err(invalid(
                key(k),
                "is only used with https:// endpoints".into(),
            ));
        }
        return Ok(None);
    }
    if let Some((k, _)) = files.iter().find(|(_, v)| v.is_none()) {
        return Err(invalid(
            key(k),
            "https:// endpoints need etcd_ca (verifies etcd's certificates), etcd_cert and etcd_key (this member's client certificate)".into(),
        ));
    }
    Ok(Some(EtcdTls {
        ca: raw.etcd_ca.clone().unwrap_or_default(),
        cert: raw.etcd_cert.clone().unwrap_or_default(),
        key: raw.etcd_key.clone().unwrap_or_default(),
    }))
}

/// In a pool with `float = "address"` every egress and network says where its endpoint
/// floats; without a pool `endpoint_interface` means nothing and is refused, so a typo is
/// not ignored.
pub(super) fn check_endpoint_interfaces(
    cluster: Option<&ClusterConfig>,
    egress: &[EgressConfig],
    network: &[NetworkConfig],
    invalid: &Invalid,
) -> Result<(), ConfigError> {
    let egresses = egress
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("egress[{i}]"), e.endpoint_interface.is_some()));
    let networks = network
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("network[{i}]"), n.endpoint_interface.is_some()));
    for (table, named) in egresses.chain(networks) {
        let key = format!("{table}.endpoint_interface");
        match (cluster.map(|c| &c.float), named) {
            (Some(Float::Address), false) => {
                return Err(invalid(
                    key,
                    "a pool member with float = \"address\" adds the endpoint's address itself: name the interface it goes on".into(),
                ))
            }
            (None, true) => {
                return Err(invalid(
                    key,
                    "is only used in a pool (with a [cluster] table)".into(),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
state_dir = "/var/lib/wgexitd"
[api]
listen = "198.51.100.11:7443"
[[egress]]
name = "acme"
ip = "203.0.113.77"
interface = "isp0"
pool = "100.96.0.0/20"
wg_interface = "wgx-acme"
listen_port = 51820
endpoint = "198.51.100.2:51820"
token_file = "/etc/wgexitd/acme.tokens"
endpoint_interface = "core0"
[cluster]
name = "eu-1"
node = "exit-a"
etcd = ["https://198.51.100.21:2379", "https://198.51.100.22:2379"]
etcd_ca = "/etc/wgexitd/etcd-ca.pem"
etcd_cert = "/etc/wgexitd/etcd-client.pem"
etcd_key = "/etc/wgexitd/etcd-client.key"
secret_file = "/etc/wgexitd/pool.secret"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(std::path::Path::new("t.toml"), text)
    }

    #[test]
    fn parses_a_pool_member_with_defaults() {
        let c = parse(BASE).unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.prefix(), "/wgexit/eu-1/");
        assert_eq!(cluster.node, "exit-a");
        assert_eq!(cluster.etcd.len(), 2);
        assert_eq!(cluster.leader_ttl, DEFAULT_LEADER_TTL);
        assert_eq!(cluster.takeover_after, DEFAULT_TAKEOVER_AFTER);
        assert_eq!(cluster.float, Float::Address);
        assert_eq!(
            cluster.secret_file,
            PathBuf::from("/etc/wgexitd/pool.secret")
        );
        assert_eq!(
            cluster.etcd_tls,
            Some(EtcdTls {
                ca: "/etc/wgexitd/etcd-ca.pem".into(),
                cert: "/etc/wgexitd/etcd-client.pem".into(),
                key: "/etc/wgexitd/etcd-client.key".into(),
            })
        );
        assert_eq!(
            c.egress[0].endpoint_interface.as_ref().unwrap().as_str(),
            "core0"
        );
        let hooks = format!(
            "{BASE}float = \"hooks\"\non_acquire = \"/a\"\non_release = \"/r\"\nleader_ttl = 5\ntakeover_after_ms = 800\n"
        );
        let cluster = parse(&hooks).unwrap().cluster.unwrap();
        assert_eq!(cluster.leader_ttl, Duration::from_secs(5));
        assert_eq!(cluster.takeover_after, Duration::from_millis(800));
        assert_eq!(
            cluster.float,
            Float::Hooks {
                on_acquire: "/a".into(),
                on_release: "/r".into()
            }
        );
    }

    #[test]
    fn errors_name_the_key() {
        let alone = BASE.split("[cluster]").next().unwrap().to_string();
        for (text, key) in [
            (format!("{BASE}leader_ttl = 0\n"), "cluster.leader_ttl"),
            (
                format!("{BASE}takeover_after_ms = 100\n"),
                "cluster.takeover_after_ms",
            ),
            (
                format!("{BASE}leader_ttl = 1\ntakeover_after_ms = 1500\n"),
                "cluster.takeover_after_ms",
            ),
            (format!("{BASE}float = \"bgp\"\n"), "cluster.float"),
            (
                format!("{BASE}float = \"hooks\"\non_release = \"/r\"\n"),
                "cluster.on_acquire",
            ),
            (
                format!("{BASE}float = \"hooks\"\non_acquire = \"/a\"\n"),
                "cluster.on_release",
            ),
            (format!("{BASE}on_acquire = \"/a\"\n"), "cluster.on_acquire"),
            (
                BASE.replace("node = \"exit-a\"", "node = \"a b\""),
                "cluster.node",
            ),
            (
                BASE.replace("https://198.51.100.22:2379", "198.51.100.22"),
                "cluster.etcd",
            ),
            (BASE.replace("etcd = [", "etcd = [] #"), "cluster.etcd"),
            (
                BASE.replace("endpoint_interface = \"core0\"\n", ""),
                "egress[0].endpoint_interface",
            ),
            (alone, "egress[0].endpoint_interface"),
            (format!("{BASE}typo = 1\n"), "typo"),
        ] {
            let msg = parse(&text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text}: {msg:?} should name {key}");
        }
    }

    /// etcd is reached over TLS with a client certificate; plaintext only on loopback.
    #[test]
    fn etcd_needs_tls_and_the_pool_a_secret() {
        let plain = BASE
            .replace("https://198.51.100.21:2379", "http://198.51.100.21:2379")
            .replace("https://198.51.100.22:2379", "http://198.51.100.22:2379");
        let without = |k: &str| {
            BASE.lines()
                .filter(|l| !l.starts_with(&format!("{k} =")))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let local = without("etcd_ca")
            .replace("\netcd_cert", "\n#")
            .replace("\netcd_key", "\n#")
            .replace(
                "\"https://198.51.100.21:2379\", \"https://198.51.100.22:2379\"",
                "\"http://127.0.0.1:2379\", \"http://[::1]:2379\"",
            );
        let cluster = parse(&local).unwrap().cluster.unwrap();
        assert_eq!(cluster.etcd_tls, None);
        for (text, key, says) in [
            (plain, "cluster.etcd", "over TLS"),
            (without("etcd_ca"), "cluster.etcd_ca", "need etcd_ca"),
            (
                without("etcd_cert"),
                "cluster.etcd_cert",
                "client certificate",
            ),
            (
                without("etcd_key"),
                "cluster.etcd_key",
                "client certificate",
            ),
            (without("secret_file"), "cluster.secret_file", "0600"),
            (
                local.replace("http://[::1]:2379", "https://198.51.100.22:2379"),
                "cluster.etcd",
                "mixes",
            ),
            (
                format!("{local}\netcd_ca = \"/ca.pem\"\n"),
                "cluster.etcd_ca",
                "only used with https",
            ),
        ] {
            let msg = parse(&text).unwrap_err().to_string();
            assert!(
                msg.contains(key) && msg.contains(says),
                "{text}: {msg:?} should name {key} and say {says:?}"
            );
        }
    }
}
