//! `[metrics]`: where Prometheus scrapes the daemon (plain HTTP, apart from the API).

use std::net::SocketAddr;

use serde::Deserialize;

use super::{parsed, ApiConfig, ConfigError, Invalid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    listen: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Serves `/metrics` (Prometheus text), plain HTTP, nothing else.
    pub listen: SocketAddr,
}

/// `[metrics]`, checked against the API: the two never share a socket.
pub(super) fn metrics_config(
    raw: Option<RawMetrics>,
    api: &ApiConfig,
    invalid: &Invalid,
) -> Result<Option<MetricsConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let listen: SocketAddr = parsed(
        invalid,
        "metrics.listen".into(),
        &raw.listen,
        "an address:port (e.g. \"127.0.0.1:9469\")",
    )?;
    let clash = listen.port() == api.listen.port()
        && (listen.ip() == api.listen.ip()
            || listen.ip().is_unspecified()
            || api.listen.ip().is_unspecified());
    if clash {
        return Err(invalid(
            "metrics.listen".into(),
            format!(
                "{listen} is the API's socket ({}); metrics are served apart from the API, on another port",
                api.listen
            ),
        ));
    }
    Ok(Some(MetricsConfig { listen }))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    use crate::config::tests::VALID as BASE;

    fn with(metrics: &str) -> Result<Config, String> {
        Config::parse(Path::new("t.toml"), &format!("{BASE}\n{metrics}")).map_err(|e| e.to_string())
    }

    #[test]
    fn metrics_are_optional_and_apart_from_the_api() {
        assert_eq!(with("").unwrap().metrics, None);
        let c = with("[metrics]\nlisten = \"127.0.0.1:9469\"").unwrap();
        assert_eq!(c.metrics.unwrap().listen, "127.0.0.1:9469".parse().unwrap());
        for (bad, key) in [
            ("listen = \"198.51.100.2:7443\"", "metrics.listen"),
            ("listen = \"0.0.0.0:7443\"", "metrics.listen"),
            ("listen = \"localhost\"", "metrics.listen"),
            ("listen = \"127.0.0.1:9469\"\npath = \"/m\"", "path"),
        ] {
            let e = with(&format!("[metrics]\n{bad}")).unwrap_err();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }
}
