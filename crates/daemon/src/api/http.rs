//! The API's routes (documented in [`wgexit::api`]), mapping errors to statuses.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};

use super::auth::AuthError;
use super::observe::observe;
use super::ApiState;
use crate::dataplane::DataplaneError;
use crate::leases::commit::CommitError;
use crate::leases::members::MemberRefusal;
use crate::leases::registry::LeaseError;
use crate::leases::service::ServiceError;
use crate::space::Space;
use wgexit::api::{ApiError, LeaseRequest, MAX_BODY_BYTES, STORE_UNAVAILABLE};
use wgexit::keys::Key;

/// Why a request was not served, in an egress or a network.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("WireGuard: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Member(#[from] MemberRefusal),
}

impl From<ServiceError> for RequestError {
    fn from(e: ServiceError) -> RequestError {
        match e {
            ServiceError::Lease(e) => RequestError::Lease(e),
            ServiceError::Dataplane(e) => RequestError::Dataplane(e),
            ServiceError::Member(e) => RequestError::Member(e),
        }
    }
}

pub(super) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: code.to_string(),
            message: message.into(),
        }),
    )
        .into_response()
}

fn rate_limited(retry: &Duration, msg: String) -> Response {
    let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, retry.as_secs().max(1).into());
    r
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match &self {
            RequestError::Auth(AuthError::Unauthorized(_))
            | RequestError::Lease(LeaseError::Unknown(_)) => {
                error(StatusCode::UNAUTHORIZED, "unauthorized", msg)
            }
            RequestError::Auth(AuthError::RateLimited(retry)) => rate_limited(retry, msg),
            RequestError::BadRequest(_) => error(StatusCode::BAD_REQUEST, "bad_request", msg),
            RequestError::Lease(LeaseError::PoolExhausted { .. }) => {
                error(StatusCode::SERVICE_UNAVAILABLE, "pool_exhausted", msg)
            }
            RequestError::Lease(LeaseError::EgressIpsExhausted { .. }) => {
                error(StatusCode::CONFLICT, "egress_ips_exhausted", msg)
            }
            RequestError::Lease(LeaseError::QuotaExceeded { .. }) => {
                error(StatusCode::CONFLICT, "quota_exceeded", msg)
            }
            RequestError::Lease(LeaseError::NotFound { .. }) => {
                error(StatusCode::NOT_FOUND, "not_found", msg)
            }
            RequestError::Lease(LeaseError::NotOwner { .. }) => {
                error(StatusCode::FORBIDDEN, "forbidden", msg)
            }
            RequestError::Lease(LeaseError::Store(CommitError::Store(e))) if e.unavailable => {
                tracing::warn!(error = %msg, "lease store unavailable");
                error(StatusCode::SERVICE_UNAVAILABLE, STORE_UNAVAILABLE, msg)
            }
            RequestError::Lease(LeaseError::Store(CommitError::Refused(_))) => {
                // Another pool member kept taking what this request reached for.
                error(StatusCode::SERVICE_UNAVAILABLE, STORE_UNAVAILABLE, msg)
            }
            RequestError::Lease(LeaseError::Store(_)) => {
                tracing::error!(error = %msg, "lease store failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, "store_error", msg)
            }
            RequestError::Dataplane(_) => {
                tracing::error!(error = %msg, "WireGuard operation failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, "wireguard_error", msg)
            }
            RequestError::Member(MemberRefusal::PeerNameTaken { .. }) => {
                error(StatusCode::CONFLICT, "name_taken", msg)
            }
            RequestError::Member(MemberRefusal::NotFound { .. }) => {
                error(StatusCode::NOT_FOUND, "not_found", msg)
            }
        }
    }
}

/// A lease request body as the API takes it: JSON (serde_json limits nesting to 128 levels;
/// the body is at most [`MAX_BODY_BYTES`]), no unknown fields, bounded fields, a usable key.
pub fn decode_lease_request(body: &[u8]) -> Result<LeaseRequest, RequestError> {
    let req: LeaseRequest = serde_json::from_slice(body).map_err(|e| {
        RequestError::BadRequest(format!("request body is not a lease request: {e}"))
    })?;
    req.validate().map_err(RequestError::BadRequest)?;
    Ok(req)
}

