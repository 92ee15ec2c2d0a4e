//! The plugin's network configuration (stdin), checked, with errors naming the key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::cni::error::{CniError, Code};
use crate::cni::log::LogConfig;
use wgexit::api::valid_egress_name;
use wgexit::wg::BackendKind;

/// Spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

pub const DEFAULT_MTU: u32 = 1420;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/wgexit";
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_STALE_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Warm spare links kept for the userspace backend.
pub const DEFAULT_SPARE_LINKS: u32 = 1;

/// Which routes go through the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Routes {
    /// 0.0.0.0/0.
    #[default]
    Default,
    /// 0.0.0.0/1 + 128.0.0.0/1 (gVisor rejects a default route without a gateway).
    Split,
    /// Nothing through the exit node: only the private network's prefix is routed.
    None,
}

impl Routes {
    pub fn destinations(self) -> Vec<ipnet::Ipv4Net> {
        match self {
            Routes::Default => vec!["0.0.0.0/0".parse().unwrap_or_default()],
            Routes::Split => ["0.0.0.0/1", "128.0.0.0/1"]
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            Routes::None => Vec::new(),
        }
    }

    /// The IPv6 routes through an egress with `ip6`: ::/0, or ::/1 + 8000::/1 when split.
    pub fn destinations6(self) -> Vec<ipnet::Ipv6Net> {
        let list: &[&str] = match self {
            Routes::Default => &["::/0"],
            Routes::Split => &["::/1", "8000::/1"],
            Routes::None => &[],
        };
        list.iter().filter_map(|s| s.parse().ok()).collect()
    }
}

/// Reads `key` from the config object as a `T`; an error names the key.
fn field<T: serde::de::DeserializeOwned>(raw: &Value, key: &str) -> Result<Option<T>, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| invalid(key, e.to_string())),
    }
}

/// A checked plugin config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub servers: Vec<String>,
    /// The exit node's egress to leave through; `None`: no exit node (a network only).
    pub egress: Option<String>,
    /// The private network to join; `None`: none.
    pub network: Option<String>,
    /// The container's app and region for the network's DNS, when CNI_ARGS and `args` do
    /// not name them.
    pub app: Option<String>,
    pub region: Option<String>,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub backend: BackendKind,
    pub mtu: u32,
    pub routes: Routes,
    pub data_dir: PathBuf,
    pub handshake_timeout: Duration,
    /// Report a pseudo MAC (derived from the public key) in the result (`reportMac`, default
    /// on): podman 4.3 refuses sandbox interfaces without one, WireGuard links have none, and
    /// no runtime here minds one.
    pub report_mac: bool,
    /// The container runs under gVisor (runsc), which takes addresses off the interfaces it
    /// takes over: CHECK then accepts a link with no address.
    pub gvisor: bool,
    /// How often ADD looks for attachments whose netns is gone (`staleSweepInterval`,
    /// seconds; 0: at every ADD). GC always does.
    pub stale_check_interval: Duration,
    /// How many warm spare links (`spareLinks`) the userspace backend keeps ready for the
    /// next ADD (see [`crate::cni::spares`]); 0: none.
    pub spare_links: u32,
    /// `logFile`, `logLevel`, `logMaxBytes`: where each command is logged, if anywhere.
    pub log: Option<LogConfig>,
    /// The whole config as given, for fields passed through (`prevResult`, `args`, …).
    pub raw: Value,
}

/// How an error names config key `key`: `config key "tokenFile"`. A front end with other
/// names for the keys (netavark's options) renames them at its edge.
pub fn key_label(key: &str) -> String {
    format!("config key {key:?}")
}

/// An invalid config: the key, and what is wrong with it.
pub(crate) fn invalid(key: &str, msg: impl Into<String>) -> CniError {
    CniError::new(
        Code::InvalidConfig,
        format!("{}: {}", key_label(key), msg.into()),
    )
}

