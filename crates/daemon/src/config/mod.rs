//! `wgexitd`'s TOML config: parsed, then checked, with errors that name the key. One module
//! per kind of table: [`egress`], [`policy`], [`cluster`], [`network`], [`metrics`].

pub mod cluster;
pub mod egress;
pub mod egress6;
pub mod metrics;
pub mod network;
pub mod policy;
pub mod quota;

pub use cluster::ClusterConfig;
pub use egress::EgressConfig;
pub use metrics::MetricsConfig;
pub use network::NetworkConfig;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use wgexit::net::IfName;
use wgexit::wg::BackendKind;

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
    metrics: Option<metrics::RawMetrics>,
    #[serde(default)]
    egress: Vec<egress::RawEgress>,
    #[serde(default)]
    network: Vec<network::RawNetwork>,
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
    #[serde(default)]
    max_leases_per_owner: Option<usize>,
    #[serde(default)]
    attribution_days: Option<u32>,
    cluster: Option<cluster::RawCluster>,
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
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    header_timeout: Option<u64>,
    #[serde(default)]
    idle_timeout: Option<u64>,
}

/// A checked config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub backend: BackendKind,
    pub api: ApiConfig,
    /// `[metrics]`: where `/metrics` is served, if anywhere.
    pub metrics: Option<MetricsConfig>,
    pub egress: Vec<EgressConfig>,
    pub network: Vec<NetworkConfig>,
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
    /// Most leases one token (its owner) may hold per egress (see [`quota`]).
    pub max_leases_per_owner: quota::LeaseQuota,
    /// The pool this node is a member of; `None`: alone, on the embedded store.
    pub cluster: Option<ClusterConfig>,
    /// Days the flow attribution records are kept (0: none are recorded); see
    /// [`crate::attribution`].
    pub attribution_days: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Certificate and key files; when absent, generated under `state_dir/tls`.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    pub san: Vec<String>,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has for its TLS handshake and then for a request's headers.
    pub header_timeout: Duration,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_FIRST_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_ATTRIBUTION_DAYS: u32 = 30;
pub const DEFAULT_KEEPALIVE: u16 = 25;
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_COLLECT_INTERVAL: Duration = Duration::from_secs(15);
pub const DEFAULT_MTU: u32 = 1420;

struct Timers {
    peer_timeout: Duration,
    first_handshake_timeout: Duration,
    persistent_keepalive: u16,
    reconcile_interval: Duration,
    collect_interval: Duration,
}

/// The collection and reconcile timers, checked against each other: a live container's
/// keepalives must come often enough that it is never taken for idle.
fn timers(raw: &RawConfig, invalid: &Invalid) -> Result<Timers, ConfigError> {
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

pub(super) type Invalid<'a> = dyn Fn(String, String) -> ConfigError + 'a;

fn api_config(raw: RawApi, invalid: &Invalid) -> Result<ApiConfig, ConfigError> {
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        invalid(
            "api.listen".into(),
            format!(
                "{:?} is not an address:port (e.g. \"198.51.100.2:7443\")",
                raw.listen
            ),
        )
    })?;
    let tls_files = match (raw.cert, raw.key) {
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
    let secs = |key: &str, v: Option<u64>, default: Duration| match v {
        Some(0) => Err(invalid(
            format!("api.{key}"),
            "must be at least 1 (seconds)".into(),
        )),
        Some(n) => Ok(Duration::from_secs(n)),
        None => Ok(default),
    };
    Ok(ApiConfig {
        listen,
        tls_files,
        san: raw.san,
        max_connections: match raw.max_connections {
            Some(0) => {
                return Err(invalid(
                    "api.max_connections".into(),
                    "must be at least 1".into(),
                ))
            }
            n => n.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        },
        header_timeout: secs("header_timeout", raw.header_timeout, DEFAULT_HEADER_TIMEOUT)?,
        idle_timeout: secs("idle_timeout", raw.idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
    })
}

pub(super) fn parsed<T: std::str::FromStr>(
    invalid: &Invalid,
    key: String,
    value: &str,
    what: &str,
) -> Result<T, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?} is not {what}")))
}

pub(super) fn ifname(invalid: &Invalid, key: String, value: &str) -> Result<IfName, ConfigError> {
    IfName::new(value).map_err(|e| invalid(key, e.to_string()))
}

fn check_listen_outside_pools(
    api: &ApiConfig,
    egress: &[EgressConfig],
    invalid: &Invalid,
) -> Result<(), ConfigError> {
    if let IpAddr::V4(a) = api.listen.ip() {
        if let Some(e) = egress.iter().find(|e| e.pool.contains(&a)) {
            return Err(invalid(
                "api.listen".into(),
                format!("{a} lies inside egress {}'s pool {}", e.name, e.pool),
            ));
        }
    }
    Ok(())
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
        let api = api_config(raw.api, &invalid)?;
        let metrics = metrics::metrics_config(raw.metrics, &api, &invalid)?;
        let (raw_egress, raw_network) = (raw.egress, raw.network);
        if raw_egress.is_empty() && raw_network.is_empty() {
            return Err(invalid(
                "egress".into(),
                "at least one [[egress]] or [[network]] table is needed".into(),
            ));
        }
        let egress = egress::egresses(raw_egress, &invalid)?;
        let network = network::networks(raw_network, &egress, &invalid)?;
        egress6::check_no_clash(&egress, &network, &invalid)?;
        check_listen_outside_pools(&api, &egress, &invalid)?;
        let cluster = match raw.cluster {
            Some(c) => Some(cluster::cluster(c, &invalid)?),
            None => None,
        };
        cluster::check_endpoint_interfaces(cluster.as_ref(), &egress, &network, &invalid)?;
        let max_leases_per_owner = quota::parse(raw.max_leases_per_owner, &egress, &invalid)?;
        Ok(Config {
            cluster,
            path: path.to_path_buf(),
            attribution_days: raw.attribution_days.unwrap_or(DEFAULT_ATTRIBUTION_DAYS),
            state_dir: raw.state_dir,
            backend: raw.backend,
            api,
            metrics,
            egress,
            network,
            peer_timeout: timers.peer_timeout,
            first_handshake_timeout: timers.first_handshake_timeout,
            persistent_keepalive: timers.persistent_keepalive,
            reconcile_interval: timers.reconcile_interval,
            collect_interval: timers.collect_interval,
            max_leases_per_owner,
        })
    }

    pub fn egress(&self, name: &str) -> Option<&EgressConfig> {
        self.egress.iter().find(|e| e.name == name)
    }

    pub fn network(&self, name: &str) -> Option<&NetworkConfig> {
        self.network.iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::policy::{Policy, Verdict};
    use super::*;

    /// An egress as tests of other modules need one.
    pub fn egress(name: &str, pool: &str) -> EgressConfig {
        EgressConfig {
            name: name.into(),
            egress_ips: crate::addresses::egress_ips::EgressIps::single(
                "203.0.113.77".parse().unwrap(),
            ),
            v6: None,
            interface: IfName::new("isp0").unwrap(),
            pool: pool.parse().unwrap(),
            wg_interface: IfName::new(&format!("wg-{name}")).unwrap(),
            listen_port: 51820,
            endpoint: "198.51.100.2:51820".parse().unwrap(),
            token_file: "/dev/null".into(),
            mtu: 1420,
            policy: Default::default(),
            endpoint_interface: None,
        }
    }

    /// A valid config with one egress, for the tests of every table.
    pub const VALID: &str = r#"
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
        assert_eq!(e.overlay_ip(), std::net::Ipv4Addr::new(100, 96, 0, 1));
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
