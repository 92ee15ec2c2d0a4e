//! Who may call the API: bearer tokens scoped to one egress or private network, re-read
//! when their files change, with failed attempts limited per source address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;

use super::ratelimit::FailedAuthLimiter;
use super::tokens::{TokenError, Tokens};
use crate::config::Config;
use crate::dataplane::SpaceDevice;
use crate::space::Space;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token not accepted for {} {:?} (or no such {})", .0.kind(), .0.name(), .0.kind())]
    Unauthorized(Space),
    #[error("too many failed authentications from this address; retry in {} s", .0.as_secs())]
    RateLimited(Duration),
}

/// One space's token file and what was read from it.
struct TokenFile {
    path: PathBuf,
    modified: Option<SystemTime>,
    tokens: Tokens,
}

impl TokenFile {
    fn read(path: &PathBuf) -> Result<TokenFile, TokenError> {
        Ok(TokenFile {
            path: path.clone(),
            modified: modified(path),
            tokens: Tokens::load(path)?,
        })
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub struct Authorizer {
    /// By space (a network may share its name with an egress).
    files: RwLock<HashMap<Space, TokenFile>>,
    failed: FailedAuthLimiter,
    /// Requests refused for their token, for `/metrics`.
    pub failures: Counter,
}

impl Authorizer {
    /// Reads every egress's and network's token file.
    pub fn load(config: &Config) -> Result<Authorizer, TokenError> {
        let mut files = HashMap::new();
        for e in &config.egress {
            files.insert(e.space(), TokenFile::read(&e.token_file)?);
        }
        for n in &config.network {
            files.insert(n.space(), TokenFile::read(&n.token_file)?);
        }
        Ok(Authorizer {
            files: RwLock::new(files),
            failed: FailedAuthLimiter::default(),
            failures: Counter::default(),
        })
    }

    /// Re-reads the token files that changed since they were read (`force`: all of them).
    /// A file that cannot be read or holds no valid token keeps its previous tokens, so a
    /// half-written edit locks nobody out; the error is logged.
    pub fn reload(&self, force: bool) {
        let stale: Vec<(Space, PathBuf)> = match self.files.read() {
            Ok(files) => files
                .iter()
                .filter(|(_, f)| force || modified(&f.path) != f.modified)
                .map(|(space, f)| (space.clone(), f.path.clone()))
                .collect(),
            Err(_) => return,
        };
        for (space, path) in stale {
            match TokenFile::read(&path) {
                Ok(file) => {
                    if let Ok(mut files) = self.files.write() {
                        files.insert(space.clone(), file);
                    }
                    tracing::info!(%space, path = %path.display(), "token file re-read");
                }
                Err(e) => {
                    tracing::error!(%space, error = %e, "token file not re-read; the tokens read before stay valid")
                }
            }
        }
    }

    /// Checks `token` against `space`'s tokens; returns the owner it stands for. A valid
    /// token is always let through; a wrong one counts against its source address, which
    /// gets 429 instead of 401 once it has failed too often.
    pub fn authorize(
        &self,
        source: IpAddr,
        space: &Space,
        token: Option<&str>,
    ) -> Result<String, AuthError> {
        self.check(source, space, token)
            .map_err(|()| AuthError::Unauthorized(space.clone()))?
    }

    /// How many owners `space`'s token file names (1 when it cannot tell).
    pub fn owners(&self, space: &Space) -> usize {
        let files = self.files.read().ok();
        let owners = files
            .as_ref()
            .and_then(|f| Some(f.get(space)?.tokens.owners()));
        owners.unwrap_or(1).max(1)
    }

    /// `Ok(Ok(owner))` for an accepted token, `Ok(Err)` for a refused token from a source
    /// over its limit, `Err(())` for a refused token (counted against the source).
    fn check(
        &self,
        source: IpAddr,
        space: &Space,
        token: Option<&str>,
    ) -> Result<Result<String, AuthError>, ()> {
        let owner = token.and_then(|t| {
            let files = self.files.read().ok()?;
            files.get(space)?.tokens.owner(t).map(String::from)
        });
        if let Some(owner) = owner {
            return Ok(Ok(owner));
        }
        self.failures.inc();
        let now = Instant::now();
        if let Err(retry) = self.failed.check(source, now) {
            return Ok(Err(AuthError::RateLimited(retry)));
        }
        self.failed.failed(source, now);
        Err(())
    }
}
