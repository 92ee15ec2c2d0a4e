//! The HTTPS control API (routes in [`crate::api`]), mapping [`ExitError`]s to statuses.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};

use crate::api::{ApiError, LeaseRequest, MAX_BODY_BYTES};
use crate::exit::registry::LeaseError;
use crate::exit::service::{Exit, ExitError};
use crate::keys::Key;

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: code.to_string(),
            message: message.into(),
        }),
    )
        .into_response()
}

impl IntoResponse for ExitError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match &self {
            ExitError::Unauthorized(_) => error(StatusCode::UNAUTHORIZED, "unauthorized", msg),
            ExitError::RateLimited(retry) => {
                let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", msg);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, retry.as_secs().max(1).into());
                r
            }
            ExitError::BadRequest(_) => error(StatusCode::BAD_REQUEST, "bad_request", msg),
            ExitError::Lease(LeaseError::UnknownEgress(_)) => {
                error(StatusCode::UNAUTHORIZED, "unauthorized", msg)
            }
            ExitError::Lease(LeaseError::PoolExhausted { .. }) => {
                error(StatusCode::SERVICE_UNAVAILABLE, "pool_exhausted", msg)
            }
            ExitError::Lease(LeaseError::NotFound { .. }) => {
                error(StatusCode::NOT_FOUND, "not_found", msg)
            }
            ExitError::Lease(LeaseError::NotOwner { .. }) => {
                error(StatusCode::FORBIDDEN, "forbidden", msg)
            }
            ExitError::Lease(LeaseError::Store(_)) => {
                tracing::error!(error = %msg, "lease store failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, "store_error", msg)
            }
            ExitError::Wg(_) => {
                tracing::error!(error = %msg, "WireGuard operation failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, "wireguard_error", msg)
            }
        }
    }
}

/// A lease request body as the API takes it: JSON (serde_json limits nesting to 128 levels;
/// the body is at most [`MAX_BODY_BYTES`]), no unknown fields, bounded fields, a usable key.
pub fn decode_lease_request(body: &[u8]) -> Result<LeaseRequest, ExitError> {
    let req: LeaseRequest = serde_json::from_slice(body)
        .map_err(|e| ExitError::BadRequest(format!("request body is not a lease request: {e}")))?;
    req.validate().map_err(ExitError::BadRequest)?;
    Ok(req)
}

/// The `{public_key}` of a lease path (already percent-decoded by the router).
pub fn decode_path_key(key: &str) -> Result<Key, ExitError> {
    Key::from_base64(key).map_err(|e| {
        let shown: String = key.chars().take(64).collect();
        ExitError::BadRequest(format!("{shown:?} in the path: {e}"))
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

pub fn router(exit: Arc<Exit>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/egress/{egress}", get(egress_info))
        .route("/v1/egress/{egress}/leases", get(list).post(lease))
        .route("/v1/egress/{egress}/leases/{key}", delete(release))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; the API lives under /v1",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(exit)
}

async fn lease(
    State(exit): State<Arc<Exit>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(egress): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ExitError> {
    let owner = exit.authorize(peer.ip(), &egress, bearer(&headers))?;
    let body = body.map_err(|e| ExitError::BadRequest(format!("request body: {e}")))?;
    let req = decode_lease_request(&body)?;
    let grant = exit.lease(&egress, &owner, req).await?;
    Ok(Json(grant).into_response())
}

async fn release(
    State(exit): State<Arc<Exit>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((egress, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ExitError> {
    let owner = exit.authorize(peer.ip(), &egress, bearer(&headers))?;
    let key = decode_path_key(&key)?;
    exit.release(&egress, Some(&owner), &key).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list(
    State(exit): State<Arc<Exit>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(egress): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ExitError> {
    exit.authorize(peer.ip(), &egress, bearer(&headers))?;
    Ok(Json(exit.list(&egress).await?).into_response())
}

async fn egress_info(
    State(exit): State<Arc<Exit>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(egress): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ExitError> {
    exit.authorize(peer.ip(), &egress, bearer(&headers))?;
    Ok(Json(exit.info(&egress).await?).into_response())
}

async fn metrics(State(exit): State<Arc<Exit>>) -> Response {
    let m = &exit.metrics;
    let mut out = String::new();
    let counters = [
        (
            "wgexitd_leases_granted_total",
            "Leases granted.",
            &m.leases_granted,
        ),
        (
            "wgexitd_leases_renewed_total",
            "Lease requests answered with an existing lease.",
            &m.leases_renewed,
        ),
        (
            "wgexitd_leases_released_total",
            "Leases released.",
            &m.leases_released,
        ),
        (
            "wgexitd_leases_collected_total",
            "Leases of peers gone idle, collected.",
            &m.leases_collected,
        ),
        (
            "wgexitd_auth_failures_total",
            "Requests refused for their token.",
            &m.auth_failures,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let counts = exit.lease_counts().await;
    let _ = writeln!(
        out,
        "# HELP wgexitd_leases Live leases per egress.\n# TYPE wgexitd_leases gauge"
    );
    for (egress, n, _) in &counts {
        let _ = writeln!(out, "wgexitd_leases{{egress=\"{egress}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP wgexitd_pool_capacity Leasable addresses per egress.\n# TYPE wgexitd_pool_capacity gauge");
    for (egress, _, cap) in &counts {
        let _ = writeln!(out, "wgexitd_pool_capacity{{egress=\"{egress}\"}} {cap}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
