//! The lease service in a pool: leases other members write, in every egress and network,
//! reach this member's registry, devices and resolvers' directories (hot standby) without being written back, and a member that lost track
//! (its watch broke) catches up with the store.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use super::{LeaseService, ServiceError};
use crate::dataplane::{DataplaneError, Peer, SpaceDevice, SpacesDataplane};
use crate::leases::commit::CommitError;
use crate::leases::registry::{Adopted, LeaseError};
use crate::leases::store::{Refusal, StoreError, StoredLease, Write};
use crate::space::Space;
use wgexit::keys::Key;

/// Attempts at a lease whose write the shared store refused because another member took
/// its address (or made the same key's lease) meanwhile.
const LEASE_ATTEMPTS: usize = 8;

fn worth_retrying(why: &Refusal) -> bool {
    matches!(
        why,
        Refusal::AddressLeased { .. } | Refusal::KeyLeased { .. } | Refusal::Absent(_)
    )
}

/// Runs `attempt` (a lease or a join, in any space) again while the shared store refuses
/// it for what another member took a moment ago, at most [`LEASE_ATTEMPTS`] more times.
pub(in crate::leases) async fn retried<T, F, Fut>(mut attempt: F) -> Result<T, ServiceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ServiceError>>,
{
    let mut tried = 0;
    loop {
        match attempt().await {
            Err(ServiceError::Lease(LeaseError::Store(CommitError::Refused(why))))
                if tried < LEASE_ATTEMPTS && worth_retrying(&why) =>
            {
                tried += 1;
                before_retry(&why, tried).await;
            }
            other => return other,
        }
    }
}

/// Another address is free at once; the same key's lease made by another member needs
/// a moment to arrive through the watch, and is then answered as it is.
async fn before_retry(why: &Refusal, attempt: usize) {
    if !matches!(why, Refusal::AddressLeased { .. }) {
        tokio::time::sleep(Duration::from_millis(25 * attempt as u64)).await;
    }
}

impl<D: SpacesDataplane> LeaseService<D> {
    /// A lease the shared store holds (written by any member): in the registry and on the
    /// device (and, in a network, in its resolver's directory). Nothing is written back.
    pub async fn adopt_remote(&self, stored: StoredLease) -> Result<(), ServiceError> {
        let space = Space::from_store_key(&stored.lease.egress);
        if !self.serves(&space) {
            return Ok(());
        }
        let mut registry = self.registry.lock().await;
        let lease = stored.lease.clone();
        let peer = super::peer_of(&stored);
        match registry.adopt(stored) {
            Adopted::New => {
                self.add_space_peer(&space, &peer).await?;
                self.publish(&registry, &space);
            }
            Adopted::Known => {}
            Adopted::Misfit => {
                tracing::warn!(%space, address = %lease.address, "a pool member leased an address outside this member's pool; are the members' configs the same?")
            }
        }
        Ok(())
    }

    /// A lease the shared store no longer holds (`scope`: its space's store name): off the
    /// device, out of the registry.
    pub async fn drop_remote(&self, scope: &str, key: &Key) -> Result<(), ServiceError> {
        let space = Space::from_store_key(scope);
        if !self.serves(&space) {
            return Ok(());
        }
        let mut registry = self.registry.lock().await;
        if let Some(dropped) = registry.drop_remote(&space, key) {
            self.remove_space_peer(&space, key).await?;
            // Another lease may hold the address too (see `Registry::adopt`).
            if let Some(holder) = registry.lease_at(&space, dropped.lease.address) {
                let peer = super::peer_of(holder);
                self.add_space_peer(&space, &peer).await?;
            }
            self.publish(&registry, &space);
        }
        Ok(())
    }

    /// Whether this member's config has `space`.
    fn serves(&self, space: &Space) -> bool {
        match space {
            Space::Egress(e) => self.config.egress(e).is_some(),
            Space::Network(n) => self.config.network(n).is_some(),
        }
    }

    /// Adds (or updates) a peer on `space`'s device, whatever its kind.
    async fn add_space_peer(&self, space: &Space, peer: &Peer) -> Result<(), DataplaneError> {
        match space {
            Space::Egress(e) => match self.config.egress(e) {
                Some(cfg) => self.dataplane.add_peer(cfg, peer).await,
                None => Ok(()),
            },
            Space::Network(n) => match self.config.network(n) {
                Some(cfg) => self.dataplane.add_peer(cfg, peer).await,
                None => Ok(()),
            },
        }
    }

    /// Removes `key`'s peer from `space`'s device, whatever its kind.
    async fn remove_space_peer(&self, space: &Space, key: &Key) -> Result<(), DataplaneError> {
        match space {
            Space::Egress(e) => match self.config.egress(e) {
                Some(cfg) => self.dataplane.remove_peer(cfg, key).await,
                None => Ok(()),
            },
            Space::Network(n) => match self.config.network(n) {
                Some(cfg) => self.dataplane.remove_peer(cfg, key).await,
                None => Ok(()),
            },
        }
    }

    /// Makes the registry and the devices hold exactly what the store holds. This
    /// member's own queued writes are applied first (with the registry locked, so no new
    /// one comes), then `load` reads the store; returns what `load` returned besides.
    pub async fn resync<T, F, Fut>(&self, load: F) -> Result<T, ServiceError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Vec<StoredLease>, T), StoreError>>,
    {
        let mut registry = self.registry.lock().await;
        let barrier = registry.submit(Write::Keep {
            egress: String::new(),
            public_key: Key([0; 32]),
            owner: String::new(),
        });
        match barrier.durable().await {
            Ok(()) | Err(crate::leases::commit::CommitError::Refused(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let (stored, extra) = load()
            .await
            .map_err(crate::leases::registry::LeaseError::from)?;
        let mut by_space: HashMap<String, HashMap<Key, StoredLease>> = HashMap::new();
        for l in stored {
            by_space
                .entry(l.lease.egress.clone())
                .or_default()
                .insert(l.lease.public_key, l);
        }
        let spaces = self.config.egress.iter().map(|e| e.space());
        for space in spaces.chain(self.config.network.iter().map(|n| n.space())) {
            let want = by_space.remove(&space.store_key()).unwrap_or_default();
            let gone: Vec<Key> = registry
                .egress(&space)
                .map(|e| {
                    e.leases()
                        .map(|l| l.lease.public_key)
                        .filter(|k| !want.contains_key(k))
                        .collect()
                })
                .unwrap_or_default();
            for key in gone {
                registry.drop_remote(&space, &key);
                self.remove_space_peer(&space, &key).await?;
            }
            for (_, l) in want {
                let peer = super::peer_of(&l);
                if registry.adopt(l) == Adopted::New {
                    self.add_space_peer(&space, &peer).await?;
                }
            }
            self.publish(&registry, &space);
        }
        Ok(extra)
    }
}
