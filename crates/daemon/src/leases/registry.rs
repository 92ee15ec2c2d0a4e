//! The lease registry: which public key holds which address in which egress, kept in
//! memory for speed and written through to the durable [`LeaseStore`] on every change.
//! Writes go through a [`GroupCommit`]: a change is made in memory at once and returns a
//! [`Pending`] that resolves when it is on disk; callers answer only after that.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::commit::{CommitError, GroupCommit, Pending};
use super::egress_ips::{Exhausted, IpUsage};
use super::overlay6::Overlay6;
use super::pool::Pool;
use super::pool6::Pool6;
use super::store::{LeaseStore, StoreError, StoredLease, Write};
use crate::config::{EgressConfig, NetworkConfig};
use crate::space::Space;
use wgexit::api::{Attachment, Lease, LeaseRequest, MemberInfo};
use wgexit::keys::Key;

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
    fn leasable(&self, addr: std::net::IpAddr) -> bool {
        match self {
            AddressPool::V4(p) => p.leasable(addr),
            AddressPool::V6(p) => p.leasable(addr),
        }
    }
    /// Where an IPv4 pool's allocation starts (an IPv6 pool derives addresses from keys).
    fn start_at(&mut self, offset: usize) {
        if let AddressPool::V4(p) = self {
            p.start_at(offset);
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
    #[error("no {} named {:?}", .0.kind(), .0.name())]
    Unknown(Space),
    #[error("{space}: pool {pool} has no free address ({in_use} leased); release leases or give it a larger pool")]
    PoolExhausted {
        space: Space,
        pool: String,
        in_use: usize,
    },
    #[error("{space}: every egress IP ({}) is held by a lease and assign = \"exclusive\"; release a lease (DEL) or add IPs to the egress's ips", list_ips(.ips))]
    EgressIpsExhausted {
        space: Space,
        ips: Vec<std::net::Ipv4Addr>,
    },
    #[error("{space}: this token already holds {max} leases, its quota (max_leases_per_owner; by default an equal share of the pool among the tokens); release leases (DEL) or have max_leases_per_owner raised on the exit node")]
    QuotaExceeded { space: Space, max: usize },
    #[error("{space}: no lease for public key {key}")]
    NotFound { space: Space, key: Key },
    #[error("{space}: the lease for {key} was made with another token")]
    NotOwner { space: Space, key: Key },
    #[error(transparent)]
    Store(#[from] CommitError),
}

fn list_ips(ips: &[std::net::Ipv4Addr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
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
    /// An egress's IPs and their blocks of the pool (`None` for a network).
    ips: Option<IpUsage>,
    /// An egress's overlay IPv6s (`None` without `ip6`, and for a network).
    v6: Option<Overlay6>,
    by_key: HashMap<Key, StoredLease>,
    /// Leases per owner, for the quota.
    per_owner: HashMap<String, usize>,
    /// Addresses held by two leases for a moment: one another member made (seen through
    /// the store) and one of ours the store is about to refuse. Counts the extra holders,
    /// so the address is free again only once both are gone.
    doubles: HashMap<IpAddr, usize>,
}

/// What [`Registry::adopt`] made of a lease written elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adopted {
    /// Not known before: its peer is to be added.
    New,
    /// Known already, as it is.
    Known,
    /// Its egress is not configured here, or its address is outside the pool.
    Misfit,
}

impl EgressLeases {
    fn new(pool: AddressPool, ips: Option<IpUsage>) -> EgressLeases {
        EgressLeases {
            pool,
            ips,
            v6: None,
            by_key: HashMap::new(),
            per_owner: HashMap::new(),
            doubles: HashMap::new(),
        }
    }

    /// Lets `address` go, unless another lease holds it too.
    fn free(&mut self, address: IpAddr) {
        match self.doubles.get_mut(&address) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.doubles.remove(&address);
            }
            None => self.pool.release(address),
        }
    }

    /// Adds a lease whose address is taken in the pool already.
    fn insert(&mut self, lease: StoredLease) {
        if let Some(ips) = &mut self.ips {
            ips.add(lease.lease.address);
        }
        *self.per_owner.entry(lease.owner.clone()).or_default() += 1;
        self.by_key.insert(lease.lease.public_key, lease);
    }

    /// Removes `key`'s lease and frees its address.
    fn remove(&mut self, key: &Key) -> Option<StoredLease> {
        let removed = self.by_key.remove(key)?;
        self.free(removed.lease.address);
        if let (Some(v6), Some(a)) = (&mut self.v6, removed.lease.address6) {
            v6.release(a);
        }
        if let Some(ips) = &mut self.ips {
            ips.remove(removed.lease.address);
        }
        if let Some(n) = self.per_owner.get_mut(&removed.owner) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&removed.owner);
            }
        }
        Some(removed)
    }

    /// How many leases `owner` holds here.
    pub fn held_by(&self, owner: &str) -> usize {
        self.per_owner.get(owner).copied().unwrap_or(0)
    }

    pub fn leases(&self) -> impl Iterator<Item = &StoredLease> {
        self.by_key.values()
    }
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
    /// How many leases there can be at most.
    pub fn capacity(&self) -> usize {
        match (&self.ips, &self.pool) {
            (Some(ips), AddressPool::V4(p)) => {
                let leasable = ips.blocks().iter().map(|b| p.capacity_in(*b)).sum();
                ips.capacity(leasable)
            }
            _ => self.pool.capacity(),
        }
    }

    /// Each egress IPv6 with how many leases leave from it (empty without `ip6`).
    pub fn ip6_usage(&self) -> Vec<(std::net::Ipv6Addr, usize)> {
        self.v6.as_ref().map(Overlay6::usage).unwrap_or_default()
    }

    /// Takes a stored lease's IPv6 in the egress's `pool6`: true when it has none, or the
    /// egress has no `pool6` (the lease then works over IPv4 alone).
    fn mark_used6(&mut self, lease: &Lease) -> bool {
        match (&mut self.v6, lease.address6) {
            (Some(v6), Some(a)) => v6.mark_used(a),
            _ => true,
        }
    }

    /// The overlay IPv6 of a new lease at `address` (none without `ip6`): in the block of
    /// the egress IPv6 at the index of `address`'s egress IPv4. On failure `address` is
    /// freed again.
    fn allocate6(
        &mut self,
        space: &Space,
        key: &Key,
        address: IpAddr,
    ) -> Result<Option<std::net::Ipv6Addr>, LeaseError> {
        let index = self.ips.as_ref().and_then(|ips| ips.index_of(address));
        let Some(v6) = &mut self.v6 else {
            return Ok(None);
        };
        if let Some(a) = v6.allocate(index.unwrap_or(0), key) {
            return Ok(Some(a));
        }
        let err = LeaseError::PoolExhausted {
            space: space.clone(),
            pool: v6.pool().to_string(),
            in_use: v6.in_use(),
        };
        self.free(address);
        Err(err)
    }

    /// Each egress IP with how many leases leave from it (empty for a network).
    pub fn ip_usage(&self) -> Vec<(std::net::Ipv4Addr, usize)> {
        self.ips.as_ref().map(IpUsage::usage).unwrap_or_default()
    }

    /// Whether `address` may be leased here: inside the pool and, for an egress, inside
    /// the block of one of its IPs.
    fn leasable(&self, address: IpAddr) -> bool {
        self.pool.leasable(address)
            && self
                .ips
                .as_ref()
                .is_none_or(|ips| ips.ip_of(address).is_some())
    }

    /// A free address for `key`: in an egress, in the block of the IP its `assign` picks.
    fn allocate(&mut self, space: &Space, key: &Key) -> Result<IpAddr, LeaseError> {
        let exhausted = |pool: &AddressPool| LeaseError::PoolExhausted {
            space: space.clone(),
            pool: pool.net(),
            in_use: pool.in_use(),
        };
        let (Some(ips), AddressPool::V4(pool)) = (&self.ips, &mut self.pool) else {
            return self.pool.allocate(key).ok_or_else(|| exhausted(&self.pool));
        };
        let blocks = ips
            .candidates()
            .map_err(|Exhausted(ips)| LeaseError::EgressIpsExhausted {
                space: space.clone(),
                ips,
            })?;
        let found = blocks.into_iter().find_map(|b| pool.allocate_in(b));
        found.map(IpAddr::V4).ok_or_else(|| exhausted(&self.pool))
    }
    pub fn get(&self, key: &Key) -> Option<&StoredLease> {
        self.by_key.get(key)
    }
}

