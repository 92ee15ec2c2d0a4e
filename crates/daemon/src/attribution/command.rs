//! `wgexitd who` and `wgexitd flows`: ask the running daemon and print its answer.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use super::event::Proto;
use super::query::{render, WhoRequest};
use crate::control::{self, ControlError};

/// `--proto`: `tcp`, `udp` or `icmp`.
pub fn parse_proto(text: &str) -> Result<Proto, String> {
    match text {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        "icmp" => Ok(Proto::Icmp),
        other => Err(format!("{other:?}: tcp, udp or icmp")),
    }
}

/// `--at` and `--since`: an RFC 3339 time, as Unix microseconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    super::time::parse(text).map_err(|e| e.to_string())
}

/// Prints which lease held `address` (at `at`, else now): a line per flow, or JSON.
pub async fn who(
    state_dir: &Path,
    address: SocketAddr,
    proto: Option<Proto>,
    at: Option<u64>,
    json: bool,
) -> Result<(), ControlError> {
    let request = WhoRequest {
        ip: address.ip(),
        port: address.port(),
        proto,
        at,
    };
    let answer = control::who(state_dir, request).await?;
    if json {
        let text = serde_json::to_string_pretty(&answer)
            .map_err(|e| ControlError::Daemon(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render(&answer));
    }
    Ok(())
}

/// Prints every flow that started at or after `since` as JSON lines.
pub async fn flows(state_dir: &Path, since: u64) -> Result<(), ControlError> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    control::flows(state_dir, since, |flow| {
        serde_json::to_writer(&mut out, &flow).map_err(std::io::Error::other)?;
        out.write_all(b"\n")
    })
    .await?;
    out.flush()
        .map_err(|e| ControlError::Daemon(format!("cannot write the flows: {e}")))
}
