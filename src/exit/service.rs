//! The exit node's operations, independent of HTTP: lease, release, list, reconcile.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use ipnet::Ipv4Net;
use tokio::sync::Mutex;

use crate::api::{EgressInfo, Lease, LeaseGrant, LeaseList, LeaseRequest};
use crate::exit::collect::{Activity, Idle, Timeouts};
use crate::exit::commit::Pending;
use crate::exit::config::{Config, EgressConfig};
use crate::exit::firewall::EgressRules;
use crate::exit::ratelimit::FailedAuthLimiter;
use crate::exit::reconcile::{exit_peer, read_device, reconcile_egress, Changes, ReconcileError};
use crate::exit::registry::{LeaseError, Registry};
use crate::exit::tokens::{owner_id, Tokens};
use crate::keys::Key;
use crate::net::Netlink;
use crate::wg::{Backend, PeerStatus, WgError, WireGuard};

#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    #[error("token not accepted for egress {0:?} (or no such egress)")]
    Unauthorized(String),
    #[error("too many failed authentications from this address; retry in {} s", .0.as_secs())]
    RateLimited(std::time::Duration),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("WireGuard: {0}")]
    Wg(#[from] WgError),
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub leases_granted: AtomicU64,
    pub leases_renewed: AtomicU64,
    pub leases_released: AtomicU64,
    pub leases_collected: AtomicU64,
    pub auth_failures: AtomicU64,
}

pub struct Exit {
    pub config: Config,
    registry: Mutex<Registry>,
    backend: Backend,
    netlink: Netlink,
    private_keys: HashMap<String, Key>,
    /// Derived once: a Curve25519 scalar multiplication per lease showed in profiles.
    public_keys: HashMap<String, Key>,
    tokens: HashMap<String, Tokens>,
    pub metrics: Metrics,
    failed_auth: FailedAuthLimiter,
}

