//! The CNI plugin: spec types and the commands.

pub mod add;
pub mod check;
pub mod config;
pub mod del;
pub mod env;
pub mod error;
pub mod gc;
pub mod kernel_link;
pub mod leasing;
pub mod log;
pub mod member;
pub mod oci_hook;
pub mod result;
pub mod spares;
pub mod stale;
pub mod state;
pub mod status;
pub mod trace;

use serde_json::{json, Value};

use crate::cni::config::{
    at_least, parse_version, version_of, NetConf, LATEST_VERSION, SUPPORTED_VERSIONS,
};
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, Code};
use crate::cni::state::AttachmentState;
use wgexit::client::ClientError;
use wgexit::net::{LinkError, Netns};
use wgexit::wg::{Backend, BackendKind, WgError};

/// What the binary prints and how it exits.
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// The commands of the spec, and the first spec version that has each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            "" => return Err(CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set")),
            other => {
                return Err(CniError::new(
                    Code::InvalidEnv,
                    format!(
                    "CNI_COMMAND {other:?} is unknown; use ADD, DEL, CHECK, STATUS, GC or VERSION"
                ),
                ))
            }
        })
    }

    /// The spec version that introduced the command.
    pub fn since(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Status | Command::Gc => "1.1.0",
            _ => "0.1.0",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

/// Runs one CNI command. `stdin` is the network config.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Outcome {
    match logged(env, stdin).await {
        Ok(Some(v)) => Outcome {
            stdout: v.to_string(),
            exit_code: 0,
        },
        Ok(None) => Outcome {
            stdout: String::new(),
            exit_code: 0,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&version_of(stdin)),
            exit_code: 1,
        },
    }
}

/// Runs one command as [`dispatch`] does, and logs it (`logFile`): what every front end runs
/// (the CNI plugin, the OCI hook, the netavark plugin) with the environment and the network
/// config it made of its input.
pub async fn logged(env: &CniEnv, config: &[u8]) -> Result<Option<Value>, CniError> {
    let log = log::CommandLog::begin(env, config);
    let result = dispatch(env, config).await;
    log.finish(&result);
    result
}

/// Runs one command: `Some(result)` for ADD and VERSION, `None` for the commands that print
/// nothing on success.
pub async fn dispatch(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = Command::parse(&env.command)?;
    if command == Command::Version {
        return Ok(Some(version_result(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    if !at_least(&conf.cni_version, command.since()) {
        // As the reference plugins answer: the config's version does not have the command.
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "config version {} does not allow {}: it is a CNI {} command",
                conf.cni_version,
                command.name(),
                command.since()
            ),
        ));
    }
    match command {
        Command::Add => add::add(env, &conf).await.map(Some),
        Command::Del => del::del(env, &conf).await.map(|()| None),
        Command::Check => check::check(env, &conf).await.map(|()| None),
        Command::Status => status::status(&conf).map(|()| None),
        Command::Gc => gc::gc(&conf).await.map(|()| None),
        Command::Version => Ok(Some(version_result(stdin))),
    }
}

/// VERSION's answer: `cniVersion` is the one asked for (the latest when none is).
fn version_result(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| parse_version(v).is_some())
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS })
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

/// How the attachment's device is reached once it is in the container: a kernel device
/// lives in the container's namespace under `ifname`, so it needs a backend opened there
/// (returned); a userspace device answers on its socket, named after the host-side name, to
/// the host's backend (`None`: use that one).
pub(crate) fn container_device<'a>(
    state: &'a AttachmentState,
    netns: &Netns,
) -> Result<(Option<Backend>, &'a str), CniError> {
    match state.backend {
        BackendKind::Kernel => {
            let backend = netns
                .run(|| open_backend(BackendKind::Kernel))
                .map_err(|e| link_error("entering the container's netns", e))??;
            Ok((Some(backend), &state.ifname))
        }
        _ => Ok((None, &state.host_ifname)),
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
        e if e.store_unavailable() => Code::TryAgainLater,
        ClientError::Refused { status, .. } if *status >= 500 && *status != 503 => {
            Code::TryAgainLater
        }
        ClientError::Refused { .. } | ClientError::Protocol { .. } => Code::LeaseRefused,
    };
    let hint = match code {
        Code::Unauthorized => format!(
            " (check {}: the token must be one of the egress's token_file lines on the exit node)",
            config::key_label("tokenFile")
        ),
        _ => String::new(),
    };
    CniError::new(code, format!("{what}: {e}{hint}"))
}
