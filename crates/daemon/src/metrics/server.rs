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

use std::collections::HashMap;

use super::bytes::{grown, ByteTally};
use super::text::{
    to_prometheus, wants_openmetrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE,
};
use super::{EgressIpLabels, Metrics, NetworkPeerAgeLabels, PeerAgeLabels, SpaceLabels};
use crate::dataplane::SpaceDevice;
use crate::dns::counts::DnsTotals;
use crate::leases::service::LeaseService;
use crate::space::Space;
use crate::status::snapshot::{self, EgressView, NetworkView, SpaceView};

struct Scrape {
    service: Arc<LeaseService>,
    tally: Mutex<Tally>,
}

/// What the devices and the firewall counted at the last scrape, per space.
#[derive(Default)]
struct Tally {
    bytes: ByteTally,
    drops: HashMap<Space, u64>,
}

/// What grew since the last scrape in `view`'s space: bytes received and transmitted on its
/// device, and packets its firewall counter dropped (the counter starts again from zero
/// when the table is rewritten).
fn grown_since<C: SpaceDevice>(tally: &Mutex<Tally>, view: &SpaceView<'_, C>) -> (u64, u64, u64) {
    let space = view.config.space();
    let peers: Vec<_> = match &view.device {
        Ok(Some(d)) => d
            .peers
            .iter()
            .map(|p| (p.public_key, (p.rx_bytes, p.tx_bytes)))
            .collect(),
        _ => Vec::new(),
    };
    let mut tally = match tally.lock() {
        Ok(t) => t,
        Err(poisoned) => poisoned.into_inner(),
    };
    let (rx, tx) = tally.bytes.observe(&space, &peers);
    let drops = match view.firewall_drops {
        Some(now) => {
            let before = tally.drops.insert(space, now).unwrap_or(0);
            grown(now, before)
        }
        None => 0,
    };
    (rx, tx, drops)
}

fn space_labels(kind: &str, name: &str) -> SpaceLabels {
    SpaceLabels {
        kind: kind.to_string(),
        name: name.to_string(),
    }
}

/// Sets the gauges of one egress and adds its bytes and drops since the last scrape.
fn update_egress(metrics: &Metrics, tally: &Mutex<Tally>, view: &EgressView<'_>, now: SystemTime) {
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
    let (rx, tx, drops) = grown_since(tally, view);
    metrics.received_bytes.get_or_create(&egress).inc_by(rx);
    metrics.transmitted_bytes.get_or_create(&egress).inc_by(tx);
    let space = space_labels("egress", &status.name);
    metrics.firewall_drops.get_or_create(&space).inc_by(drops);
}

/// Sets the gauges of one network and adds its bytes and drops since the last scrape (its
/// resolver counts its queries itself).
fn update_network(
    metrics: &Metrics,
    tally: &Mutex<Tally>,
    view: &NetworkView<'_>,
    now: SystemTime,
) {
    let status = snapshot::summarize_network(view, DnsTotals::default(), now, false);
    let network = Metrics::network(&status.name);
    let members = status.members;
    metrics.network_members(&status.name, members.containers, members.peers);
    for count in &status.peers.handshake_age {
        let labels = NetworkPeerAgeLabels {
            network: status.name.clone(),
            handshake_age: count.bucket.clone(),
        };
        let peers = count.peers as i64;
        metrics.network_peers.get_or_create(&labels).set(peers);
    }
    let (rx, tx, drops) = grown_since(tally, view);
    metrics
        .network_received_bytes
        .get_or_create(&network)
        .inc_by(rx);
    metrics
        .network_transmitted_bytes
        .get_or_create(&network)
        .inc_by(tx);
    let space = space_labels("network", &status.name);
    metrics.firewall_drops.get_or_create(&space).inc_by(drops);
}

async fn scrape(State(s): State<Arc<Scrape>>, headers: HeaderMap) -> Response {
    let now = SystemTime::now();
    for view in snapshot::read(&s.service).await {
        update_egress(&s.service.metrics, &s.tally, &view, now);
    }
    for view in snapshot::read_networks(&s.service).await {
        update_network(&s.service.metrics, &s.tally, &view, now);
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
        tally: Mutex::new(Tally::default()),
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
