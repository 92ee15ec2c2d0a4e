//! The HTTPS control API: routes ([`http`]), who may call them ([`auth`], [`tokens`],
//! [`ratelimit`]), the TLS material ([`tls`]); each request counted and timed ([`observe`]).
//! `/metrics` is not served here but on its own listener ([`crate::metrics`]).
//! Wire types are shared with the plugin in [`wgexit::api`].

pub mod auth;
pub mod http;
pub mod limits;
pub mod network;
pub mod observe;
pub mod ratelimit;
pub mod tls;
pub mod tokens;

use std::sync::Arc;

use crate::dataplane::HostDataplane;
use crate::leases::service::LeaseService;

/// What the routes work with.
pub struct ApiState<D = HostDataplane> {
    /// Every space's leases: the egresses' and the private networks' members and peers.
    pub service: Arc<LeaseService<D>>,
    pub auth: auth::Authorizer,
}
