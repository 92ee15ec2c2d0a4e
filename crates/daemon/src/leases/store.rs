//! The lease store seam: durable leases behind conditional writes.
//!
//! Every write states the condition it needs, and the store checks it in the same
//! transaction that applies it: a lease is created only if neither its public key nor its
//! address is leased in its egress, and deleted only if it is there and (when asked) was made
//! by the given owner. So allocation stays correct on a store that other exit nodes write
//! too (a pool on etcd), not only behind this process's in-memory registry.
//!
//! [`RedbStore`](super::redb::RedbStore) is the embedded store, the default.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use wgexit::api::Lease;
use wgexit::keys::Key;

/// A lease and who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    pub lease: Lease,
    /// [`crate::api::tokens::owner_id`] of the token that made the lease.
    pub owner: String,
    /// Where the peer's packets last came from, as far as an exit node saw: after a device
    /// is made anew the exit node sets it and starts the handshake itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
}

impl StoredLease {
    /// The unconditional delete of this lease.
    pub fn delete(&self) -> Write {
        Write::Delete {
            egress: self.lease.egress.clone(),
            public_key: self.lease.public_key,
            owner: None,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("lease store {store}: {detail}")]
pub struct StoreError {
    /// Which store, for messages (a file, or etcd's endpoints).
    pub store: String,
    pub detail: String,
    /// The store cannot be reached or has no quorum right now: trying again later may
    /// work (the API answers 503 `store_unavailable`).
    pub unavailable: bool,
}

impl StoreError {
    /// A store failure that will not go away by itself.
    pub fn failed(store: impl Into<String>, detail: impl Into<String>) -> StoreError {
        StoreError {
            store: store.into(),
            detail: detail.into(),
            unavailable: false,
        }
    }

    /// The store is unreachable or without quorum for now.
    pub fn unavailable(store: impl Into<String>, detail: impl Into<String>) -> StoreError {
        StoreError {
            store: store.into(),
            detail: detail.into(),
            unavailable: true,
        }
    }
}

/// One conditional change to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Creates a lease; refused when its public key or its address is leased in its egress.
    Create(StoredLease),
    /// Changes nothing; refused unless the lease exists and was made by `owner`. Orders an
    /// idempotent lease request after the write that created its lease.
    Keep {
        egress: String,
        public_key: Key,
        owner: String,
    },
    /// Records where a lease's peer was last seen; refused when the lease is absent.
    Seen {
        egress: String,
        public_key: Key,
        endpoint: SocketAddr,
    },
    /// Deletes a lease; refused when it is absent or, with an `owner`, made by another.
    Delete {
        egress: String,
        public_key: Key,
        owner: Option<String>,
    },
}

impl Write {
    /// The egress and public key of the lease it is about.
    pub fn lease_id(&self) -> (&str, &Key) {
        match self {
            Write::Create(l) => (&l.lease.egress, &l.lease.public_key),
            Write::Keep {
                egress, public_key, ..
            }
            | Write::Seen {
                egress, public_key, ..
            }
            | Write::Delete {
                egress, public_key, ..
            } => (egress, public_key),
        }
    }

    /// Whether applying it can change the store.
    pub fn mutates(&self) -> bool {
        !matches!(self, Write::Keep { .. })
    }
}

/// Why a store refused one write. The other writes of its batch are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// With the lease the store holds for it, when the store could read it.
    #[error("public key {key} already holds a lease")]
    KeyLeased {
        key: Key,
        held: Option<Box<StoredLease>>,
    },
    #[error("address {address} is already leased to {holder}")]
    AddressLeased { address: IpAddr, holder: Key },
    #[error("no lease for public key {0}")]
    Absent(Key),
    #[error("the lease for {0} was made with another token")]
    NotOwner(Key),
}

/// What became of each write of a batch, in order.
pub type Applied = Vec<Result<(), Refusal>>;

pub trait LeaseStore: Send + Sync {
    /// Which store this is, for messages.
    fn name(&self) -> String;
    /// Applies `writes` in order in one durable transaction; each write whose condition
    /// fails is refused and skipped. `Err` means nothing was applied — except on a store
    /// that needs several transactions for a batch (etcd), where a prefix of it may have
    /// been; every write is then reported failed, and a lease made that way is found again
    /// by [`LeaseStore::load`] (and collected if nobody uses it).
    fn apply(&self, writes: &[Write]) -> Result<Applied, StoreError>;
    /// Every stored lease.
    fn load(&self) -> Result<Vec<StoredLease>, StoreError>;
}

/// The decision a store makes for one write, given what it holds: `lease_of(key)` and
/// `holder_of(address)` within the write's egress. Shared by every store so they agree.
pub fn check(
    write: &Write,
    lease_of: impl Fn(&Key) -> Option<StoredLease>,
    holder_of: impl Fn(&IpAddr) -> Option<Key>,
) -> Result<(), Refusal> {
    match write {
        Write::Create(new) => {
            if let Some(held) = lease_of(&new.lease.public_key) {
                return Err(Refusal::KeyLeased {
                    key: new.lease.public_key,
                    held: Some(Box::new(held)),
                });
            }
            match holder_of(&new.lease.address) {
                Some(holder) => Err(Refusal::AddressLeased {
                    address: new.lease.address,
                    holder,
                }),
                None => Ok(()),
            }
        }
        Write::Keep {
            public_key, owner, ..
        } => owned_by(lease_of(public_key), public_key, Some(owner)),
        Write::Delete {
            public_key, owner, ..
        } => owned_by(lease_of(public_key), public_key, owner.as_deref()),
        Write::Seen { public_key, .. } => owned_by(lease_of(public_key), public_key, None),
    }
}

fn owned_by(found: Option<StoredLease>, key: &Key, owner: Option<&str>) -> Result<(), Refusal> {
    match found {
        None => Err(Refusal::Absent(*key)),
        Some(l) if owner.is_some_and(|o| o != l.owner) => Err(Refusal::NotOwner(*key)),
        Some(_) => Ok(()),
    }
}

/// A lease of `egress` for key `[key; 32]` at 100.96.0.`host`, container `c<key>`, held by
/// `owner`: the stores' tests' one fixture.
#[cfg(test)]
pub(crate) fn test_lease(egress: &str, key: u8, host: u8, owner: &str) -> StoredLease {
    StoredLease {
        lease: Lease {
            egress: egress.into(),
            public_key: Key([key; 32]),
            address: IpAddr::from([100, 96, 0, host]),
            address6: None,
            created_at: 1,
            attachment: wgexit::api::Attachment {
                container_id: format!("c{key}"),
                ..Default::default()
            },
            member: None,
        },
        owner: owner.into(),
        endpoint: None,
    }
}
