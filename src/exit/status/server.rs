//! The daemon's end of `wgexitd status`: plain HTTP on a unix socket in `state_dir`
//! (`status.sock`, 0600), reachable only by root on the exit node itself. The API never
//! serves it (it would tell one tenant about the others), and neither does the metrics
//! listener (which may be bound to a network a scraper reaches).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::UnixListener;

use super::snapshot::{report, StatusReport};
use crate::exit::leases::service::LeaseService;

/// The socket's name in `state_dir`.
pub const SOCKET: &str = "status.sock";

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    #[serde(default)]
    peers: bool,
}

async fn status(
    State(service): State<Arc<LeaseService>>,
    Query(q): Query<StatusQuery>,
) -> Json<StatusReport> {
    Json(report(&service, q.peers).await)
}

/// Binds the socket (replacing one a previous run left) and serves it until the task is
/// aborted.
pub fn spawn(
    state_dir: &Path,
    service: Arc<LeaseService>,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let router = Router::new()
        .route("/status", get(status))
        .with_state(service);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "status socket stopped");
        }
    }))
}
