//! The lease service: what the API asks of the exit node, independent of HTTP and of tokens.
//!
//! It keeps the [`Registry`] (and through it the store) and the [`Dataplane`] in step: a
//! lease is programmed on the device before it is answered, a release takes the peer off
//! the device before the address is free again, and [`LeaseService::reconcile`] makes every
//! device match the store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::Mutex;

pub(super) mod remote;

use super::collect::{Activity, Idle, Now, Timeouts};
use super::commit::{CommitError, Pending};
use super::members::{self, kind_of, MemberRefusal, Members};
use super::registry::{Adopted, LeaseError, Registry};
use super::store::{Refusal, StoredLease};
use crate::config::{Config, EgressConfig, NetworkConfig};
use crate::dataplane::{
    Changes, Dataplane, DataplaneError, HostDataplane, Peer, SpaceDevice, SpacesDataplane,
};
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::space::Space;
use wgexit::api::{
    EgressInfo, EgressIpInfo, Lease, LeaseGrant, LeaseList, LeaseRequest, MemberKind,
};
use wgexit::keys::Key;
use wgexit::wg::PeerStatus;

/// Why the lease service refused or failed a request, in an egress or a network (each
/// variant names its space).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// What only a private network's members can be refused.
    #[error(transparent)]
    Member(#[from] MemberRefusal),
}

impl From<CommitError> for ServiceError {
    fn from(e: CommitError) -> ServiceError {
        ServiceError::Lease(LeaseError::Store(e))
    }
}

pub struct LeaseService<D = HostDataplane> {
    pub config: Config,
    registry: Mutex<Registry>,
    /// Stored leases this config has no place for; kept until pruned.
    misfits: Mutex<Vec<StoredLease>>,
    dataplane: D,
    identities: Identities,
    /// What `/metrics` exports; leases, releases and collections are counted here.
    pub metrics: Arc<Metrics>,
    /// The private networks' identities and resolvers' directories (see [`super::members`]).
    pub(super) members: Members,
}

