//! `wgexitd`'s TOML config: parsed, then checked, with errors that name the key.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::api::valid_egress_name;
use crate::exit::policy::{Policy, Rule, Verdict};
use crate::wg::BackendKind;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The config as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    #[serde(default)]
    backend: BackendKind,
    api: RawApi,
    #[serde(default)]
    egress: Vec<RawEgress>,
    #[serde(default)]
    peer_timeout: Option<u64>,
    #[serde(default)]
    first_handshake_timeout: Option<u64>,
    #[serde(default)]
    persistent_keepalive: Option<u16>,
    #[serde(default)]
    reconcile_interval: Option<u64>,
    #[serde(default)]
    collect_interval: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: String,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    /// Extra names or addresses for the generated server certificate.
    #[serde(default)]
    san: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    name: String,
    ip: String,
    interface: String,
    pool: String,
    wg_interface: String,
    listen_port: u16,
    endpoint: String,
    token_file: PathBuf,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    policy: Option<RawPolicy>,
}

/// `[egress.policy]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    private: Option<String>,
    default: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// A checked config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub backend: BackendKind,
    pub api: ApiConfig,
    pub egress: Vec<EgressConfig>,
    /// A lease whose peer has not completed a handshake for this long is collected.
    pub peer_timeout: Duration,
    /// A lease whose peer never completed a handshake is collected after this.
    pub first_handshake_timeout: Duration,
    /// Keepalive handed to clients, seconds.
    pub persistent_keepalive: u16,
    /// How often devices are checked against the store while running.
    pub reconcile_interval: Duration,
    /// How often idle leases are looked for.
    pub collect_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Certificate and key files; when absent, generated under `state_dir/tls`.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    pub san: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    pub name: String,
    pub ip: Ipv4Addr,
    pub interface: String,
    pub pool: Ipv4Net,
    pub wg_interface: String,
    pub listen_port: u16,
    pub endpoint: SocketAddr,
    pub token_file: PathBuf,
    pub mtu: u32,
    pub policy: Policy,
}

impl EgressConfig {
    /// The exit node's own address in the pool: the network's first host.
    pub fn overlay_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pool.network()) + 1)
    }
}

pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_FIRST_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_KEEPALIVE: u16 = 25;
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_COLLECT_INTERVAL: Duration = Duration::from_secs(15);
pub const DEFAULT_MTU: u32 = 1420;

