//! CNI errors: spec codes and our own (100+), each with a message a person can act on.

use serde::Serialize;

/// Error codes. 1-99 are the spec's; 100+ are wgexit's own (listed in docs/plugin.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADDs now.
    PluginNotAvailable = 50,
    /// STATUS: the plugin cannot serve ADDs now; a limited service may be possible.
    LimitedConnectivity = 51,
    /// The exit server refused the token.
    Unauthorized = 100,
    /// The exit server's certificate did not verify against `caFile`.
    TlsVerification = 101,
    /// The exit server refused the lease (pool exhausted, conflict, bad request).
    LeaseRefused = 102,
    /// A netlink or namespace operation failed.
    Netlink = 103,
    /// Creating or configuring the WireGuard device failed.
    WireGuard = 104,
    /// No WireGuard handshake with the exit node within the time allowed.
    NoHandshake = 105,
    /// Reading or writing the plugin's state failed.
    State = 106,
    /// CHECK found the attachment not as ADD left it.
    CheckFailed = 107,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", details.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: Option<String>,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = Some(details.into());
        self
    }

    /// The JSON the spec asks for on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            details: Option<&'a str>,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: self.details.as_deref(),
        })
        .unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":\"{cni_version}\",\"code\":{},\"msg\":\"error\"}}",
                self.code as u32
            )
        })
    }
}

/// Shorthand for mapping library errors at the edge.
pub fn err(code: Code, msg: impl Into<String>) -> impl FnOnce(String) -> CniError {
    let msg = msg.into();
    move |details| CniError::new(code, msg).with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_spec_fields() {
        let e = CniError::new(Code::InvalidConfig, "bad").with_details("why");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad");
        assert_eq!(v["details"], "why");
        let v: serde_json::Value =
            serde_json::from_str(&CniError::new(Code::TryAgainLater, "x").to_json("0.4.0"))
                .unwrap();
        assert!(v.get("details").is_none());
    }
}