/// Who asks for a lease: the key it is for, what the runtime said of the container, and
/// the token's owner.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    pub public_key: &'a Key,
    pub attachment: &'a Attachment,
    pub owner: &'a str,
}

pub struct Registry {
    egresses: HashMap<Space, EgressLeases>,
    commit: GroupCommit,
}

/// Sorts stored leases into the config's egresses, each address marked in its pool. What
/// does not fit is returned apart: a lease of an egress no longer configured (renamed or
/// removed), one whose address is outside its egress's pool now, or a second lease of one
/// address. Such leases are kept, never dropped silently: restoring the config brings
/// them back, and `wgexitd leases prune` removes them on request.
pub fn place(
    egresses: &[EgressConfig],
    networks: &[NetworkConfig],
    stored: Vec<StoredLease>,
) -> (HashMap<Space, EgressLeases>, Vec<StoredLease>) {
    let mut map: HashMap<Space, EgressLeases> = egresses
        .iter()
        .map(|e| {
            let pool = AddressPool::V4(Pool::new(e.pool));
            let ips = IpUsage::new(&e.egress_ips, e.pool);
            let mut leases = EgressLeases::new(pool, Some(ips));
            leases.v6 = e.v6.as_ref().map(Overlay6::new);
            (Space::Egress(e.name.clone()), leases)
        })
        .chain(networks.iter().map(|n| {
            let pool = AddressPool::V6(Pool6::new(n.prefix));
            (
                Space::Network(n.name.clone()),
                EgressLeases::new(pool, None),
            )
        }))
        .collect();
    let mut misfits = Vec::new();
    for lease in stored {
        let Some(e) = map.get_mut(&Space::from_store_key(&lease.lease.egress)) else {
            misfits.push(lease);
            continue;
        };
        if e.by_key.contains_key(&lease.lease.public_key)
            || !e.leasable(lease.lease.address)
            || !e.pool.mark_used(lease.lease.address)
        {
            misfits.push(lease);
            continue;
        }
        if !e.mark_used6(&lease.lease) {
            e.pool.release(lease.lease.address);
            misfits.push(lease);
            continue;
        }
        e.insert(lease);
    }
    (map, misfits)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// Builds the registry from the config's egresses (their names and pools) and what
    /// the store holds. Stored leases that do not fit (see [`place`]) stay in the store
    /// untouched and are returned, for the caller to report.
    pub fn load(
        egresses: &[EgressConfig],
        store: Arc<dyn LeaseStore>,
    ) -> Result<(Registry, Vec<StoredLease>), StoreError> {
        Registry::load_with_networks(egresses, &[], store)
    }

    /// [`Registry::load`] with the members of `networks` too (kept under [`Space::store_key`], beside the egresses).
    pub fn load_with_networks(
        egresses: &[EgressConfig],
        networks: &[NetworkConfig],
        store: Arc<dyn LeaseStore>,
    ) -> Result<(Registry, Vec<StoredLease>), StoreError> {
        let leases = store.load()?;
        Ok(Registry::from_leases(egresses, networks, store, leases))
    }

    /// [`Registry::load_with_networks`] with the stored leases read already (a pool reads
    /// them together with the revision its watch starts from).
    pub fn from_leases(
        egresses: &[EgressConfig],
        networks: &[NetworkConfig],
        store: Arc<dyn LeaseStore>,
        leases: Vec<StoredLease>,
    ) -> (Registry, Vec<StoredLease>) {
        let (egresses, misfits) = place(egresses, networks, leases);
        (
            Registry {
                egresses,
                commit: GroupCommit::new(store),
            },
            misfits,
        )
    }

    /// Starts each egress's allocation at a place of its own for `node`, so members of a
    /// pool leasing at once rarely reach for the same address (the store refuses the
    /// second; the request then tries another).
    pub fn spread(&mut self, node: &str) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        node.hash(&mut h);
        let seed = h.finish() as usize;
        for e in self.egresses.values_mut() {
            e.pool.start_at(seed);
        }
    }

    /// Takes in a lease another member wrote (seen in the shared store), without writing it
    /// back. The store is the authority: if one of our own not yet written leases holds
    /// the address, both hold it until the store refuses ours.
    pub fn adopt(&mut self, stored: StoredLease) -> Adopted {
        let Some(e) = self
            .egresses
            .get_mut(&Space::from_store_key(&stored.lease.egress))
        else {
            return Adopted::Misfit;
        };
        let address = stored.lease.address;
        if !e.leasable(address) {
            return Adopted::Misfit;
        }
        if let Some(known) = e.by_key.get(&stored.lease.public_key) {
            if known.lease.address == address {
                return Adopted::Known;
            }
            e.remove(&stored.lease.public_key);
        }
        if !e.pool.mark_used(address) {
            *e.doubles.entry(address).or_insert(0) += 1;
        }
        // Derived from the key: another lease of this address6 would be another key's
        // one-in-2^56 collision, which the store's own key check does not see.
        e.mark_used6(&stored.lease);
        e.insert(stored);
        Adopted::New
    }

    /// Drops a lease another member deleted, without writing anything.
    pub fn drop_remote(&mut self, space: &Space, key: &Key) -> Option<StoredLease> {
        self.egresses.get_mut(space)?.remove(key)
    }

    /// The lease holding `address` in `egress`, if any (a scan: for rare repairs).
    pub fn lease_at(&self, space: &Space, address: IpAddr) -> Option<&StoredLease> {
        self.egresses
            .get(space)?
            .by_key
            .values()
            .find(|l| l.lease.address == address)
    }

    /// The leases of `space`.
    pub fn egress(&self, space: &Space) -> Result<&EgressLeases, LeaseError> {
        self.egresses
            .get(space)
            .ok_or_else(|| LeaseError::Unknown(space.clone()))
    }

    /// Every egress's name and leases (not the networks' members).
    pub fn egresses(&self) -> impl Iterator<Item = (&str, &EgressLeases)> {
        self.egresses.iter().filter_map(|(space, e)| match space {
            Space::Egress(name) => Some((name.as_str(), e)),
            Space::Network(_) => None,
        })
    }

    /// Grants a lease, or returns the existing one for this public key (idempotent).
    /// The bool says whether it is new. The lease is durable once the [`Pending`] resolves
    /// (an existing lease is written again, so it is durable then too).
    /// A new lease is refused when `owner` holds `max_per_owner` already.
    pub fn lease(
        &mut self,
        space: &Space,
        req: &LeaseRequest,
        owner: &str,
        max_per_owner: usize,
    ) -> Result<(StoredLease, bool, Pending), LeaseError> {
        let holder = Holder {
            public_key: &req.public_key,
            attachment: &req.attachment,
            owner,
        };
        self.lease_for(space, holder, None, max_per_owner)
    }

    /// [`Registry::lease`] for any scope: an egress, or a network's member (`member`).
    pub fn lease_for(
        &mut self,
        space: &Space,
        holder: Holder<'_>,
        member: Option<MemberInfo>,
        max_per_owner: usize,
    ) -> Result<(StoredLease, bool, Pending), LeaseError> {
        let Holder {
            public_key,
            attachment,
            owner,
        } = holder;
        let e = self
            .egresses
            .get_mut(space)
            .ok_or_else(|| LeaseError::Unknown(space.clone()))?;
        if let Some(existing) = e.by_key.get(public_key) {
            if existing.owner != owner {
                return Err(LeaseError::NotOwner {
                    space: space.clone(),
                    key: *public_key,
                });
            }
            let pending = self.commit.submit(Write::Keep {
                egress: space.store_key(),
                public_key: *public_key,
                owner: owner.to_string(),
            });
            return Ok((existing.clone(), false, pending));
        }
        // A full pool is said to be full, whoever asks.
        if e.held_by(owner) >= max_per_owner && e.len() < e.capacity() {
            return Err(LeaseError::QuotaExceeded {
                space: space.clone(),
                max: max_per_owner,
            });
        }
        let address = e.allocate(space, public_key)?;
        let address6 = e.allocate6(space, public_key, address)?;
        let stored = StoredLease {
            lease: Lease {
                egress: space.store_key(),
                public_key: *public_key,
                address,
                address6,
                created_at: now_secs(),
                attachment: attachment.clone(),
                member: member.map(Box::new),
            },
            owner: owner.to_string(),
            endpoint: None,
        };
        let pending = self.commit.submit(Write::Create(stored.clone()));
        e.insert(stored.clone());
        Ok((stored, true, pending))
    }

    /// The lease of `key`, if `owner` may release it (`None`: anyone may, i.e. the daemon's
    /// own collection).
    pub fn releasable(
        &self,
        space: &Space,
        key: &Key,
        owner: Option<&str>,
    ) -> Result<&StoredLease, LeaseError> {
        let existing = self
            .egress(space)?
            .get(key)
            .ok_or_else(|| LeaseError::NotFound {
                space: space.clone(),
                key: *key,
            })?;
        if owner.is_some_and(|o| o != existing.owner) {
            return Err(LeaseError::NotOwner {
                space: space.clone(),
                key: *key,
            });
        }
        Ok(existing)
    }

    /// Releases a lease made by `owner` (or by anyone when `owner` is `None`: the daemon's
    /// own collection). Durable once the [`Pending`] resolves.
    pub fn release(
        &mut self,
        space: &Space,
        key: &Key,
        owner: Option<&str>,
    ) -> Result<(StoredLease, Pending), LeaseError> {
        self.releasable(space, key, owner)?;
        let e = self
            .egresses
            .get_mut(space)
            .ok_or_else(|| LeaseError::Unknown(space.clone()))?;
        let removed = e.remove(key).ok_or_else(|| LeaseError::NotFound {
            space: space.clone(),
            key: *key,
        })?;
        let pending = self.commit.submit(Write::Delete {
            egress: space.store_key(),
            public_key: *key,
            owner: owner.map(String::from),
        });
        Ok((removed, pending))
    }

    /// Records that `key`'s peer was seen at `endpoint`; a write only when that changed.
    pub fn note_endpoint(
        &mut self,
        space: &Space,
        key: &Key,
        endpoint: SocketAddr,
    ) -> Option<Pending> {
        let lease = self.egresses.get_mut(space)?.by_key.get_mut(key)?;
        if lease.endpoint == Some(endpoint) {
            return None;
        }
        lease.endpoint = Some(endpoint);
        Some(self.commit.submit(Write::Seen {
            egress: space.store_key(),
            public_key: *key,
            endpoint,
        }))
    }

    /// Drops `key`'s lease from memory only: for a lease whose creation the store refused,
    /// so the store holds nothing to delete.
    pub fn forget(&mut self, space: &Space, key: &Key) {
        if let Some(e) = self.egresses.get_mut(space) {
            e.remove(key);
        }
    }

    /// Submits a write straight to the store, in order with the registry's own (e.g. to
    /// delete a stored lease that no longer fits the config).
    pub fn submit(&self, write: Write) -> Pending {
        self.commit.submit(write)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::tests::egress;

    /// The egress named `name`.
    fn sp(name: &str) -> Space {
        Space::Egress(name.into())
    }
    use crate::leases::redb::RedbStore;

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
        let (l, new, pending) = r.lease(&sp(egress), req, owner, usize::MAX)?;
        pending.wait().map_err(LeaseError::Store)?;
        Ok((l, new))
    }

    fn release(
        r: &mut Registry,
        egress: &str,
        key: &Key,
        owner: Option<&str>,
    ) -> Result<StoredLease, LeaseError> {
        let (l, pending) = r.release(&sp(egress), key, owner)?;
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
    fn a_full_pool_is_said_to_be_full_even_to_an_owner_at_its_quota() {
        let t = tempfile::tempdir().unwrap();
        let mut r = open(t.path());
        for n in 1..=5 {
            r.lease(&sp("a"), &req(n), "alice", 5)
                .unwrap()
                .2
                .wait()
                .unwrap();
        }
        assert!(matches!(
            r.lease(&sp("a"), &req(6), "alice", 5),
            Err(LeaseError::PoolExhausted { .. })
        ));
    }

    #[test]
    fn an_owner_gets_at_most_its_quota() {
        let t = tempfile::tempdir().unwrap();
        let mut r = open(t.path());
        for n in 1..=2 {
            r.lease(&sp("a"), &req(n), "alice", 2)
                .unwrap()
                .2
                .wait()
                .unwrap();
        }
        assert!(matches!(
            r.lease(&sp("a"), &req(3), "alice", 2),
            Err(LeaseError::QuotaExceeded { max: 2, .. })
        ));
        // Others are not held to alice's count, renewing is not a new lease, and a
        // release makes room.
        r.lease(&sp("a"), &req(4), "bob", 2)
            .unwrap()
            .2
            .wait()
            .unwrap();
        r.lease(&sp("a"), &req(1), "alice", 2)
            .unwrap()
            .2
            .wait()
            .unwrap();
        release(&mut r, "a", &Key([1; 32]), Some("alice")).unwrap();
        r.lease(&sp("a"), &req(3), "alice", 2)
            .unwrap()
            .2
            .wait()
            .unwrap();
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
            Err(LeaseError::Unknown(_))
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
        assert_eq!(r.egress(&sp("a")).unwrap().len(), 2);
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

    fn foreign(n: u8, host: u8) -> StoredLease {
        stored_lease(n, host, "elsewhere")
    }

    /// A lease of egress "a" for key `[n; 32]` at 100.96.0.`host`, held by `owner`.
    pub(crate) fn stored_lease(n: u8, host: u8, owner: &str) -> StoredLease {
        StoredLease {
            lease: Lease {
                egress: "a".into(),
                public_key: Key([n; 32]),
                address: std::net::Ipv4Addr::new(100, 96, 0, host).into(),
                address6: None,
                created_at: 1,
                attachment: Default::default(),
                member: None,
            },
            owner: owner.into(),
            endpoint: None,
        }
    }

    #[test]
    fn leases_of_other_members_are_adopted_and_an_address_is_free_only_when_no_one_holds_it() {
        let t = tempfile::tempdir().unwrap();
        let mut r = open(t.path());
        assert_eq!(r.adopt(foreign(9, 2)), Adopted::New);
        assert_eq!(r.adopt(foreign(9, 2)), Adopted::Known);
        let mut outside = foreign(8, 200);
        assert_eq!(r.adopt(outside.clone()), Adopted::Misfit);
        outside.lease.egress = "zzz".into();
        assert_eq!(r.adopt(outside), Adopted::Misfit);
        // Our own lease is never given an address another member holds.
        let (mine, _, pending) = r.lease(&sp("a"), &req(1), "o", usize::MAX).unwrap();
        pending.wait().unwrap();
        assert_ne!(mine.lease.address, foreign(9, 2).lease.address);
        // Another member's lease at the address of ours (which the store will refuse):
        // both hold it, and it stays taken until both are gone.
        let host = match mine.lease.address {
            std::net::IpAddr::V4(a) => a.octets()[3],
            _ => unreachable!(),
        };
        assert_eq!(r.adopt(foreign(7, host)), Adopted::New);
        assert!(r.lease_at(&sp("a"), mine.lease.address).is_some());
        // Ours refused (here: taken out of the embedded store by hand) and forgotten.
        r.forget(&sp("a"), &Key([1; 32]));
        r.submit(Write::Delete {
            egress: "a".into(),
            public_key: Key([1; 32]),
            owner: None,
        })
        .wait()
        .unwrap();
        for n in 20..23 {
            let (l, _, p) = r.lease(&sp("a"), &req(n), "o", usize::MAX).unwrap();
            p.wait().unwrap();
            assert_ne!(l.lease.address, mine.lease.address, "a held address reused");
        }
        assert!(r.drop_remote(&sp("a"), &Key([7; 32])).is_some());
        assert!(r.drop_remote(&sp("a"), &Key([7; 32])).is_none());
        let (l, _, p) = r.lease(&sp("a"), &req(30), "o", usize::MAX).unwrap();
        p.wait().unwrap();
        assert_eq!(
            l.lease.address, mine.lease.address,
            "freed once no one holds it"
        );
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
                .egress(&sp("a"))
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
                        match g.lease(&sp("a"), &key, "o", usize::MAX) {
                            Ok(_) | Err(LeaseError::PoolExhausted { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                        check(&g);
                        drop(g);
                        std::thread::yield_now();
                        let mut g = r.lock().unwrap();
                        if i % 3 != 0 {
                            let _ = g.release(&sp("a"), &key.public_key, None);
                        }
                        check(&g);
                    }
                });
            }
        });
        // The store says the same as memory.
        let r = r.into_inner().unwrap();
        let mut held: Vec<_> = r
            .egress(&sp("a"))
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
        use crate::config::network::tests::network;
        use wgexit::api::{MemberInfo, MemberKind};
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
        assert_eq!(r.egress(&sp("a")).unwrap().get(&Key([1; 32])), Some(&old));
        let info = MemberInfo {
            network: "a".into(),
            kind: MemberKind::Container,
            app: "web".into(),
            region: "ams".into(),
            name: String::new(),
        };
        let scope = Space::Network("a".into());
        let holder = Holder {
            public_key: &Key([1; 32]),
            attachment: &Attachment::default(),
            owner: "o",
        };
        let (m, new, pending) = r.lease_for(&scope, holder, Some(info), usize::MAX).unwrap();
        pending.wait().unwrap();
        assert!(new && m.lease.address.is_ipv6());
        // Egress counts leave the network's members out.
        assert_eq!(r.egresses().count(), 1);
        drop(r);
        let (r, misfits) =
            Registry::load_with_networks(&[egress("a", "100.96.0.0/29")], &nets, store).unwrap();
        assert!(misfits.is_empty());
        assert_eq!(r.egress(&scope).unwrap().get(&Key([1; 32])), Some(&m));
        assert_eq!(m.lease.egress, Space::Network("a".into()).store_key());
    }

    fn three_ips(assign: crate::leases::egress_ips::Assign) -> EgressConfig {
        use crate::leases::egress_ips::EgressIps;
        let mut e = egress("s", "100.98.0.0/24");
        let ips = ["203.0.113.80", "203.0.113.81", "203.0.113.82"];
        e.egress_ips =
            EgressIps::new(ips.iter().map(|i| i.parse().unwrap()).collect(), assign).unwrap();
        e
    }

    fn load_one(e: &EgressConfig, dir: &std::path::Path) -> Registry {
        let store = Arc::new(RedbStore::open(&dir.join("l.redb")).unwrap());
        let (r, misfits) = Registry::load(std::slice::from_ref(e), store).unwrap();
        assert!(misfits.is_empty());
        r
    }

    #[test]
    fn spread_balances_leases_over_the_ips_and_keeps_each_leases_ip_across_a_reload() {
        use crate::leases::egress_ips::Assign;
        let t = tempfile::tempdir().unwrap();
        let e = three_ips(Assign::Spread);
        let mut before = HashMap::new();
        {
            let mut r = load_one(&e, t.path());
            for n in 1..=30 {
                let (l, _) = lease(&mut r, "s", &req(n), "o").unwrap();
                before.insert(n, e.egress_ip_of(l.lease.address));
            }
            let counts = ip_counts(&r, "s");
            assert_eq!(counts, vec![10, 10, 10]);
            for n in [1, 4, 7] {
                release(&mut r, "s", &Key([n; 32]), Some("o")).unwrap();
            }
        }
        let mut r = load_one(&e, t.path());
        let counts = ip_counts(&r, "s");
        assert_eq!(counts.iter().sum::<usize>(), 27);
        for n in (1..=30).filter(|n| ![1, 4, 7].contains(n)) {
            let (l, new) = lease(&mut r, "s", &req(n), "o").unwrap();
            assert!(!new);
            assert_eq!(
                e.egress_ip_of(l.lease.address),
                before[&n],
                "lease {n} moved"
            );
        }
        // New leases fill the IPs that lost leases first.
        for n in 40..43 {
            lease(&mut r, "s", &req(n), "o").unwrap();
        }
        let counts = ip_counts(&r, "s");
        assert_eq!(counts, vec![10, 10, 10]);
    }

    /// How many leases leave from each of egress `name`'s IPs, in order.
    fn ip_counts(r: &Registry, name: &str) -> Vec<usize> {
        r.egress(&sp(name))
            .unwrap()
            .ip_usage()
            .iter()
            .map(|u| u.1)
            .collect()
    }

    #[test]
    fn exclusive_gives_each_lease_its_own_ip_and_refuses_a_fourth() {
        use crate::leases::egress_ips::Assign;
        let t = tempfile::tempdir().unwrap();
        let e = three_ips(Assign::Exclusive);
        let mut r = load_one(&e, t.path());
        let ips: std::collections::HashSet<_> = (1..=3)
            .map(|n| e.egress_ip_of(lease(&mut r, "s", &req(n), "o").unwrap().0.lease.address))
            .collect();
        assert_eq!(ips.len(), 3);
        assert_eq!(r.egress(&sp("s")).unwrap().capacity(), 3);
        let refused = lease(&mut r, "s", &req(4), "o").unwrap_err();
        assert!(matches!(refused, LeaseError::EgressIpsExhausted { .. }));
        let msg = refused.to_string();
        assert!(
            msg.contains("203.0.113.80, 203.0.113.81, 203.0.113.82"),
            "{msg}"
        );
        let freed = release(&mut r, "s", &Key([2; 32]), Some("o")).unwrap();
        drop(r);
        // After a reload the held IPs are still held; the freed one is given out again.
        let mut r = load_one(&e, t.path());
        let (l, _) = lease(&mut r, "s", &req(4), "o").unwrap();
        assert_eq!(
            e.egress_ip_of(l.lease.address),
            e.egress_ip_of(freed.lease.address)
        );
        assert!(matches!(
            lease(&mut r, "s", &req(5), "o"),
            Err(LeaseError::EgressIpsExhausted { .. })
        ));
    }

    #[test]
    fn a_stored_lease_outside_every_ips_block_is_a_misfit() {
        use crate::leases::egress_ips::Assign;
        let t = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&t.path().join("l.redb")).unwrap());
        let mut old = foreign(1, 200);
        old.lease.egress = "s".into();
        old.lease.address = std::net::Ipv4Addr::new(100, 98, 0, 200).into();
        store.apply(&[Write::Create(old.clone())]).unwrap();
        let (_, misfits) = Registry::load(&[three_ips(Assign::Spread)], store).unwrap();
        assert_eq!(misfits, vec![old]);
    }

    #[test]
    fn a_lease_on_an_egress_with_ip6_gets_an_ipv6_kept_across_a_reload_and_freed_with_it() {
        use crate::config::egress6::EgressV6;
        use crate::leases::egress_ips::Assign;
        let t = tempfile::tempdir().unwrap();
        // A lease stored before the egress had IPv6 (no address6 in its JSON) still loads.
        let old = {
            let mut r = load_one(&three_ips(Assign::Exclusive), t.path());
            lease(&mut r, "s", &req(1), "o").unwrap().0
        };
        assert_eq!(old.lease.address6, None);
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("address6"), "{json}");
        assert_eq!(serde_json::from_str::<StoredLease>(&json).unwrap(), old);
        let mut e = three_ips(Assign::Exclusive);
        let ips6 = ["2001:db8:77::80", "2001:db8:77::81", "2001:db8:77::82"];
        e.v6 = Some(EgressV6 {
            ips: ips6.iter().map(|i| i.parse().unwrap()).collect(),
            pool: "fd77:0:1::/64".parse().unwrap(),
        });
        let mut made = Vec::new();
        {
            let mut r = load_one(&e, t.path());
            assert_eq!(r.egress(&sp("s")).unwrap().get(&Key([1; 32])), Some(&old));
            for n in 2..=3 {
                let (l, _) = lease(&mut r, "s", &req(n), "o").unwrap();
                let a6 = l.lease.address6.expect("an IPv6");
                // The IPv6 leaves from the IPv6 at the index of the lease's IPv4.
                let i4 = e
                    .ips()
                    .iter()
                    .position(|ip| *ip == e.egress_ip_of(l.lease.address));
                let i6 = ips6
                    .iter()
                    .position(|ip| Some(ip.parse().unwrap()) == e.egress_ip6_of(a6.into()));
                assert_eq!(i4, i6);
                made.push(l);
            }
            let used: Vec<usize> = r
                .egress(&sp("s"))
                .unwrap()
                .ip6_usage()
                .iter()
                .map(|u| u.1)
                .collect();
            assert_eq!(used.iter().sum::<usize>(), 2);
        }
        let mut r = load_one(&e, t.path());
        assert_eq!(
            r.egress(&sp("s")).unwrap().get(&Key([2; 32])),
            Some(&made[0])
        );
        assert_eq!(
            r.egress(&sp("s"))
                .unwrap()
                .ip6_usage()
                .iter()
                .map(|u| u.1)
                .sum::<usize>(),
            2
        );
        release(&mut r, "s", &Key([2; 32]), Some("o")).unwrap();
        assert_eq!(
            r.egress(&sp("s"))
                .unwrap()
                .ip6_usage()
                .iter()
                .map(|u| u.1)
                .sum::<usize>(),
            1
        );
        // The same key gets the same IPv6 again once it is free.
        let again = lease(&mut r, "s", &req(2), "o").unwrap().0;
        assert_eq!(again.lease.address6, made[0].lease.address6);
    }

    #[test]
    fn a_stored_ipv6_outside_pool6_does_not_fit() {
        use crate::config::egress6::EgressV6;
        let mut e = egress("a", "100.96.0.0/29");
        e.v6 = Some(EgressV6 {
            ips: vec!["2001:db8:77::77".parse().unwrap()],
            pool: "fd77:0:1::/64".parse().unwrap(),
        });
        let mut inside = foreign(1, 2);
        inside.lease.address6 = Some("fd77:0:1::1234".parse().unwrap());
        let mut outside = foreign(2, 3);
        outside.lease.address6 = Some("fd77:0:2::1234".parse().unwrap());
        let (placed, misfits) = place(std::slice::from_ref(&e), &[], vec![inside, outside.clone()]);
        assert_eq!(misfits, vec![outside.clone()]);
        let a = &placed[&sp("a")];
        assert_eq!(a.len(), 1);
        assert_eq!(a.ip6_usage()[0].1, 1);
        // The misfit holds no IPv4 either.
        assert_eq!(a.pool.in_use(), 1);
    }
}
