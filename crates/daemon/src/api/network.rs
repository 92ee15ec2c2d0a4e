//! The private networks' routes: members (containers) and peers (laptops) per network, and
//! the network's info, each authorized by a token of that network.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use super::http::{decode_path_key, Caller, InNetwork, RequestError};
use super::ApiState;
use wgexit::api::{MemberKind, MemberRequest, PeerRequest};

type Shared = State<Arc<ApiState>>;

pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/network/{network}", get(info))
        .route(
            "/v1/network/{network}/members",
            get(list_members).post(lease_member),
        )
        .route(
            "/v1/network/{network}/members/{key}",
            delete(release_member),
        )
        .route(
            "/v1/network/{network}/peers",
            get(list_peers).post(add_peer),
        )
        .route("/v1/network/{network}/peers/{key}", delete(remove_peer))
}

type NetworkCaller = Caller<InNetwork>;

/// A JSON body of at most the API's limit, no unknown fields, checked by `validate`.
fn decode<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    validate: impl Fn(&T) -> Result<(), String>,
) -> Result<T, RequestError> {
    let body = body.map_err(|e| RequestError::BadRequest(format!("request body: {e}")))?;
    let req: T = serde_json::from_slice(&body)
        .map_err(|e| RequestError::BadRequest(format!("request body: {e}")))?;
    validate(&req).map_err(RequestError::BadRequest)?;
    Ok(req)
}

type Answer = Result<Response, RequestError>;

async fn lease_member(
    State(api): Shared,
    caller: NetworkCaller,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let req = decode(body, MemberRequest::validate)?;
    let grant = api
        .service
        .lease_member(caller.name(), &caller.owner, req)
        .await?;
    Ok(Json(grant).into_response())
}

async fn add_peer(
    State(api): Shared,
    caller: NetworkCaller,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let req = decode(body, PeerRequest::validate)?;
    let grant = api
        .service
        .add_peer(caller.name(), &caller.owner, req)
        .await?;
    Ok(Json(grant).into_response())
}

async fn release(api: &ApiState, caller: &NetworkCaller, kind: MemberKind, key: &str) -> Answer {
    let key = decode_path_key(key)?;
    api.service
        .release(&caller.space, Some(&caller.owner), Some(kind), &key)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn release_member(
    State(api): Shared,
    caller: NetworkCaller,
    Path((_, key)): Path<(String, String)>,
) -> Answer {
    release(&api, &caller, MemberKind::Container, &key).await
}

async fn remove_peer(
    State(api): Shared,
    caller: NetworkCaller,
    Path((_, key)): Path<(String, String)>,
) -> Answer {
    release(&api, &caller, MemberKind::Peer, &key).await
}

async fn list_members(State(api): Shared, caller: NetworkCaller) -> Answer {
    let list = api
        .service
        .list_members(caller.name(), MemberKind::Container)
        .await?;
    Ok(Json(list).into_response())
}

async fn list_peers(State(api): Shared, caller: NetworkCaller) -> Answer {
    let list = api
        .service
        .list_members(caller.name(), MemberKind::Peer)
        .await?;
    Ok(Json(list).into_response())
}

async fn info(State(api): Shared, caller: NetworkCaller) -> Answer {
    Ok(Json(api.service.network_info(caller.name()).await?).into_response())
}