/// The `{public_key}` of a lease path (already percent-decoded by the router).
pub fn decode_path_key(key: &str) -> Result<Key, RequestError> {
    Key::from_base64(key).map_err(|e| {
        let shown: String = key.chars().take(64).collect();
        RequestError::BadRequest(format!("{shown:?} in the path: {e}"))
    })
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

type Shared = State<Arc<ApiState>>;

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/egress/{egress}", get(egress_info))
        .route("/v1/egress/{egress}/leases", get(list).post(lease))
        .route("/v1/egress/{egress}/leases/{key}", delete(release))
        .merge(super::network::routes())
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; the API lives under /v1",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.service.metrics.clone(),
            observe,
        ))
        .with_state(state)
}

/// The kind of space a route's path names, and the path parameter that names it.
pub(super) trait PathSpace {
    const PARAM: &'static str;
    fn space(name: String) -> Space;
}

/// Routes under `/v1/egress/{egress}`.
pub(super) struct InEgress;

impl PathSpace for InEgress {
    const PARAM: &'static str = "egress";
    fn space(name: String) -> Space {
        Space::Egress(name)
    }
}

/// Routes under `/v1/network/{network}`.
pub(super) struct InNetwork;

impl PathSpace for InNetwork {
    const PARAM: &'static str = "network";
    fn space(name: String) -> Space {
        Space::Network(name)
    }
}

/// A caller whose bearer token the space named in the path accepts, with the owner id that
/// token stands for. Extracting it authorizes the request (see
/// [`super::auth::Authorizer`]); an unknown space is refused as unauthorized, so names
/// cannot be probed.
pub(super) struct Caller<K> {
    pub space: Space,
    pub owner: String,
    kind: PhantomData<K>,
}

impl<K> Caller<K> {
    /// The space's name, as the lease service's operations take it.
    pub fn name(&self) -> &str {
        self.space.name()
    }
}

impl<K: PathSpace + Send + Sync> FromRequestParts<Arc<ApiState>> for Caller<K> {
    type Rejection = RequestError;

    async fn from_request_parts(
        parts: &mut Parts,
        api: &Arc<ApiState>,
    ) -> Result<Caller<K>, RequestError> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, api)
            .await
            .map_err(|e| RequestError::BadRequest(e.body_text()))?;
        let space = K::space(params.get(K::PARAM).cloned().unwrap_or_default());
        let source = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| peer.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let owner = api.auth.authorize(source, &space, bearer(&parts.headers))?;
        Ok(Caller {
            space,
            owner,
            kind: PhantomData,
        })
    }
}

type EgressCaller = Caller<InEgress>;

async fn lease(
    State(api): Shared,
    caller: EgressCaller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, RequestError> {
    let body = body.map_err(|e| RequestError::BadRequest(format!("request body: {e}")))?;
    let req = decode_lease_request(&body)?;
    let owners = api.auth.owners(&caller.space);
    let grant = api
        .service
        .lease(caller.name(), (&caller.owner, owners), req)
        .await?;
    Ok(Json(grant).into_response())
}

async fn release(
    State(api): Shared,
    caller: EgressCaller,
    Path((_, key)): Path<(String, String)>,
) -> Result<Response, RequestError> {
    let key = decode_path_key(&key)?;
    api.service
        .release(&caller.space, Some(&caller.owner), None, &key)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list(State(api): Shared, caller: EgressCaller) -> Result<Response, RequestError> {
    Ok(Json(api.service.list(caller.name(), &caller.owner).await?).into_response())
}

async fn egress_info(State(api): Shared, caller: EgressCaller) -> Result<Response, RequestError> {
    Ok(Json(api.service.info(caller.name()).await?).into_response())
}
