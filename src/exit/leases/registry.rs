//! The lease registry: which public key holds which address in which egress, kept in
//! memory for speed and written through to the durable [`LeaseStore`] on every change.
//! Writes go through a [`GroupCommit`]: a change is made in memory at once and returns a
//! [`Pending`] that resolves when it is on disk; callers answer only after that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::commit::{CommitError, GroupCommit, Pending};
use super::pool::Pool;
use super::pool6::Pool6;
use super::store::{LeaseStore, StoreError, StoredLease, Write};
use crate::api::{Attachment, Lease, LeaseRequest, MemberInfo};
use crate::exit::config::{EgressConfig, NetworkConfig};
use crate::keys::Key;

/// Where a private network's members are kept in the registry and the store: beside the
/// egresses, under a name no egress can have (egress names have no ':'), so an egress and a
/// network may share a name and one public key may hold a lease in both.
pub fn network_scope(network: &str) -> String {
    format!("network:{network}")
}

/// The network a scope of [`network_scope`] names.
pub fn network_of_scope(scope: &str) -> Option<&str> {
    scope.strip_prefix("network:")
}

/// "egress" or "network", for messages about a scope.
fn kind_of_scope(scope: &str) -> &'static str {
    match network_of_scope(scope) {
        Some(_) => "network",
        None => "egress",
    }
}

/// The egress's or network's own name, for messages about a scope.
fn name_of_scope(scope: &str) -> &str {
    network_of_scope(scope).unwrap_or(scope)
}

/// The addresses of one egress (IPv4, handed out in turn) or network (IPv6, derived from
/// the key).
#[derive(Debug, Clone)]
pub enum AddressPool {
    V4(Pool),
    V6(Pool6),
}

