//! Who may call the API: bearer tokens scoped to one egress, with failed attempts limited
//! per source address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::ratelimit::FailedAuthLimiter;
use super::tokens::{owner_id, TokenError, Tokens};
use crate::exit::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token not accepted for egress {0:?} (or no such egress)")]
    Unauthorized(String),
    #[error("too many failed authentications from this address; retry in {} s", .0.as_secs())]
    RateLimited(Duration),
}

pub struct Authorizer {
    tokens: HashMap<String, Tokens>,
    failed: FailedAuthLimiter,
    /// Requests refused for their token, for `/metrics`.
    pub failures: Counter,
}

impl Authorizer {
    /// Reads every egress's token file.
    pub fn load(config: &Config) -> Result<Authorizer, TokenError> {
        let mut tokens = HashMap::new();
        for e in &config.egress {
            tokens.insert(e.name.clone(), Tokens::load(&e.token_file)?);
        }
        Ok(Authorizer {
            tokens,
            failed: FailedAuthLimiter::default(),
            failures: Counter::default(),
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
        let now = Instant::now();
        self.failed
            .check(source, now)
            .map_err(AuthError::RateLimited)?;
        match (self.tokens.get(egress), token) {
            (Some(tokens), Some(t)) if tokens.accepts(t) => Ok(owner_id(t)),
            _ => {
                self.failures.inc();
                self.failed.failed(source, now);
                Err(AuthError::Unauthorized(egress.to_string()))
            }
        }
    }
}
