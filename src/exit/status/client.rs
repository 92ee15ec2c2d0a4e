//! `wgexitd status`'s end: asks the running daemon over its status socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::server::socket_path;
use super::snapshot::StatusReport;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot reach wgexitd at {path}: {source}; is `wgexitd serve` running with this config (same state_dir)?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to wgexitd at {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// How long a status may take: reading a device of 60,000 peers takes a while.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's status; each lease's row too when `peers`.
pub fn fetch(state_dir: &Path, peers: bool) -> Result<StatusReport, StatusError> {
    let path = socket_path(state_dir);
    let protocol = |message: String| StatusError::Protocol {
        path: path.clone(),
        message,
    };
    let mut stream = UnixStream::connect(&path).map_err(|source| StatusError::Connect {
        path: path.clone(),
        source,
    })?;
    let io = |e: std::io::Error| protocol(e.to_string());
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    // HTTP/1.0: the answer ends when the daemon closes the connection, never chunked.
    let target = if peers {
        "/status?peers=true"
    } else {
        "/status"
    };
    write!(stream, "GET {target} HTTP/1.0\r\nHost: wgexitd\r\n\r\n").map_err(io)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(io)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| protocol("the answer has no HTTP header".into()))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(protocol(format!("answered {status:?}")));
    }
    serde_json::from_slice(&answer[split + 4..])
        .map_err(|e| protocol(format!("the answer is not a status report: {e}")))
}
