//! A podman network's options (`podman network create -d wgexit -o KEY=VALUE`) as the CNI
//! network config the plugin's commands take: each option is a CNI key in snake_case, its
//! value a string (`servers` comma-separated). The config is then checked as a CNI config is;
//! its errors, which name CNI keys, are renamed to the options at this edge.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::cni::config::{key_label, LATEST_VERSION};
use crate::cni::error::{CniError, Code};

/// How an option's string becomes the CNI key's JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    /// Comma-separated, a JSON list.
    List,
    Number,
    Bool,
}

/// Every option: its name, the CNI key it sets, and its kind.
const OPTIONS: &[(&str, &str, Kind)] = &[
    ("servers", "servers", Kind::List),
    ("egress", "egress", Kind::Text),
    ("network", "network", Kind::Text),
    ("token_file", "tokenFile", Kind::Text),
    ("ca_file", "caFile", Kind::Text),
    ("app", "app", Kind::Text),
    ("region", "region", Kind::Text),
    ("backend", "backend", Kind::Text),
    ("mtu", "mtu", Kind::Number),
    ("routes", "routes", Kind::Text),
    ("data_dir", "dataDir", Kind::Text),
    ("handshake_timeout", "handshakeTimeout", Kind::Number),
    ("report_mac", "reportMac", Kind::Bool),
    ("gvisor", "gvisor", Kind::Bool),
    ("stale_sweep_interval", "staleSweepInterval", Kind::Number),
    ("spare_links", "spareLinks", Kind::Number),
    ("log_file", "logFile", Kind::Text),
    ("log_level", "logLevel", Kind::Text),
    ("log_max_bytes", "logMaxBytes", Kind::Number),
];

fn invalid_option(name: &str, msg: impl std::fmt::Display) -> CniError {
    CniError::new(Code::InvalidConfig, format!("option {name:?}: {msg}"))
}

/// One option's value as its CNI key's JSON value.
fn value(name: &str, kind: Kind, text: &str) -> Result<Value, CniError> {
    Ok(match kind {
        Kind::Text => json!(text),
        Kind::List => Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| json!(s))
                .collect(),
        ),
        Kind::Number => json!(text
            .trim()
            .parse::<u64>()
            .map_err(|_| invalid_option(name, format!("{text:?} is not a whole number")))?),
        Kind::Bool => json!(text
            .trim()
            .parse::<bool>()
            .map_err(|_| invalid_option(name, format!("{text:?} is not true or false")))?),
    })
}

/// The CNI network config that network `name`'s `options` stand for.
pub fn net_conf(name: &str, options: &BTreeMap<String, String>) -> Result<Value, CniError> {
    let mut conf = Map::new();
    conf.insert("cniVersion".into(), json!(LATEST_VERSION));
    conf.insert("name".into(), json!(name));
    conf.insert("type".into(), json!("wgexit"));
    for (option, text) in options {
        let Some((_, key, kind)) = OPTIONS.iter().find(|(o, _, _)| o == option) else {
            let known: Vec<&str> = OPTIONS.iter().map(|(o, _, _)| *o).collect();
            return Err(invalid_option(
                option,
                format!("unknown; wgexit's options are {}", known.join(", ")),
            ));
        };
        conf.insert((*key).into(), value(option, *kind, text)?);
    }
    Ok(Value::Object(conf))
}

/// `e` with the CNI keys it names renamed to the options that set them.
pub fn name_options(mut e: CniError) -> CniError {
    for (option, key, _) in OPTIONS {
        e.msg = e
            .msg
            .replace(&key_label(key), &format!("option {option:?}"));
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::config::NetConf;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const MINIMAL: &[(&str, &str)] = &[
        (
            "servers",
            "https://198.51.100.2:7443, https://198.51.100.3:7443",
        ),
        ("egress", "acme"),
        ("token_file", "/etc/wgexit/acme.token"),
        ("ca_file", "/etc/wgexit/exit-ca.pem"),
    ];

    fn parse(pairs: &[(&str, &str)]) -> Result<NetConf, CniError> {
        let conf = net_conf("egress", &options(pairs))?;
        NetConf::parse(conf.to_string().as_bytes()).map_err(name_options)
    }

    #[test]
    fn options_are_the_cni_keys_in_snake_case() {
        let mut all = MINIMAL.to_vec();
        all.extend([
            ("network", "acme"),
            ("app", "web"),
            ("region", "ams"),
            ("mtu", "1380"),
            ("routes", "split"),
            ("data_dir", "/var/lib/wgexit-podman"),
            ("report_mac", "false"),
            ("log_file", "/var/log/wgexit.log"),
        ]);
        let c = parse(&all).unwrap();
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.servers[1], "https://198.51.100.3:7443");
        assert_eq!(c.token_file.to_str(), Some("/etc/wgexit/acme.token"));
        assert_eq!((c.mtu, c.report_mac), (1380, false));
        assert_eq!(c.network.as_deref(), Some("acme"));
        assert_eq!(c.data_dir.to_str(), Some("/var/lib/wgexit-podman"));
        assert!(c.log.is_some());
    }

    #[test]
    fn an_error_names_the_option() {
        let without = |name: &str| -> Vec<(&str, &str)> {
            MINIMAL
                .iter()
                .copied()
                .filter(|(k, _)| *k != name)
                .collect()
        };
        for missing in ["servers", "token_file", "ca_file", "egress"] {
            let e = parse(&without(missing)).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig);
            assert!(
                e.msg.contains(&format!("option \"{missing}\"")),
                "{}",
                e.msg
            );
        }
        let bad = [
            ("mtu", "big"),
            ("mtu", "100"),
            ("routes", "some"),
            ("servers", "http://198.51.100.2:7443"),
            ("backend", "magic"),
            ("report_mac", "yes"),
            ("data_dir", "relative"),
            ("colour", "blue"),
        ];
        for (option, text) in bad {
            let mut pairs = MINIMAL.to_vec();
            pairs.push((option, text));
            let e = parse(&pairs).unwrap_err();
            assert!(e.msg.contains(&format!("option \"{option}\"")), "{}", e.msg);
        }
    }
}
