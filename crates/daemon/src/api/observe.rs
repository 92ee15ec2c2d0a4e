//! Every API request counted by route, method and status, and timed: a layer around the
//! router ([`super::http::router`]). The route is the matched pattern
//! (`/v1/egress/{egress}/leases`), so a label never holds a tenant's key; requests no route
//! matched count as `unmatched`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::metrics::Metrics;

/// A method as a label: the ones the API serves, else `other` (a label set stays bounded
/// whatever clients send).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

pub async fn observe(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method());
    let start = Instant::now();
    let response = next.run(req).await;
    metrics.api_request(&route, method, response.status().as_u16(), start.elapsed());
    response
}
