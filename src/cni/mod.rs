//! The CNI plugin: spec types and the commands.

pub mod add;
pub mod cleanup;
pub mod client;
pub mod config;
pub mod del;
pub mod env;
pub mod error;
pub mod result;
pub mod state;

use serde_json::{json, Value};

use crate::cni::client::ClientError;
use crate::cni::config::{version_of, NetConf, SUPPORTED_VERSIONS};
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, Code};
use crate::cni::state::AttachmentState;
use crate::net::{LinkError, Netns};
use crate::wg::{Backend, BackendKind, WgError};

/// What the binary prints and how it exits.
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs one CNI command. `stdin` is the network config.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Outcome {
    let version = version_of(stdin);
    let result = match env.command.as_str() {
        "VERSION" => Ok(Some(version_result(&version))),
        "ADD" | "DEL" => match NetConf::parse(stdin) {
            Err(e) => Err(e),
            Ok(conf) if env.command == "ADD" => add::add(env, &conf).await.map(Some),
            Ok(conf) => del::del(env, &conf).await.map(|()| None),
        },
        "" => Err(CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set")),
        other => Err(CniError::new(
            Code::InvalidEnv,
            format!("CNI_COMMAND {other:?} is not supported; use ADD, DEL or VERSION"),
        )),
    };
    match result {
        Ok(Some(v)) => Outcome {
            stdout: v.to_string(),
            exit_code: 0,
        },
        Ok(None) => Outcome {
            stdout: String::new(),
            exit_code: 0,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&version),
            exit_code: 1,
        },
    }
}

fn version_result(version: &str) -> Value {
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

/// What `wgexit` prints when run by hand.
pub fn about() -> String {
    format!(
        "CNI wgexit plugin v{}\nCNI protocol versions supported: {}\n",
        env!("CARGO_PKG_VERSION"),
        SUPPORTED_VERSIONS.join(", ")
    )
}

pub(crate) fn open_backend(kind: BackendKind) -> Result<Backend, CniError> {
    Backend::open(kind).map_err(|e| wg_error("opening the WireGuard backend", e))
}

/// A backend and device name through which the attachment's device can be read once it is
/// in the container: the kernel's lives in the container's namespace under `ifname`; a
/// userspace device is reached through its socket, named after the host-side name.
pub(crate) fn wg_handle(
    state: &AttachmentState,
    netns: Option<&Netns>,
) -> Result<(Backend, String), CniError> {
    match (state.backend, netns) {
        (BackendKind::Kernel, Some(netns)) => {
            let backend = netns
                .run(|| open_backend(BackendKind::Kernel))
                .map_err(|e| link_error("entering the container's netns", e))??;
            Ok((backend, state.ifname.clone()))
        }
        (kind, _) => Ok((open_backend(kind)?, state.host_ifname.clone())),
    }
}

pub(crate) fn wg_error(what: &str, e: WgError) -> CniError {
    let code = match e {
        WgError::KernelModuleMissing(_) => Code::InvalidConfig,
        _ => Code::WireGuard,
    };
    CniError::new(code, format!("{what}: {e}"))
}

pub(crate) fn link_error(what: &str, e: impl Into<LinkError>) -> CniError {
    let e = e.into();
    CniError::new(Code::Netlink, format!("{what}: {e}"))
}

pub(crate) fn client_error(what: &str, e: &ClientError) -> CniError {
    let code = match e {
        ClientError::CaFile { .. } => Code::InvalidConfig,
        ClientError::Unreachable { .. } => Code::TryAgainLater,
        ClientError::Tls { .. } => Code::TlsVerification,
        ClientError::Refused {
            status: 401 | 403, ..
        } => Code::Unauthorized,
        ClientError::Refused { status: 429, .. } => Code::TryAgainLater,
        ClientError::Refused { status, .. } if *status >= 500 && *status != 503 => {
            Code::TryAgainLater
        }
        ClientError::Refused { .. } | ClientError::Protocol { .. } => Code::LeaseRefused,
    };
    let hint = match code {
        Code::Unauthorized => " (check tokenFile: the token must be one of the egress's token_file lines on the exit node)",
        _ => "",
    };
    CniError::new(code, format!("{what}: {e}{hint}"))
}
