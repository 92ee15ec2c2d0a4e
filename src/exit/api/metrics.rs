//! `/metrics`: Prometheus text of the lease counters and per-egress gauges.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::ApiState;

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        value.load(Ordering::Relaxed)
    );
}

fn gauge_per_egress<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'a str, usize)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (egress, v) in values {
        let _ = writeln!(out, "{name}{{egress=\"{egress}\"}} {v}");
    }
}

pub async fn metrics(State(api): State<Arc<ApiState>>) -> Response {
    let c = &api.service.counters;
    let mut out = String::new();
    counter(
        &mut out,
        "wgexitd_leases_granted_total",
        "Leases granted.",
        &c.granted,
    );
    counter(
        &mut out,
        "wgexitd_leases_renewed_total",
        "Lease requests answered with an existing lease.",
        &c.renewed,
    );
    counter(
        &mut out,
        "wgexitd_leases_released_total",
        "Leases released.",
        &c.released,
    );
    counter(
        &mut out,
        "wgexitd_leases_collected_total",
        "Leases of peers gone idle, collected.",
        &c.collected,
    );
    counter(
        &mut out,
        "wgexitd_auth_failures_total",
        "Requests refused for their token.",
        &api.auth.failures,
    );
    let counts = api.service.lease_counts().await;
    gauge_per_egress(
        &mut out,
        "wgexitd_leases",
        "Live leases per egress.",
        counts.iter().map(|(e, n, _)| (e.as_str(), *n)),
    );
    gauge_per_egress(
        &mut out,
        "wgexitd_pool_capacity",
        "Leasable addresses per egress.",
        counts.iter().map(|(e, _, cap)| (e.as_str(), *cap)),
    );
    let name = "wgexitd_egress_ip_leases";
    let _ = writeln!(
        out,
        "# HELP {name} Live leases per egress IP.\n# TYPE {name} gauge"
    );
    for (egress, ip, n) in api.service.ip_lease_counts().await {
        let _ = writeln!(out, "{name}{{egress=\"{egress}\",ip=\"{ip}\"}} {n}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