impl Exit {
    pub fn new(
        config: Config,
        registry: Registry,
        backend: Backend,
        netlink: Netlink,
        private_keys: HashMap<String, Key>,
        tokens: HashMap<String, Tokens>,
    ) -> Exit {
        let public_keys = private_keys
            .iter()
            .map(|(egress, key)| (egress.clone(), key.public()))
            .collect();
        Exit {
            config,
            registry: Mutex::new(registry),
            backend,
            netlink,
            private_keys,
            public_keys,
            tokens,
            metrics: Metrics::default(),
            failed_auth: FailedAuthLimiter::default(),
        }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Checks `token` against `egress`'s tokens; returns the owner id it stands for. A
    /// source that failed too often is refused before its token is looked at.
    pub fn authorize(
        &self,
        source: IpAddr,
        egress: &str,
        token: Option<&str>,
    ) -> Result<String, ExitError> {
        let now = Instant::now();
        self.failed_auth
            .check(source, now)
            .map_err(ExitError::RateLimited)?;
        match (self.tokens.get(egress), token) {
            (Some(tokens), Some(t)) if tokens.accepts(t) => Ok(owner_id(t)),
            _ => {
                self.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                self.failed_auth.failed(source, now);
                Err(ExitError::Unauthorized(egress.to_string()))
            }
        }
    }

    fn egress_config(&self, egress: &str) -> Result<&EgressConfig, ExitError> {
        self.config
            .egress(egress)
            .ok_or_else(|| ExitError::Unauthorized(egress.to_string()))
    }

    fn server_public_key(&self, egress: &str) -> Result<Key, ExitError> {
        self.public_keys
            .get(egress)
            .copied()
            .ok_or_else(|| ExitError::Unauthorized(egress.to_string()))
    }

    pub async fn lease(
        &self,
        egress: &str,
        owner: &str,
        req: LeaseRequest,
    ) -> Result<LeaseGrant, ExitError> {
        req.validate().map_err(ExitError::BadRequest)?;
        let cfg = self.egress_config(egress)?;
        let server_public_key = self.server_public_key(egress)?;
        let mut registry = self.registry.lock().await;
        let (stored, new, durable) = registry.lease(egress, &req, owner)?;
        // Always (re)install the peer: cheap, and it heals a peer lost since.
        let peer = exit_peer(req.public_key, stored.lease.address);
        if let Err(e) = self.backend.set_peer(&cfg.wg_interface, &peer).await {
            if new {
                // Queued after the lease's own write, so the store ends without it.
                let _ = registry.release(egress, &req.public_key, None);
            }
            return Err(e.into());
        }
        drop(registry);
        // Durable before the API answers; the fsync is shared with concurrent requests and
        // made without the registry lock.
        if let Err(e) = durable.durable().await {
            if new {
                let _ = self.release(egress, None, &req.public_key).await;
            }
            return Err(LeaseError::Store(e).into());
        }
        if new {
            self.metrics.leases_granted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.metrics.leases_renewed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(LeaseGrant {
            address: Ipv4Net::from(stored.lease.address),
            lease: stored.lease,
            server_public_key,
            endpoint: cfg.endpoint,
            gateway: cfg.overlay_ip(),
            egress_ip: cfg.ip,
            persistent_keepalive: self.config.persistent_keepalive,
        })
    }

    /// Releases a lease made with the same token; `owner: None` releases any (collection).
    pub async fn release(
        &self,
        egress: &str,
        owner: Option<&str>,
        key: &Key,
    ) -> Result<Lease, ExitError> {
        let cfg = self.egress_config(egress)?;
        let mut registry = self.registry.lock().await;
        // Check ownership before touching the device.
        registry.releasable(egress, key, owner)?;
        let (removed, durable) = self.remove_lease(&mut registry, cfg, key).await?;
        drop(registry);
        durable.durable().await.map_err(LeaseError::Store)?;
        self.metrics.leases_released.fetch_add(1, Ordering::Relaxed);
        Ok(removed)
    }

    /// Takes `key`'s peer off the device, then its lease out of the store and the pool.
    /// Called with the registry locked, so the address is free for the next lease only once
    /// no peer holds it any more: one address never reaches two peers. The removal is
    /// durable once the returned [`Pending`] resolves; await it after letting the lock go.
    async fn remove_lease(
        &self,
        registry: &mut Registry,
        cfg: &EgressConfig,
        key: &Key,
    ) -> Result<(Lease, Pending), ExitError> {
        self.backend.remove_peer(&cfg.wg_interface, key).await?;
        let (removed, durable) = registry.release(&cfg.name, key, None)?;
        Ok((removed.lease, durable))
    }

    /// Releases the leases whose peers have gone away (see [`crate::exit::collect`]).
    /// Returns what was collected, with why.
    pub async fn collect(&self, activity: &mut Activity) -> Vec<(Lease, Idle)> {
        let timeouts = Timeouts {
            peer: self.config.peer_timeout,
            first_handshake: self.config.first_handshake_timeout,
        };
        let mut removed = Vec::new();
        for cfg in &self.config.egress {
            // Read without the lock (a device with many peers takes a while); a lease made
            // since is simply not seen yet, and its first-handshake clock starts next time.
            let status = match self.backend.status(&cfg.wg_interface).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(egress = %cfg.name, error = %e, "cannot read the WireGuard device; nothing collected");
                    continue;
                }
            };
            let peers: HashMap<Key, &PeerStatus> =
                status.peers.iter().map(|p| (p.public_key, p)).collect();
            let mut registry = self.registry.lock().await;
            let leased: HashSet<Key> = match registry.egress(&cfg.name) {
                Ok(e) => e.leases().map(|l| l.lease.public_key).collect(),
                Err(_) => continue,
            };
            activity.retain(&cfg.name, &leased);
            let now = SystemTime::now();
            for key in leased {
                let peer = peers.get(&key).copied();
                let Some(why) = activity.observe(&cfg.name, &key, peer, now, timeouts) else {
                    continue;
                };
                match self.remove_lease(&mut registry, cfg, &key).await {
                    Ok((lease, durable)) => removed.push((lease, why, durable)),
                    Err(e) => {
                        tracing::error!(egress = %cfg.name, public_key = %key, error = %e, "cannot collect an idle lease; will retry")
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (lease, why, durable) in removed {
            match durable.durable().await {
                Ok(()) => {
                    self.metrics
                        .leases_collected
                        .fetch_add(1, Ordering::Relaxed);
                    out.push((lease, why));
                }
                Err(e) => {
                    tracing::error!(egress = %lease.egress, public_key = %lease.public_key, error = %e, "collected an idle lease but could not write that to the store")
                }
            }
        }
        out
    }

    pub async fn list(&self, egress: &str) -> Result<LeaseList, ExitError> {
        let registry = self.registry.lock().await;
        let mut leases: Vec<Lease> = registry
            .egress(egress)?
            .leases()
            .map(|l| l.lease.clone())
            .collect();
        leases.sort_by_key(|l| l.address);
        Ok(LeaseList { leases })
    }

    pub async fn info(&self, egress: &str) -> Result<EgressInfo, ExitError> {
        let cfg = self.egress_config(egress)?;
        let registry = self.registry.lock().await;
        let e = registry.egress(egress)?;
        Ok(EgressInfo {
            name: cfg.name.clone(),
            egress_ip: cfg.ip,
            endpoint: cfg.endpoint,
            server_public_key: self.server_public_key(egress)?,
            pool: cfg.pool,
            leases: e.len(),
            capacity: e.capacity(),
        })
    }

    /// Lease counts per egress, for metrics.
    pub async fn lease_counts(&self) -> Vec<(String, usize, usize)> {
        let registry = self.registry.lock().await;
        let mut out: Vec<_> = registry
            .egresses()
            .map(|e| (e.config.name.clone(), e.len(), e.capacity()))
            .collect();
        out.sort();
        out
    }

    /// Makes every egress's device match the store (see [`reconcile_egress`]).
    pub async fn reconcile(&self) -> Result<Vec<(String, Changes)>, ReconcileError> {
        let mut out = Vec::new();
        for cfg in &self.config.egress {
            let Some(key) = self.private_keys.get(&cfg.name) else {
                continue;
            };
            // Read the device without the lock, so leases go on meanwhile; apply the
            // (single-peer) changes with it, so none races a lease or a release.
            let device = read_device(&self.backend, cfg).await?;
            let registry = self.registry.lock().await;
            let peers: Vec<_> = registry
                .egress(&cfg.name)
                .map(|e| {
                    e.leases()
                        .map(|l| exit_peer(l.lease.public_key, l.lease.address))
                        .collect()
                })
                .unwrap_or_default();
            let changes =
                reconcile_egress(&self.backend, &self.netlink, cfg, key, device, &peers).await?;
            drop(registry);
            out.push((cfg.name.clone(), changes));
        }
        Ok(out)
    }

    /// The rtnetlink handle on the exit node's namespace.
    pub fn netlink(&self) -> &Netlink {
        &self.netlink
    }

    /// The nftables rules every egress needs.
    pub fn firewall_rules(&self) -> Vec<EgressRules> {
        self.config.egress.iter().map(rules_for).collect()
    }
}

pub fn rules_for(e: &EgressConfig) -> EgressRules {
    EgressRules {
        name: e.name.clone(),
        wg_interface: e.wg_interface.clone(),
        uplink: e.interface.clone(),
        pools: vec![e.pool.into()],
        overlay_ips: vec![e.overlay_ip().into()],
        snat: vec![(e.pool.into(), e.ip.into())],
        policy: e.policy.clone(),
    }
}
