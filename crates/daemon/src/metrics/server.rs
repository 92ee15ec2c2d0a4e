//! `[metrics] listen`: `/metrics` over plain HTTP, and nothing else (404). The gauges are
//! brought up to date from the status snapshot at each scrape.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::bytes::ByteTally;
use super::text::{
    to_prometheus, wants_openmetrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE,
};
use super::{EgressIpLabels, Metrics, PeerAgeLabels};
use crate::leases::service::LeaseService;
use crate::status::snapshot::{self, EgressView};

struct Scrape {
    service: Arc<LeaseService>,
    tally: Mutex<ByteTally>,
}

/// Sets the gauges of one egress and adds its bytes since the last scrape.
fn update_egress(
    metrics: &Metrics,
    tally: &Mutex<ByteTally>,
    view: &EgressView<'_>,
    now: SystemTime,
) {
    let status = snapshot::summarize(view, now, false);
    let egress = Metrics::egress(&status.name);
    metrics
        .leases
        .get_or_create(&egress)
        .set(status.leases as i64);
    metrics
        .capacity
        .get_or_create(&egress)
        .set(status.capacity as i64);
    for (ip, leases) in &status.ip_leases {
        let labels = EgressIpLabels {
            egress: status.name.clone(),
            ip: ip.to_string(),
        };
        metrics.ip_leases.get_or_create(&labels).set(*leases as i64);
    }
    for count in &status.peers.handshake_age {
        let labels = PeerAgeLabels {
            egress: status.name.clone(),
            handshake_age: count.bucket.clone(),
        };
        metrics.peers.get_or_create(&labels).set(count.peers as i64);
    }
    let peers: Vec<_> = match &view.device {
        Ok(Some(d)) => d
            .peers
            .iter()
            .map(|p| (p.public_key, (p.rx_bytes, p.tx_bytes)))
            .collect(),
        _ => Vec::new(),
    };
    let (rx, tx) = match tally.lock() {
        Ok(mut t) => t.observe(&status.name, &peers),
        Err(poisoned) => poisoned.into_inner().observe(&status.name, &peers),
    };
    metrics.received_bytes.get_or_create(&egress).inc_by(rx);
    metrics.transmitted_bytes.get_or_create(&egress).inc_by(tx);
}

async fn scrape(State(s): State<Arc<Scrape>>, headers: HeaderMap) -> Response {
    let now = SystemTime::now();
    for view in snapshot::read(&s.service).await {
        update_egress(&s.service.metrics, &s.tally, &view, now);
    }
    for (network, containers, peers) in s.service.member_counts().await {
        s.service
            .metrics
            .network_members(&network, containers, peers);
    }
    let openmetrics = s.service.metrics.encode_openmetrics();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            openmetrics,
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            to_prometheus(&openmetrics),
        )
            .into_response()
    }
}

pub fn router(service: Arc<LeaseService>) -> Router {
    let state = Arc::new(Scrape {
        service,
        tally: Mutex::new(ByteTally::default()),
    });
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is served here\n") })
        .with_state(state)
}

/// Binds `listen` and serves `/metrics` until the task is aborted.
pub fn spawn(
    listen: SocketAddr,
    service: Arc<LeaseService>,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let router = router(service);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    }))
}
