//! Who may call the API: bearer tokens scoped to one egress or network, with failed attempts limited
//! per source address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ratelimit::FailedAuthLimiter;
use super::tokens::{owner_id, TokenError, Tokens};
use crate::exit::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token not accepted for egress {0:?} (or no such egress)")]
    Unauthorized(String),
    #[error("token not accepted for network {0:?} (or no such network)")]
    UnauthorizedNetwork(String),
    #[error("too many failed authentications from this address; retry in {} s", .0.as_secs())]
    RateLimited(Duration),
}

pub struct Authorizer {
    tokens: HashMap<String, Tokens>,
    /// Each private network's tokens (a network may share its name with an egress).
    network_tokens: HashMap<String, Tokens>,
    failed: FailedAuthLimiter,
    /// Requests refused for their token, for `/metrics`.
    pub failures: AtomicU64,
}

impl Authorizer {
    /// Reads every egress's token file.
    pub fn load(config: &Config) -> Result<Authorizer, TokenError> {
        let mut tokens = HashMap::new();
        for e in &config.egress {
            tokens.insert(e.name.clone(), Tokens::load(&e.token_file)?);
        }
        let mut network_tokens = HashMap::new();
        for n in &config.network {
            network_tokens.insert(n.name.clone(), Tokens::load(&n.token_file)?);
        }
        Ok(Authorizer {
            tokens,
            network_tokens,
            failed: FailedAuthLimiter::default(),
            failures: AtomicU64::new(0),
        })
    }

    /// Checks `token` against `egress`'s tokens; returns the owner id it stands for. A
    /// source that failed too often is refused before its token is looked at.
    pub fn authorize(
        &self,
        source: IpAddr,
        egress: &str,
        token: Option<&str>,
    ) -> Result<String, AuthError> {
        self.check(source, self.tokens.get(egress), token)
            .ok_or_else(|| AuthError::Unauthorized(egress.to_string()))?
    }

    /// As [`Authorizer::authorize`], against private network `network`'s tokens.
    pub fn authorize_network(
        &self,
        source: IpAddr,
        network: &str,
        token: Option<&str>,
    ) -> Result<String, AuthError> {
        self.check(source, self.network_tokens.get(network), token)
            .ok_or_else(|| AuthError::UnauthorizedNetwork(network.to_string()))?
    }

    /// `Some(Ok(owner))` for an accepted token, `Some(Err)` for a rate-limited source,
    /// `None` for a refused token (counted against the source).
    fn check(
        &self,
        source: IpAddr,
        tokens: Option<&Tokens>,
        token: Option<&str>,
    ) -> Option<Result<String, AuthError>> {
        let now = Instant::now();
        if let Err(retry) = self.failed.check(source, now) {
            return Some(Err(AuthError::RateLimited(retry)));
        }
        match (tokens, token) {
            (Some(tokens), Some(t)) if tokens.accepts(t) => Some(Ok(owner_id(t))),
            _ => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.failed.failed(source, now);
                None
            }
        }
    }
}