/// Linux interface names: 1..=15 bytes, no '/', whitespace or ':'.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// `[egress.policy]`, checked; `key` is the policy's key (`egress[0].policy`).
fn policy(
    raw: Option<RawPolicy>,
    key: &str,
    invalid: &impl Fn(String, String) -> ConfigError,
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

struct Timers {
    peer_timeout: Duration,
    first_handshake_timeout: Duration,
    persistent_keepalive: u16,
    reconcile_interval: Duration,
    collect_interval: Duration,
}

/// The collection and reconcile timers, checked against each other: a live container's
/// keepalives must come often enough that it is never taken for idle.
fn timers(
    raw: &RawConfig,
    invalid: &impl Fn(String, String) -> ConfigError,
) -> Result<Timers, ConfigError> {
    let secs = |key: &str, v: Option<u64>, default: Duration| match v {
        Some(0) => Err(invalid(key.into(), "must be at least 1 (seconds)".into())),
        Some(n) => Ok(Duration::from_secs(n)),
        None => Ok(default),
    };
    let peer_timeout = secs("peer_timeout", raw.peer_timeout, DEFAULT_PEER_TIMEOUT)?;
    let first_handshake_timeout = secs(
        "first_handshake_timeout",
        raw.first_handshake_timeout,
        DEFAULT_FIRST_HANDSHAKE_TIMEOUT,
    )?;
    let reconcile_interval = secs(
        "reconcile_interval",
        raw.reconcile_interval,
        DEFAULT_RECONCILE_INTERVAL,
    )?;
    let collect_interval = secs(
        "collect_interval",
        raw.collect_interval,
        DEFAULT_COLLECT_INTERVAL,
    )?;
    let persistent_keepalive = raw.persistent_keepalive.unwrap_or(DEFAULT_KEEPALIVE);
    if persistent_keepalive == 0 {
        return Err(invalid(
            "persistent_keepalive".into(),
            "must be at least 1: idle containers are kept alive by their keepalives, or collected"
                .into(),
        ));
    }
    if peer_timeout.as_secs() <= 2 * u64::from(persistent_keepalive) {
        return Err(invalid(
            "peer_timeout".into(),
            format!(
                "{} s must be more than twice persistent_keepalive ({persistent_keepalive} s), or live containers would be collected",
                peer_timeout.as_secs()
            ),
        ));
    }
    Ok(Timers {
        peer_timeout,
        first_handshake_timeout,
        persistent_keepalive,
        reconcile_interval,
        collect_interval,
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };

        let timers = timers(&raw, &invalid)?;
        if !raw.state_dir.is_absolute() {
            return Err(invalid(
                "state_dir".into(),
                format!("{:?} must be an absolute path", raw.state_dir),
            ));
        }
        let listen: SocketAddr = raw.api.listen.parse().map_err(|_| {
            invalid(
                "api.listen".into(),
                format!(
                    "{:?} is not an address:port (e.g. \"198.51.100.2:7443\")",
                    raw.api.listen
                ),
            )
        })?;
        let tls_files = match (raw.api.cert, raw.api.key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "api.key".into(),
                    "api.cert is set, so api.key must be set too".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "api.cert".into(),
                    "api.key is set, so api.cert must be set too".into(),
                ))
            }
        };
        if raw.egress.is_empty() {
            return Err(invalid(
                "egress".into(),
                "at least one [[egress]] table is needed".into(),
            ));
        }

        let mut egress: Vec<EgressConfig> = Vec::new();
        for (i, e) in raw.egress.into_iter().enumerate() {
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
            let ip: Ipv4Addr = e.ip.parse().map_err(|_| {
                invalid(
                    key("ip"),
                    format!("{:?} is not an IPv4 address (e.g. \"203.0.113.77\")", e.ip),
                )
            })?;
            if !valid_ifname(&e.interface) {
                return Err(invalid(
                    key("interface"),
                    format!("{:?} is not a valid interface name", e.interface),
                ));
            }
            let pool: Ipv4Net = e.pool.parse().map_err(|_| {
                invalid(
                    key("pool"),
                    format!(
                        "{:?} is not an IPv4 network (e.g. \"100.96.0.0/20\")",
                        e.pool
                    ),
                )
            })?;
            if pool != pool.trunc() {
                return Err(invalid(
                    key("pool"),
                    format!("{pool} has host bits set; did you mean {}?", pool.trunc()),
                ));
            }
            if pool.prefix_len() > 29 {
                return Err(invalid(
                    key("pool"),
                    format!("{pool} is too small: use a /29 or larger"),
                ));
            }
            if !valid_ifname(&e.wg_interface) {
                return Err(invalid(
                    key("wg_interface"),
                    format!(
                        "{:?} is not a valid interface name (1-15 characters)",
                        e.wg_interface
                    ),
                ));
            }
            if e.listen_port == 0 {
                return Err(invalid(key("listen_port"), "must not be 0".into()));
            }
            let endpoint: SocketAddr = e.endpoint.parse().map_err(|_| {
                invalid(
                    key("endpoint"),
                    format!(
                        "{:?} is not an address:port (e.g. \"198.51.100.2:51820\")",
                        e.endpoint
                    ),
                )
            })?;
            let mtu = e.mtu.unwrap_or(DEFAULT_MTU);
            if !(1280..=9000).contains(&mtu) {
                return Err(invalid(key("mtu"), format!("{mtu} is outside 1280..=9000")));
            }
            for (j, other) in egress.iter().enumerate() {
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
                if other.pool.contains(&pool) || pool.contains(&other.pool) {
                    return Err(invalid(
                        key("pool"),
                        format!("{pool} overlaps egress[{j}].pool {}", other.pool),
                    ));
                }
            }
            let policy = policy(e.policy, &key("policy"), &invalid)?;
            egress.push(EgressConfig {
                name: e.name,
                ip,
                interface: e.interface,
                pool,
                wg_interface: e.wg_interface,
                listen_port: e.listen_port,
                endpoint,
                token_file: e.token_file,
                mtu,
                policy,
            });
        }
        if let IpAddr::V4(a) = listen.ip() {
            if let Some(e) = egress.iter().find(|e| e.pool.contains(&a)) {
                return Err(invalid(
                    "api.listen".into(),
                    format!("{a} lies inside egress {}'s pool {}", e.name, e.pool),
                ));
            }
        }

        Ok(Config {
            path: path.to_path_buf(),
            state_dir: raw.state_dir,
            backend: raw.backend,
            api: ApiConfig {
                listen,
                tls_files,
                san: raw.api.san,
            },
            egress,
            peer_timeout: timers.peer_timeout,
            first_handshake_timeout: timers.first_handshake_timeout,
            persistent_keepalive: timers.persistent_keepalive,
            reconcile_interval: timers.reconcile_interval,
            collect_interval: timers.collect_interval,
        })
    }

    pub fn egress(&self, name: &str) -> Option<&EgressConfig> {
        self.egress.iter().find(|e| e.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
state_dir = "/var/lib/wgexitd"
backend = "userspace"

[api]
listen = "198.51.100.2:7443"

[[egress]]
name = "acme"
ip = "203.0.113.77"
interface = "isp0"
pool = "100.96.0.0/20"
wg_interface = "wgx-acme"
listen_port = 51820
endpoint = "198.51.100.2:51820"
token_file = "/etc/wgexitd/acme.tokens"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_documented_example() {
        let c = parse(VALID).unwrap();
        assert_eq!(c.backend, BackendKind::Userspace);
        assert_eq!(c.api.listen, "198.51.100.2:7443".parse().unwrap());
        assert_eq!(c.api.tls_files, None);
        let e = &c.egress[0];
        assert_eq!(e.overlay_ip(), Ipv4Addr::new(100, 96, 0, 1));
        assert_eq!(e.mtu, DEFAULT_MTU);
        assert_eq!(c.peer_timeout, DEFAULT_PEER_TIMEOUT);
        assert_eq!(c.collect_interval, DEFAULT_COLLECT_INTERVAL);
        assert_eq!(c.reconcile_interval, DEFAULT_RECONCILE_INTERVAL);
    }

    #[test]
    fn timers_can_be_short_but_must_fit_the_keepalive() {
        let short = format!(
            "peer_timeout = 4\nfirst_handshake_timeout = 2\npersistent_keepalive = 1\ncollect_interval = 1\nreconcile_interval = 1\n{VALID}"
        );
        let c = parse(&short).unwrap();
        assert_eq!(c.peer_timeout, Duration::from_secs(4));
        assert_eq!(c.first_handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.collect_interval, Duration::from_secs(1));
        for (text, key) in [
            ("peer_timeout = 50\n", "peer_timeout"),
            ("persistent_keepalive = 0\n", "persistent_keepalive"),
            ("collect_interval = 0\n", "collect_interval"),
            ("first_handshake_timeout = 0\n", "first_handshake_timeout"),
        ] {
            let msg = err(&format!("{text}{VALID}"));
            assert!(msg.contains(key), "{text:?}: {msg}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("ip = \"203.0.113.77\"", "ip = \"nope\"", "egress[0].ip"),
            (
                "pool = \"100.96.0.0/20\"",
                "pool = \"100.96.0.1/20\"",
                "egress[0].pool",
            ),
            (
                "pool = \"100.96.0.0/20\"",
                "pool = \"100.96.0.0/31\"",
                "egress[0].pool",
            ),
            (
                "wg_interface = \"wgx-acme\"",
                "wg_interface = \"much-too-long-name\"",
                "egress[0].wg_interface",
            ),
            (
                "endpoint = \"198.51.100.2:51820\"",
                "endpoint = \"198.51.100.2\"",
                "egress[0].endpoint",
            ),
            (
                "listen = \"198.51.100.2:7443\"",
                "listen = \"nowhere\"",
                "api.listen",
            ),
            (
                "state_dir = \"/var/lib/wgexitd\"",
                "state_dir = \"relative\"",
                "state_dir",
            ),
            ("backend = \"userspace\"", "backend = \"bogus\"", "backend"),
            ("listen_port = 51820", "listen_port = 70000", "listen_port"),
            ("name = \"acme\"", "name = \"a/b\"", "egress[0].name"),
            (
                "listen_port = 51820",
                "listen_port = 51820\ntypo_key = 1",
                "typo_key",
            ),
        ];
        for (from, to, key) in cases {
            let msg = err(&VALID.replace(from, to));
            assert!(msg.contains(key), "{to:?}: {msg:?} should name {key}");
        }
    }

    #[test]
    fn policy_is_parsed_and_bad_rules_are_named() {
        assert_eq!(parse(VALID).unwrap().egress[0].policy, Policy::default());
        let with = format!(
            "{VALID}\n[egress.policy]\nprivate = \"allow\"\ndefault = \"deny\"\n\
             allow = [\"198.18.9.0/24 tcp/443\"]\ndeny = [\"tcp/25\", \"2001:db8:bad::/48\"]\n"
        );
        let p = parse(&with).unwrap().egress[0].policy.clone();
        assert_eq!(p.private, Verdict::Allow);
        assert_eq!(p.default, Verdict::Deny);
        assert_eq!(p.allow, vec!["198.18.9.0/24 tcp/443".parse().unwrap()]);
        assert_eq!(p.deny.len(), 2);
        for (bad, key) in [
            (
                "deny = [\"tcp/25\", \"198.18.7.1/24\"]",
                "egress[0].policy.deny[1]",
            ),
            ("allow = [\"udp/9-1\"]", "egress[0].policy.allow[0]"),
            ("private = \"maybe\"", "egress[0].policy.private"),
            ("default = \"no\"", "egress[0].policy.default"),
            ("typo = 1", "typo"),
        ] {
            let msg = err(&format!("{VALID}\n[egress.policy]\n{bad}\n"));
            assert!(msg.contains(key), "{bad}: {msg}");
        }
        let msg = err(&format!(
            "{VALID}\n[egress.policy]\ndeny = [\"tcp/25\", \"198.18.7.1/24\"]\n"
        ));
        assert!(
            msg.contains("198.18.7.1/24") && msg.contains("host bits"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_missing_and_clashing_egresses() {
        let no_egress = VALID.split("[[egress]]").next().unwrap();
        assert!(err(no_egress).contains("egress"));
        let missing = VALID.replace("token_file = \"/etc/wgexitd/acme.tokens\"\n", "");
        assert!(err(&missing).contains("token_file"));
        let second = VALID
            .split_once("[[egress]]")
            .unwrap()
            .1
            .replace("acme", "other");
        let two = format!("{VALID}\n[[egress]]{second}");
        assert!(err(&two).contains("egress[1].listen_port"));
        let two = two.replace("listen_port = 51820\nendpoint = \"198.51.100.2:51820\"\ntoken_file = \"/etc/wgexitd/other", "listen_port = 51821\nendpoint = \"198.51.100.2:51821\"\ntoken_file = \"/etc/wgexitd/other");
        assert!(err(&two).contains("egress[1].pool"), "{}", err(&two));
    }
}