/// A spec version as numbers, for comparisons; `None` if it is not `X.Y.Z`.
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// Whether `version` is `min` or later (an unparsable version is not).
pub fn at_least(version: &str, min: &str) -> bool {
    match (parse_version(version), parse_version(min)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
}

/// The `cniVersion` of a config, best effort, for error output before it is checked.
pub fn version_of(bytes: &[u8]) -> String {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_string())
}

/// The config as JSON, an object.
fn json_object(bytes: &[u8]) -> Result<Value, CniError> {
    let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(Code::Decode, "network config on stdin is not valid JSON")
            .with_details(e.to_string())
    })?;
    if !raw.is_object() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "network config must be a JSON object",
        ));
    }
    Ok(raw)
}

fn supported_version(raw: &Value) -> Result<String, CniError> {
    let cni_version: String =
        field(raw, "cniVersion")?.ok_or_else(|| invalid("cniVersion", "missing"))?;
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion {cni_version:?} is not supported; wgexit speaks {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    Ok(cni_version)
}

/// `servers`: at least one, each an https:// URL.
fn servers(raw: &Value) -> Result<Vec<String>, CniError> {
    let servers: Vec<String> = field(raw, "servers")?.unwrap_or_default();
    if servers.is_empty() {
        return Err(invalid(
            "servers",
            "list at least one exit server, e.g. [\"https://198.51.100.2:7443\"]",
        ));
    }
    if let Some(s) = servers.iter().find(|s| !s.starts_with("https://")) {
        return Err(invalid(
            "servers",
            format!("{s:?} must be an https:// URL (the API is TLS only)"),
        ));
    }
    Ok(servers)
}

/// `egress` or `network` (an exit node's egress, a private network): each a plain name,
/// at least one of them.
fn egress_and_network(raw: &Value) -> Result<(Option<String>, Option<String>), CniError> {
    let name = |key: &str| -> Result<Option<String>, CniError> {
        let v: Option<String> = field(raw, key)?;
        match v {
            Some(n) if !valid_egress_name(&n) => Err(invalid(
                key,
                format!("{n:?} must be 1-64 letters, digits, '-', '_' or '.'"),
            )),
            other => Ok(other),
        }
    };
    let (egress, network) = (name("egress")?, name("network")?);
    if egress.is_none() && network.is_none() {
        return Err(invalid(
            "egress",
            "missing: name an egress (static egress IP), a network (private network), or both",
        ));
    }
    Ok((egress, network))
}

/// `app` / `region`: DNS labels when given.
fn label(raw: &Value, key: &str) -> Result<Option<String>, CniError> {
    let v: Option<String> = field(raw, key)?;
    match v {
        Some(l) if !wgexit::api::valid_dns_label(&l) => Err(invalid(
            key,
            format!("{l:?} must be a DNS label: 1-63 letters, digits or '-'"),
        )),
        other => Ok(other),
    }
}

/// `tokenFile` and `caFile`, both required.
fn credentials(raw: &Value) -> Result<(PathBuf, PathBuf), CniError> {
    let token_file: PathBuf = field(raw, "tokenFile")?.ok_or_else(|| {
        invalid(
            "tokenFile",
            "missing: the file holding this egress's bearer token",
        )
    })?;
    let ca_file: PathBuf = field(raw, "caFile")?.ok_or_else(|| {
        invalid(
            "caFile",
            "missing: the exit node's CA certificate (its state_dir/tls/ca.pem); verification is never skipped",
        )
    })?;
    Ok((token_file, ca_file))
}

fn mtu(raw: &Value) -> Result<u32, CniError> {
    let mtu = field(raw, "mtu")?.unwrap_or(DEFAULT_MTU);
    if !(1280..=9000).contains(&mtu) {
        return Err(invalid("mtu", format!("{mtu} is outside 1280..=9000")));
    }
    Ok(mtu)
}

fn data_dir(raw: &Value) -> Result<PathBuf, CniError> {
    let data_dir =
        field::<PathBuf>(raw, "dataDir")?.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    if !data_dir.is_absolute() {
        return Err(invalid("dataDir", "must be an absolute path"));
    }
    Ok(data_dir)
}

fn handshake_timeout(raw: &Value) -> Result<Duration, CniError> {
    match field::<u64>(raw, "handshakeTimeout")? {
        None => Ok(DEFAULT_HANDSHAKE_TIMEOUT),
        Some(ms) if (1..=60_000).contains(&ms) => Ok(Duration::from_millis(ms)),
        Some(ms) => Err(invalid(
            "handshakeTimeout",
            format!("{ms} ms is outside 1..=60000"),
        )),
    }
}

fn spare_links(raw: &Value) -> Result<u32, CniError> {
    use crate::cni::spares::MAX_SPARES;
    match field::<u32>(raw, "spareLinks")? {
        None => Ok(DEFAULT_SPARE_LINKS),
        Some(n) if n <= MAX_SPARES => Ok(n),
        Some(n) => Err(invalid(
            "spareLinks",
            format!("{n} is more than {MAX_SPARES}"),
        )),
    }
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let raw = json_object(bytes)?;
        let cni_version = supported_version(&raw)?;
        let name = field::<String>(&raw, "name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("name", "missing"))?;
        if field::<String>(&raw, "type")?.is_some_and(|t| t != "wgexit") {
            return Err(invalid("type", "must be \"wgexit\""));
        }
        let servers = servers(&raw)?;
        let (egress, network) = egress_and_network(&raw)?;
        let (token_file, ca_file) = credentials(&raw)?;
        let routes: Routes = field(&raw, "routes")?.unwrap_or_default();
        if egress.is_some() && routes == Routes::None {
            return Err(invalid(
                "routes",
                "\"none\" routes nothing through the egress: drop \"egress\" or use \"default\" or \"split\"",
            ));
        }
        Ok(NetConf {
            cni_version,
            name,
            servers,
            egress,
            network,
            app: label(&raw, "app")?,
            region: label(&raw, "region")?,
            token_file,
            ca_file,
            backend: field(&raw, "backend")?.unwrap_or_default(),
            mtu: mtu(&raw)?,
            routes,
            data_dir: data_dir(&raw)?,
            handshake_timeout: handshake_timeout(&raw)?,
            report_mac: field(&raw, "reportMac")?.unwrap_or(true),
            gvisor: field(&raw, "gvisor")?.unwrap_or(false),
            stale_check_interval: field::<u64>(&raw, "staleSweepInterval")?
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_STALE_SWEEP_INTERVAL),
            spare_links: spare_links(&raw)?,
            log: LogConfig::parse(&raw)?,
            raw,
        })
    }

    /// The bearer token, read from `tokenFile`.
    pub fn token(&self) -> Result<String, CniError> {
        let text = std::fs::read_to_string(&self.token_file).map_err(|e| {
            invalid(
                "tokenFile",
                format!("cannot read {}: {e}", self.token_file.display()),
            )
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(invalid(
                "tokenFile",
                format!("{} is empty", self.token_file.display()),
            ));
        }
        Ok(token)
    }

    /// `args` from the config (CNI "args" convention: `args.cni` holds labels etc.),
    /// flattened into strings.
    pub fn args(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(Value::Object(args)) = self.raw.get("args") {
            for (section, v) in args {
                if let Value::Object(inner) = v {
                    for (k, v) in inner {
                        let v = v
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string());
                        out.push((format!("{section}.{k}"), v));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"{ "cniVersion": "1.0.0", "name": "egress", "type": "wgexit",
      "servers": ["https://198.51.100.2:7443"], "egress": "acme",
      "tokenFile": "/etc/wgexit/acme.token", "caFile": "/etc/wgexit/exit-ca.pem",
      "backend": "auto", "mtu": 1420, "routes": "default", "dataDir": "/var/lib/cni/wgexit" }"#;

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn parses_the_documented_example() {
        let c = parse(VALID).unwrap();
        assert_eq!(c.egress.as_deref(), Some("acme"));
        assert_eq!(c.network, None);
        assert_eq!(c.routes, Routes::Default);
        assert_eq!(c.backend, BackendKind::Auto);
        assert_eq!(c.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(Routes::Split.destinations().len(), 2);
        assert!(c.report_mac && !c.gvisor);
        assert_eq!(c.spare_links, DEFAULT_SPARE_LINKS);
        let none = VALID.replace("\"mtu\": 1420", "\"spareLinks\": 0");
        assert_eq!(parse(&none).unwrap().spare_links, 0);
        let no_mac = VALID.replace("\"mtu\": 1420", "\"reportMac\": false");
        assert!(!parse(&no_mac).unwrap().report_mac);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(at_least("1.1.0", "1.1.0"));
        assert!(at_least("1.10.0", "1.2.0"));
        assert!(!at_least("1.0.0", "1.1.0"));
        assert!(!at_least("0.4.0", "1.0.0"));
        assert!(!at_least("1.1", "1.0.0"));
        assert_eq!(parse_version("1.1.0.0"), None);
    }

    #[test]
    fn errors_have_spec_codes_and_name_the_key() {
        assert_eq!(parse("{not json").unwrap_err().code, Code::Decode);
        let cases = [
            ("\"egress\": \"acme\",", "", "egress"),
            ("\"caFile\": \"/etc/wgexit/exit-ca.pem\",", "", "caFile"),
            (
                "\"tokenFile\": \"/etc/wgexit/acme.token\",",
                "",
                "tokenFile",
            ),
            (
                "[\"https://198.51.100.2:7443\"]",
                "[\"http://198.51.100.2:7443\"]",
                "servers",
            ),
            ("[\"https://198.51.100.2:7443\"]", "[]", "servers"),
            ("\"mtu\": 1420", "\"mtu\": 100", "mtu"),
            ("\"routes\": \"default\"", "\"routes\": \"some\"", "routes"),
            ("\"backend\": \"auto\"", "\"backend\": \"magic\"", "backend"),
            ("\"mtu\": 1420", "\"mtu\": \"big\"", "mtu"),
            ("\"mtu\": 1420", "\"spareLinks\": 17", "spareLinks"),
            ("\"mtu\": 1420", "\"spareLinks\": -1", "spareLinks"),
            ("\"routes\": \"default\"", "\"routes\": \"none\"", "routes"),
            (
                "\"egress\": \"acme\"",
                "\"egress\": \"acme\", \"network\": \"a b\"",
                "network",
            ),
            (
                "\"egress\": \"acme\"",
                "\"egress\": \"acme\", \"app\": \"we_b\"",
                "app",
            ),
        ];
        for (from, to, key) in cases {
            let e = parse(&VALID.replace(from, to)).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig, "{to}");
            assert!(e.msg.contains(key), "{:?} should name {key}", e.msg);
        }
        let e = parse(&VALID.replace("1.0.0", "0.2.0")).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        let e = parse(&VALID.replace("\"mtu\": 1420", "\"reportMac\": 1")).unwrap_err();
        assert!(e.msg.contains("reportMac"), "{}", e.msg);
    }

    #[test]
    fn a_network_alone_or_with_an_egress() {
        let net_only = VALID
            .replace(
                "\"egress\": \"acme\"",
                "\"network\": \"acme\", \"app\": \"web\", \"region\": \"ams\"",
            )
            .replace("\"routes\": \"default\"", "\"routes\": \"none\"");
        let c = parse(&net_only).unwrap();
        assert_eq!((c.egress, c.network.as_deref()), (None, Some("acme")));
        assert_eq!(
            (c.app.as_deref(), c.region.as_deref()),
            (Some("web"), Some("ams"))
        );
        assert!(Routes::None.destinations().is_empty());
        let both = VALID.replace(
            "\"egress\": \"acme\"",
            "\"egress\": \"acme\", \"network\": \"acme\"",
        );
        let c = parse(&both).unwrap();
        assert_eq!(
            (c.egress.as_deref(), c.network.as_deref()),
            (Some("acme"), Some("acme"))
        );
    }
}