impl AddressPool {
    fn allocate(&mut self, key: &Key) -> Option<std::net::IpAddr> {
        match self {
            AddressPool::V4(p) => p.allocate().map(Into::into),
            AddressPool::V6(p) => p.allocate(key).map(Into::into),
        }
    }
    fn mark_used(&mut self, addr: std::net::IpAddr) -> bool {
        match self {
            AddressPool::V4(p) => p.mark_used(addr),
            AddressPool::V6(p) => p.mark_used(addr),
        }
    }
    fn release(&mut self, addr: std::net::IpAddr) {
        match self {
            AddressPool::V4(p) => p.release(addr),
            AddressPool::V6(p) => p.release(addr),
        }
    }
    fn capacity(&self) -> usize {
        match self {
            AddressPool::V4(p) => p.capacity(),
            AddressPool::V6(p) => p.capacity(),
        }
    }
    fn in_use(&self) -> usize {
        match self {
            AddressPool::V4(p) => p.in_use(),
            AddressPool::V6(p) => p.in_use(),
        }
    }
    fn net(&self) -> String {
        match self {
            AddressPool::V4(p) => p.net().to_string(),
            AddressPool::V6(p) => p.net().to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("no {} named {:?}", kind_of_scope(.0), name_of_scope(.0))]
    UnknownEgress(String),
    #[error("{} {}: pool {pool} has no free address ({in_use} leased); release leases or give it a larger pool", kind_of_scope(.egress), name_of_scope(.egress))]
    PoolExhausted {
        egress: String,
        pool: String,
        in_use: usize,
    },
    #[error("{} {}: no lease for public key {key}", kind_of_scope(.egress), name_of_scope(.egress))]
    NotFound { egress: String, key: Key },
    #[error("{} {}: the lease for {key} was made with another token", kind_of_scope(.egress), name_of_scope(.egress))]
    NotOwner { egress: String, key: Key },
    #[error(transparent)]
    Store(#[from] CommitError),
}

impl From<StoreError> for LeaseError {
    fn from(e: StoreError) -> LeaseError {
        LeaseError::Store(e.into())
    }
}

/// One egress's leases.
#[derive(Debug)]
pub struct EgressLeases {
    pool: AddressPool,
    by_key: HashMap<Key, StoredLease>,
}

impl EgressLeases {
    pub fn leases(&self) -> impl Iterator<Item = &StoredLease> {
        self.by_key.values()
    }
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
    pub fn capacity(&self) -> usize {
        self.pool.capacity()
    }
    pub fn get(&self, key: &Key) -> Option<&StoredLease> {
        self.by_key.get(key)
    }
}

pub struct Registry {
    egresses: HashMap<String, EgressLeases>,
    commit: GroupCommit,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// Builds the registry from the config's egresses (their names and pools) and what
    /// the store holds. Stored leases that no longer fit (unknown egress, address outside
    /// the pool, duplicate address) are returned separately so the caller can report them.
    pub fn load(
        egresses: &[EgressConfig],
        store: Arc<dyn LeaseStore>,
    ) -> Result<(Registry, Vec<StoredLease>), StoreError> {
        Registry::load_with_networks(egresses, &[], store)
    }

    /// [`Registry::load`] with the members of `networks` too (see [`network_scope`]).
    pub fn load_with_networks(
        egresses: &[EgressConfig],
        networks: &[NetworkConfig],
        store: Arc<dyn LeaseStore>,
    ) -> Result<(Registry, Vec<StoredLease>), StoreError> {
        let scope = |pool| EgressLeases {
            pool,
            by_key: HashMap::new(),
        };
        let mut map: HashMap<String, EgressLeases> = egresses
            .iter()
            .map(|e| (e.name.clone(), scope(AddressPool::V4(Pool::new(e.pool)))))
            .chain(networks.iter().map(|n| {
                (
                    network_scope(&n.name),
                    scope(AddressPool::V6(Pool6::new(n.prefix))),
                )
            }))
            .collect();
        let mut misfits = Vec::new();
        for stored in store.load()? {
            let Some(e) = map.get_mut(&stored.lease.egress) else {
                misfits.push(stored);
                continue;
            };
            if e.by_key.contains_key(&stored.lease.public_key)
                || !e.pool.mark_used(stored.lease.address)
            {
                misfits.push(stored);
                continue;
            }
            e.by_key.insert(stored.lease.public_key, stored);
        }
        Ok((
            Registry {
                egresses: map,
                commit: GroupCommit::new(store),
            },
            misfits,
        ))
    }

    pub fn egress(&self, name: &str) -> Result<&EgressLeases, LeaseError> {
        self.egresses
            .get(name)
            .ok_or_else(|| LeaseError::UnknownEgress(name.to_string()))
    }

    /// Every egress's name and leases (not the networks' members).
    pub fn egresses(&self) -> impl Iterator<Item = (&str, &EgressLeases)> {
        self.egresses
            .iter()
            .filter(|(name, _)| network_of_scope(name).is_none())
            .map(|(name, e)| (name.as_str(), e))
    }

    /// Grants a lease, or returns the existing one for this public key (idempotent).
    /// The bool says whether it is new. The lease is durable once the [`Pending`] resolves
    /// (an existing lease is written again, so it is durable then too).
    pub fn lease(
        &mut self,
        egress: &str,
        req: &LeaseRequest,
        owner: &str,
    ) -> Result<(StoredLease, bool, Pending), LeaseError> {
        self.lease_for(egress, &req.public_key, &req.attachment, None, owner)
    }

    /// [`Registry::lease`] for any scope: an egress, or a network's member (`member`).
    pub fn lease_for(
        &mut self,
        egress: &str,
        public_key: &Key,
        attachment: &Attachment,
        member: Option<MemberInfo>,
        owner: &str,
    ) -> Result<(StoredLease, bool, Pending), LeaseError> {
        let e = self
            .egresses
            .get_mut(egress)
            .ok_or_else(|| LeaseError::UnknownEgress(egress.to_string()))?;
        if let Some(existing) = e.by_key.get(public_key) {
            if existing.owner != owner {
                return Err(LeaseError::NotOwner {
                    egress: egress.to_string(),
                    key: *public_key,
                });
            }
            let pending = self.commit.submit(Write::Keep {
                egress: egress.to_string(),
                public_key: *public_key,
                owner: owner.to_string(),
            });
            return Ok((existing.clone(), false, pending));
        }
        let address = e
            .pool
            .allocate(public_key)
            .ok_or_else(|| LeaseError::PoolExhausted {
                egress: egress.to_string(),
                pool: e.pool.net(),
                in_use: e.pool.in_use(),
            })?;
        let stored = StoredLease {
            lease: Lease {
                egress: egress.to_string(),
                public_key: *public_key,
                address,
                created_at: now_secs(),
                attachment: attachment.clone(),
                member: member.map(Box::new),
            },
            owner: owner.to_string(),
        };
        let pending = self.commit.submit(Write::Create(stored.clone()));
        e.by_key.insert(*public_key, stored.clone());
        Ok((stored, true, pending))
    }

    /// The lease of `key`, if `owner` may release it (`None`: anyone may, i.e. the daemon's
    /// own collection).
    pub fn releasable(
        &self,
        egress: &str,
        key: &Key,
        owner: Option<&str>,
    ) -> Result<&StoredLease, LeaseError> {
        let existing = self
            .egress(egress)?
            .get(key)
            .ok_or_else(|| LeaseError::NotFound {
                egress: egress.to_string(),
                key: *key,
            })?;
        if owner.is_some_and(|o| o != existing.owner) {
            return Err(LeaseError::NotOwner {
                egress: egress.to_string(),
                key: *key,
            });
        }
        Ok(existing)
    }

    /// Releases a lease made by `owner` (or by anyone when `owner` is `None`: the daemon's
    /// own collection). Durable once the [`Pending`] resolves.
    pub fn release(
        &mut self,
        egress: &str,
        key: &Key,
        owner: Option<&str>,
    ) -> Result<(StoredLease, Pending), LeaseError> {
        self.releasable(egress, key, owner)?;
        let e = self
            .egresses
            .get_mut(egress)
            .ok_or_else(|| LeaseError::UnknownEgress(egress.to_string()))?;
        let removed = e.by_key.remove(key).ok_or_else(|| LeaseError::NotFound {
            egress: egress.to_string(),
            key: *key,
        })?;
        e.pool.release(removed.lease.address);
        let pending = self.commit.submit(Write::Delete {
            egress: egress.to_string(),
            public_key: *key,
            owner: owner.map(String::from),
        });
        Ok((removed, pending))
    }

    /// Drops `key`'s lease from memory only: for a lease whose creation the store refused,
    /// so the store holds nothing to delete.
    pub fn forget(&mut self, egress: &str, key: &Key) {
        if let Some(e) = self.egresses.get_mut(egress) {
            if let Some(removed) = e.by_key.remove(key) {
                e.pool.release(removed.lease.address);
            }
        }
    }

    /// Submits a write straight to the store, in order with the registry's own (e.g. to
    /// delete a stored lease that no longer fits the config).
    pub fn submit(&self, write: Write) -> Pending {
        self.commit.submit(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::config::tests::egress;
    use crate::exit::leases::redb::RedbStore;

    fn req(n: u8) -> LeaseRequest {
        LeaseRequest {
            public_key: Key([n; 32]),
            attachment: Default::default(),
        }
    }

    /// A lease, waited for until durable.
    fn lease(
        r: &mut Registry,
        egress: &str,
        req: &LeaseRequest,
        owner: &str,
    ) -> Result<(StoredLease, bool), LeaseError> {
        let (l, new, pending) = r.lease(egress, req, owner)?;
        pending.wait().map_err(LeaseError::Store)?;
        Ok((l, new))
    }

    fn release(
        r: &mut Registry,
        egress: &str,
        key: &Key,
        owner: Option<&str>,
    ) -> Result<StoredLease, LeaseError> {
        let (l, pending) = r.release(egress, key, owner)?;
        pending.wait().map_err(LeaseError::Store)?;
        Ok(l)
    }

    fn open(dir: &std::path::Path) -> Registry {
        let store = Arc::new(RedbStore::open(&dir.join("l.redb")).unwrap());
        let (r, misfits) = Registry::load(
            &[egress("a", "100.96.0.0/29"), egress("b", "100.97.0.0/29")],
            store,
        )
        .unwrap();
        assert!(misfits.is_empty());
        r
    }

    #[test]
    fn lease_is_idempotent_per_key_and_distinct_across_keys() {
        let t = tempfile::tempdir().unwrap();
        let mut r = open(t.path());
        let (l1, new1) = lease(&mut r, "a", &req(1), "o").unwrap();
        let (l1b, new1b) = lease(&mut r, "a", &req(1), "o").unwrap();
        let (l2, _) = lease(&mut r, "a", &req(2), "o").unwrap();
        assert!(new1 && !new1b);
        assert_eq!(l1, l1b);
        assert_ne!(l1.lease.address, l2.lease.address);
    }

    #[test]
    fn owners_and_egresses_are_separate() {
        let t = tempfile::tempdir().unwrap();
        let mut r = open(t.path());
        lease(&mut r, "a", &req(1), "alice").unwrap();
        assert!(matches!(
            lease(&mut r, "a", &req(1), "mallory"),
            Err(LeaseError::NotOwner { .. })
        ));
        assert!(matches!(
            release(&mut r, "a", &Key([1; 32]), Some("mallory")),
            Err(LeaseError::NotOwner { .. })
        ));
        assert!(matches!(
            release(&mut r, "b", &Key([1; 32]), Some("alice")),
            Err(LeaseError::NotFound { .. })
        ));
        assert!(matches!(
            lease(&mut r, "zzz", &req(1), "alice"),
            Err(LeaseError::UnknownEgress(_))
        ));
        release(&mut r, "a", &Key([1; 32]), Some("alice")).unwrap();
    }

    #[test]
    fn leases_survive_a_restart_and_are_not_handed_out_twice() {
        let t = tempfile::tempdir().unwrap();
        let mut before = Vec::new();
        {
            let mut r = open(t.path());
            for n in 1..=3 {
                before.push(lease(&mut r, "a", &req(n), "o").unwrap().0);
            }
            release(&mut r, "a", &Key([2; 32]), Some("o")).unwrap();
        }
        let mut r = open(t.path());
        assert_eq!(r.egress("a").unwrap().len(), 2);
        assert_eq!(lease(&mut r, "a", &req(1), "o").unwrap().0, before[0]);
        let taken: Vec<_> = [&before[0], &before[2]]
            .iter()
            .map(|l| l.lease.address)
            .collect();
        // The pool has 5 addresses; 2 are taken, so exactly 3 more can be leased.
        for n in 10..13 {
            let (l, _) = lease(&mut r, "a", &req(n), "o").unwrap();
            assert!(!taken.contains(&l.lease.address));
        }
        assert!(matches!(
            lease(&mut r, "a", &req(20), "o"),
            Err(LeaseError::PoolExhausted { .. })
        ));
    }

    #[test]
    fn concurrent_releases_and_leases_never_share_an_address() {
        use std::collections::HashSet;
        use std::sync::Mutex;
        let t = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&t.path().join("l.redb")).unwrap());
        let (r, _) = Registry::load(&[egress("a", "100.96.0.0/29")], store.clone()).unwrap();
        let r = Mutex::new(r);
        let check = |r: &Registry| {
            let addrs: Vec<_> = r
                .egress("a")
                .unwrap()
                .leases()
                .map(|l| l.lease.address)
                .collect();
            let distinct: HashSet<_> = addrs.iter().collect();
            assert_eq!(
                addrs.len(),
                distinct.len(),
                "an address leased twice: {addrs:?}"
            );
        };
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let r = &r;
                s.spawn(move || {
                    for i in 0..40u8 {
                        let key = req(t * 64 + (i % 8));
                        let mut g = r.lock().unwrap();
                        // Leasing, releasing (as DEL or collection would) and leasing again
                        // race with the other threads; the pool of 5 is always contended.
                        match g.lease("a", &key, "o") {
                            Ok(_) | Err(LeaseError::PoolExhausted { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                        check(&g);
                        drop(g);
                        std::thread::yield_now();
                        let mut g = r.lock().unwrap();
                        if i % 3 != 0 {
                            let _ = g.release("a", &key.public_key, None);
                        }
                        check(&g);
                    }
                });
            }
        });
        // The store says the same as memory.
        let r = r.into_inner().unwrap();
        let mut held: Vec<_> = r
            .egress("a")
            .unwrap()
            .leases()
            .map(|l| l.lease.clone())
            .collect();
        // Dropping the registry applies every queued write first.
        drop(r);
        let mut stored: Vec<_> = store.load().unwrap().into_iter().map(|l| l.lease).collect();
        stored.sort_by_key(|l| l.address);
        held.sort_by_key(|l| l.address);
        assert_eq!(stored, held);
    }

    #[test]
    fn a_key_holds_an_egress_lease_and_a_network_member_side_by_side() {
        use crate::api::{MemberInfo, MemberKind};
        use crate::exit::config::network::tests::network;
        let t = tempfile::tempdir().unwrap();
        // A lease written before networks existed (no `member` field) still loads.
        let old = r#"{"lease":{"egress":"a","public_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","address":"100.96.0.2","created_at":1,"attachment":{"container_id":"c","ifname":"eth0","host":"h","args":{}}},"owner":"o"}"#;
        let old: StoredLease = serde_json::from_str(old).unwrap();
        let store = Arc::new(RedbStore::open(&t.path().join("l.redb")).unwrap());
        store.apply(&[Write::Create(old.clone())]).unwrap();
        let nets = [network("a", "fdaa:0:1::/48", "wgn-a")];
        let (mut r, misfits) =
            Registry::load_with_networks(&[egress("a", "100.96.0.0/29")], &nets, store.clone())
                .unwrap();
        assert!(misfits.is_empty());
        assert_eq!(r.egress("a").unwrap().get(&Key([1; 32])), Some(&old));
        let info = MemberInfo {
            network: "a".into(),
            kind: MemberKind::Container,
            app: "web".into(),
            region: "ams".into(),
            name: String::new(),
        };
        let scope = network_scope("a");
        let (m, new, pending) = r
            .lease_for(
                &scope,
                &Key([1; 32]),
                &Attachment::default(),
                Some(info),
                "o",
            )
            .unwrap();
        pending.wait().unwrap();
        assert!(new && m.lease.address.is_ipv6());
        // Egress counts leave the network's members out.
        assert_eq!(r.egresses().count(), 1);
        drop(r);
        let (r, misfits) =
            Registry::load_with_networks(&[egress("a", "100.96.0.0/29")], &nets, store).unwrap();
        assert!(misfits.is_empty());
        assert_eq!(r.egress(&scope).unwrap().get(&Key([1; 32])), Some(&m));
        assert_eq!(network_of_scope(&scope), Some("a"));
    }
}