impl<D: SpacesDataplane> LeaseService<D> {
    /// `identities`: the egresses' and the networks' WireGuard identities.
    pub fn new(
        config: Config,
        (registry, misfits): (Registry, Vec<StoredLease>),
        dataplane: D,
        (identities, network_identities): (Identities, Identities),
    ) -> LeaseService<D> {
        let metrics = Arc::new(Metrics::new());
        LeaseService {
            members: Members::new(&config.network, network_identities, &metrics),
            config,
            registry: Mutex::new(registry),
            misfits: Mutex::new(misfits),
            dataplane,
            identities,
            metrics,
        }
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// The registry: one registry, one store and one lock for every space's leases.
    pub fn registry(&self) -> &Mutex<Registry> {
        &self.registry
    }

    fn egress_config(&self, egress: &str) -> Result<&EgressConfig, LeaseError> {
        self.config
            .egress(egress)
            .ok_or_else(|| LeaseError::Unknown(Space::Egress(egress.to_string())))
    }

    pub(super) fn network_config(&self, network: &str) -> Result<&NetworkConfig, LeaseError> {
        self.config
            .network(network)
            .ok_or_else(|| LeaseError::Unknown(Space::Network(network.to_string())))
    }

    fn server_public_key(&self, egress: &str) -> Result<Key, LeaseError> {
        self.identities
            .public(egress)
            .ok_or_else(|| LeaseError::Unknown(Space::Egress(egress.to_string())))
    }

    /// Grants `owner` a lease in `egress` for `req`'s key (or returns the one it holds), with
    /// its peer on the device and the lease durable before it returns. In a pool the shared
    /// store may refuse an address another member took a moment ago: another is tried.
    /// `owners`: how many owners the egress's tokens name, for the owner's fair share of the
    /// pool (see [`crate::config::quota`]).
    pub async fn lease(
        &self,
        egress: &str,
        (owner, owners): (&str, usize),
        req: LeaseRequest,
    ) -> Result<LeaseGrant, ServiceError> {
        remote::retried(|| self.lease_once(egress, (owner, owners), req.clone())).await
    }

    async fn lease_once(
        &self,
        egress: &str,
        (owner, owners): (&str, usize),
        req: LeaseRequest,
    ) -> Result<LeaseGrant, ServiceError> {
        let cfg = self.egress_config(egress)?;
        let server_public_key = self.server_public_key(egress)?;
        let mut registry = self.registry.lock().await;
        let space = cfg.space();
        let quota = self
            .config
            .max_leases_per_owner
            .per_owner(registry.egress(&space)?.capacity(), owners);
        let (stored, new, durable) = registry.lease(&space, &req, owner, quota)?;
        // Always (re)install the peer: cheap, and it heals a peer lost since. Queued in the
        // registry's order and applied without the lock, together with the peers of
        // concurrent leases.
        let on_device = self.dataplane.queue_peer(cfg, &peer_of(&stored));
        drop(registry);
        if let Err(e) = on_device.await {
            if new {
                // Queued after the lease's own write, so the store ends without it.
                let _ = self
                    .registry
                    .lock()
                    .await
                    .release(&cfg.space(), &req.public_key, None);
            }
            return Err(e.into());
        }
        // Durable before the API answers; the fsync is shared with concurrent requests and
        // made without the registry lock.
        if let Err(e) = durable.durable().await {
            if new {
                self.undo_new_lease(cfg, &stored, &e).await;
            }
            return Err(e.into());
        }
        let counter = if new {
            &self.metrics.granted
        } else {
            &self.metrics.renewed
        };
        counter.get_or_create(&Metrics::egress(egress)).inc();
        let egress_ip = cfg.egress_ip_of(stored.lease.address);
        let address6 = stored.lease.address6.filter(|_| cfg.v6.is_some());
        Ok(LeaseGrant {
            address6: address6.map(|a| IpNet::V6(a.into())),
            gateway6: address6.and(cfg.v6.as_ref()).map(|v6| v6.gateway().into()),
            egress_ip6: address6
                .and_then(|a| cfg.egress_ip6_of(a.into()))
                .map(Into::into),
            address: IpNet::from(stored.lease.address),
            lease: stored.lease,
            server_public_key,
            endpoint: cfg.endpoint,
            gateway: cfg.overlay_ip().into(),
            egress_ip: egress_ip.into(),
            persistent_keepalive: self.config.persistent_keepalive,
        })
    }

    /// Takes back a new lease (in any space) whose write failed: the store refused it (it
    /// holds nothing of ours to delete: what it holds at that key or address is another
    /// member's) or could not write it (it may, so it is deleted too).
    pub(super) async fn undo_new_lease<C: SpaceDevice>(
        &self,
        cfg: &C,
        stored: &StoredLease,
        why: &CommitError,
    ) where
        D: Dataplane<C>,
    {
        let key = &stored.lease.public_key;
        let CommitError::Refused(refusal) = why else {
            let _ = self.release(&cfg.space(), None, None, key).await;
            return;
        };
        let space = cfg.space();
        let mut registry = self.registry.lock().await;
        let _ = self.dataplane.remove_peer(cfg, key).await;
        registry.forget(&space, key);
        // The same key's lease another member made meanwhile: the store's, taken in at
        // once (its copy through the watch may have come already and been taken for ours),
        // so the next attempt answers with it.
        if let Refusal::KeyLeased {
            held: Some(theirs), ..
        } = refusal
        {
            let peer = peer_of(theirs);
            if registry.adopt((**theirs).clone()) == Adopted::New {
                let _ = self.dataplane.add_peer(cfg, &peer).await;
            }
            self.publish(&registry, &space);
        }
        // The peer of whoever holds the address (another member's lease) may have lost it
        // to ours on the device.
        if let Some(holder) = registry.lease_at(&space, stored.lease.address) {
            let _ = self.dataplane.add_peer(cfg, &peer_of(holder)).await;
        }
    }

    /// Releases `key`'s lease in `space` if `owner` made it (`None`: whoever did, for the
    /// daemon's own undoing) and, with `kind`, only if it is a network member of that kind
    /// (a container's route never removes a laptop). Durable when it returns.
    pub async fn release(
        &self,
        space: &Space,
        owner: Option<&str>,
        kind: Option<MemberKind>,
        key: &Key,
    ) -> Result<Lease, ServiceError> {
        let mut registry = self.registry.lock().await;
        // Check ownership before touching the device.
        let held = registry.releasable(space, key, owner)?;
        if let Some(kind) = kind.filter(|k| kind_of(&held.lease) != *k) {
            return Err(MemberRefusal::NotFound {
                network: space.name().to_string(),
                kind: members::kind_name(kind),
                key: *key,
            }
            .into());
        }
        let removal = match space {
            Space::Egress(e) => {
                let cfg = self.egress_config(e)?;
                self.remove_lease(&mut registry, cfg, key).await
            }
            Space::Network(n) => {
                let cfg = self.network_config(n)?;
                self.remove_lease(&mut registry, cfg, key).await
            }
        };
        let (removed, durable) = removal?;
        drop(registry);
        durable_removal(durable).await?;
        if let Space::Egress(e) = space {
            self.metrics
                .released
                .get_or_create(&Metrics::egress(e))
                .inc();
        }
        Ok(removed)
    }

    /// Takes `key`'s peer off the space's device, then its lease out of the registry (and a
    /// network's directory). Called with the registry locked, so the address is free for the
    /// next lease only once no peer holds it any more: one address never reaches two peers.
    /// The removal is durable once the returned [`Pending`] resolves; await it after letting
    /// the lock go.
    pub(super) async fn remove_lease<C: SpaceDevice>(
        &self,
        registry: &mut Registry,
        cfg: &C,
        key: &Key,
    ) -> Result<(Lease, Pending), ServiceError>
    where
        D: Dataplane<C>,
    {
        let space = cfg.space();
        self.dataplane.remove_peer(cfg, key).await?;
        let (removed, durable) = registry.release(&space, key, None)?;
        self.publish(registry, &space);
        Ok((removed.lease, durable))
    }

    /// Releases the leases whose peers have gone away (see [`super::collect`]), in every
    /// space; a private network's peers (laptops) stay until they are removed. Returns what
    /// was collected, with why.
    pub async fn collect(&self, activity: &mut Activity) -> Vec<(Lease, Idle)> {
        self.collect_where(activity, |_| true).await
    }

    /// [`LeaseService::collect`] in the spaces `which` names.
    pub async fn collect_where(
        &self,
        activity: &mut Activity,
        which: impl Fn(&Space) -> bool,
    ) -> Vec<(Lease, Idle)> {
        let mut removed = Vec::new();
        for cfg in self.config.egress.iter().filter(|e| which(&e.space())) {
            let everyone = |_: &StoredLease| true;
            removed.extend(self.collect_space(cfg, activity, everyone).await);
        }
        for cfg in self.config.network.iter().filter(|n| which(&n.space())) {
            let containers = |l: &StoredLease| kind_of(&l.lease) == MemberKind::Container;
            removed.extend(self.collect_space(cfg, activity, containers).await);
        }
        let mut out = Vec::new();
        for (lease, why, durable) in removed {
            let space = Space::from_store_key(&lease.egress);
            match durable_removal(durable).await {
                Ok(()) => {
                    self.metrics.count_collected(&space);
                    out.push((lease, why));
                }
                Err(e) => {
                    tracing::error!(%space, public_key = %lease.public_key, error = %e, "collected an idle lease but could not write that to the store")
                }
            }
        }
        out
    }

    /// The leases of one space (`collectable` ones: a network's peers never are) whose peers
    /// have gone away, taken off its device and out of the registry.
    pub(super) async fn collect_space<C: SpaceDevice>(
        &self,
        cfg: &C,
        activity: &mut Activity,
        collectable: impl Fn(&StoredLease) -> bool,
    ) -> Vec<(Lease, Idle, Pending)>
    where
        D: Dataplane<C>,
    {
        let timeouts = Timeouts {
            peer: self.config.peer_timeout,
            first_handshake: self.config.first_handshake_timeout,
        };
        // Read without the lock (a device with many peers takes a while); a lease made
        // since is simply not seen yet, and its first-handshake clock starts next time.
        let status = match self.dataplane.device(cfg).await {
            Ok(s) => s.map(|d| d.peers).unwrap_or_default(),
            Err(e) => {
                tracing::error!(space = %cfg.space(), error = %e, "cannot read the WireGuard device; nothing collected");
                return Vec::new();
            }
        };
        let peers: HashMap<Key, &PeerStatus> = status.iter().map(|p| (p.public_key, p)).collect();
        let (space, mut registry) = (cfg.space(), self.registry.lock().await);
        let scope = &space.store_key();
        let watched: HashSet<Key> = match registry.egress(&space) {
            Ok(e) => e
                .leases()
                .filter(|l| collectable(l))
                .map(|l| l.lease.public_key)
                .collect(),
            Err(_) => return Vec::new(),
        };
        activity.retain(scope, &watched);
        note_endpoints(&mut registry, &space, status.iter());
        let now = Now::current();
        let mut removed = Vec::new();
        for key in watched {
            let peer = peers.get(&key).copied();
            let Some(why) = activity.observe(scope, &key, peer, now, timeouts) else {
                continue;
            };
            match self.remove_lease(&mut registry, cfg, &key).await {
                Ok((lease, durable)) => removed.push((lease, why, durable)),
                Err(e) => {
                    tracing::error!(space = %cfg.space(), public_key = %key, error = %e, "cannot collect an idle lease; will retry")
                }
            }
        }
        removed
    }

    /// The leases `owner` made in `egress`.
    pub async fn list(&self, egress: &str, owner: &str) -> Result<LeaseList, LeaseError> {
        let registry = self.registry.lock().await;
        let mut leases: Vec<Lease> = registry
            .egress(&Space::Egress(egress.to_string()))?
            .leases()
            .filter(|l| l.owner == owner)
            .map(|l| l.lease.clone())
            .collect();
        leases.sort_by_key(|l| l.address);
        Ok(LeaseList { leases })
    }

    pub async fn info(&self, egress: &str) -> Result<EgressInfo, LeaseError> {
        let cfg = self.egress_config(egress)?;
        let registry = self.registry.lock().await;
        let e = registry.egress(&cfg.space())?;
        Ok(EgressInfo {
            name: cfg.name.clone(),
            egress_ip: cfg.egress_ips.first().into(),
            endpoint: cfg.endpoint,
            server_public_key: self.server_public_key(egress)?,
            pool: cfg.pool.into(),
            leases: e.len(),
            capacity: e.capacity(),
            ips: e
                .ip_usage()
                .into_iter()
                .map(|(ip, leases)| EgressIpInfo {
                    ip: ip.into(),
                    leases,
                })
                .collect(),
            pool6: cfg.v6.as_ref().map(|v6| v6.pool.into()),
            ips6: e
                .ip6_usage()
                .into_iter()
                .map(|(ip, leases)| EgressIpInfo {
                    ip: ip.into(),
                    leases,
                })
                .collect(),
        })
    }

    /// Every lease of `space`, egress or network, whoever made it.
    pub async fn space_leases(&self, space: &Space) -> Vec<Lease> {
        let registry = self.registry.lock().await;
        registry
            .egress(space)
            .map(|e| e.leases().map(|l| l.lease.clone()).collect())
            .unwrap_or_default()
    }

    /// Every stored lease: those of the config's egresses and the misfits.
    pub async fn stored_leases(&self) -> Vec<StoredLease> {
        let registry = self.registry.lock().await;
        let mut out: Vec<StoredLease> = registry
            .egresses()
            .flat_map(|(_, e)| e.leases().cloned())
            .collect();
        out.extend(self.misfits.lock().await.iter().cloned());
        out
    }

    /// Deletes the stored leases that do not fit the config; returns them.
    pub async fn prune(&self) -> Result<Vec<StoredLease>, CommitError> {
        let mut misfits = self.misfits.lock().await;
        let pending: Vec<Pending> = {
            let registry = self.registry.lock().await;
            misfits
                .iter()
                .map(|m| registry.submit(m.delete()))
                .collect()
        };
        for p in pending {
            match p.durable().await {
                Ok(()) | Err(CommitError::Refused(Refusal::Absent(_))) => {}
                Err(e) => return Err(e),
            }
        }
        let pruned = std::mem::take(&mut *misfits);
        for m in &pruned {
            tracing::info!(egress = %m.lease.egress, address = %m.lease.address, public_key = %m.lease.public_key, "stored lease pruned");
        }
        Ok(pruned)
    }

    /// Lease counts and capacity per egress, for metrics.
    pub async fn lease_counts(&self) -> Vec<(String, usize, usize)> {
        let registry = self.registry.lock().await;
        let mut out: Vec<_> = registry
            .egresses()
            .map(|(name, e)| (name.to_string(), e.len(), e.capacity()))
            .collect();
        out.sort();
        out
    }

    /// Live leases per egress IP, for metrics: (egress, IP, leases).
    pub async fn ip_lease_counts(&self) -> Vec<(String, std::net::Ipv4Addr, usize)> {
        let registry = self.registry.lock().await;
        let mut out: Vec<_> = registry
            .egresses()
            .flat_map(|(name, e)| {
                e.ip_usage()
                    .into_iter()
                    .map(move |(ip, n)| (name.to_string(), ip, n))
            })
            .collect();
        out.sort();
        out
    }

    /// Makes every egress's device match the store; says what changed, or why an egress
    /// was skipped this time.
    pub async fn reconcile(&self) -> Vec<(String, Result<Changes, DataplaneError>)> {
        let mut out = Vec::new();
        for cfg in &self.config.egress {
            let Some(identity) = self.identities.private(&cfg.name) else {
                continue;
            };
            let changes = self.reconcile_space(cfg, identity).await;
            out.push((cfg.name.clone(), changes));
        }
        out
    }

    /// Makes one space's device match the store.
    pub(super) async fn reconcile_space<C: SpaceDevice>(
        &self,
        cfg: &C,
        identity: &Key,
    ) -> Result<Changes, DataplaneError>
    where
        D: Dataplane<C>,
    {
        // Read the device without the lock, so leases go on meanwhile; apply the changes
        // with it, so none races a lease or a release.
        let seen = self.dataplane.device(cfg).await?;
        let (space, mut registry) = (cfg.space(), self.registry.lock().await);
        note_endpoints(&mut registry, &space, seen.iter().flat_map(|d| &d.peers));
        let peers: Vec<Peer> = registry
            .egress(&space)
            .map(|e| e.leases().map(peer_of).collect())
            .unwrap_or_default();
        self.dataplane
            .reconcile_device(cfg, identity, seen, &peers)
            .await
    }
}

/// Records where the device last heard from each peer. Not awaited: an endpoint is a
/// hint, written with the next batch.
fn note_endpoints<'a>(
    registry: &mut Registry,
    space: &Space,
    peers: impl Iterator<Item = &'a PeerStatus>,
) {
    for p in peers {
        if let Some(endpoint) = p.endpoint {
            drop(registry.note_endpoint(space, &p.public_key, endpoint));
        }
    }
}

/// The dataplane's view of a lease.
fn peer_of(l: &StoredLease) -> Peer {
    Peer {
        public_key: l.lease.public_key,
        address: l.lease.address,
        address6: l.lease.address6,
        endpoint: l.endpoint,
    }
}

/// Waits for a release's write; a lease the store no longer holds is released all the same.
/// For every space's releases and collections.
pub(super) async fn durable_removal(pending: Pending) -> Result<(), CommitError> {
    match pending.durable().await {
        Err(CommitError::Refused(Refusal::Absent(_))) => Ok(()),
        other => other,
    }
}
