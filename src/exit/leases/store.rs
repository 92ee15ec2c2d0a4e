//! Durable lease storage.
//!
//! [`LeaseStore`] is the seam for other stores (an etcd-backed one can serve a pool of exit
//! nodes); [`RedbStore`] is the embedded, crash-safe one: every `put`/`remove` is committed
//! with `Durability::Immediate` (fsync) before it returns, so a lease the API has answered
//! with survives a crash. [`LeaseStore::apply`] commits many writes in one such transaction
//! (see [`crate::exit::commit`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::api::Lease;
use crate::keys::Key;

/// A lease and who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    pub lease: Lease,
    /// [`crate::exit::tokens::owner_id`] of the token that made the lease.
    pub owner: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("lease store {path}: {detail}")]
pub struct StoreError {
    pub path: PathBuf,
    pub detail: String,
}

/// One change to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(StoredLease),
    Remove { egress: String, public_key: Key },
}

pub trait LeaseStore: Send + Sync {
    /// Where the store lives, for messages.
    fn path(&self) -> PathBuf;
    /// Applies `writes` in order, durably, all or none.
    fn apply(&self, writes: &[Write]) -> Result<(), StoreError>;
    /// Every stored lease.
    fn load(&self) -> Result<Vec<StoredLease>, StoreError>;
    /// Writes (or overwrites) a lease durably.
    fn put(&self, lease: &StoredLease) -> Result<(), StoreError>;
    /// Removes a lease durably; true if it was there.
    fn remove(&self, egress: &str, public_key: &Key) -> Result<bool, StoreError>;
}

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

fn record_key(egress: &str, public_key: &Key) -> String {
    format!("{egress}/{}", public_key.to_base64())
}

pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let err = |detail: String| StoreError {
            path: path.to_path_buf(),
            detail,
        };
        let db = Database::create(path).map_err(|e| {
            err(format!(
                "{e} (is another wgexitd running with the same state_dir?)"
            ))
        })?;
        // Leases name containers and hosts: owner-only, like every file under state_dir.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(format!("cannot make the store owner-only: {e}")))?;
        let store = RedbStore {
            db,
            path: path.to_path_buf(),
        };
        // Make sure the table exists so reads on a fresh store succeed.
        store.write(|_| Ok(()))?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<T, redb::StorageError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = {
            let mut table = txn.open_table(LEASES).map_err(|e| self.err(e))?;
            f(&mut table).map_err(|e| self.err(e))?
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }
}

impl LeaseStore for RedbStore {
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut records = Vec::with_capacity(writes.len());
        for w in writes {
            records.push(match w {
                Write::Put(lease) => (
                    record_key(&lease.lease.egress, &lease.lease.public_key),
                    Some(serde_json::to_vec(lease).map_err(|e| self.err(e))?),
                ),
                Write::Remove { egress, public_key } => (record_key(egress, public_key), None),
            });
        }
        self.write(|t| {
            for (key, value) in &records {
                match value {
                    Some(v) => {
                        t.insert(key.as_str(), v.as_slice())?;
                    }
                    None => {
                        t.remove(key.as_str())?;
                    }
                }
            }
            Ok(())
        })
    }

    fn load(&self) -> Result<Vec<StoredLease>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LEASES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match serde_json::from_slice::<StoredLease>(v.value()) {
                Ok(lease) => out.push(lease),
                Err(e) => {
                    return Err(self.err(format!("record {:?} is unreadable: {e}", k.value())))
                }
            }
        }
        Ok(out)
    }

    fn put(&self, lease: &StoredLease) -> Result<(), StoreError> {
        let key = record_key(&lease.lease.egress, &lease.lease.public_key);
        let value = serde_json::to_vec(lease).map_err(|e| self.err(e))?;
        self.write(|t| t.insert(key.as_str(), value.as_slice()).map(|_| ()))
    }

    fn remove(&self, egress: &str, public_key: &Key) -> Result<bool, StoreError> {
        let key = record_key(egress, public_key);
        self.write(|t| t.remove(key.as_str()).map(|old| old.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Attachment;

    fn lease(egress: &str, n: u8) -> StoredLease {
        StoredLease {
            lease: Lease {
                egress: egress.into(),
                public_key: Key([n; 32]),
                address: std::net::Ipv4Addr::new(100, 96, 0, n),
                created_at: 1,
                attachment: Attachment {
                    container_id: format!("c{n}"),
                    ..Default::default()
                },
            },
            owner: "o".into(),
        }
    }

    #[test]
    fn leases_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            s.put(&lease("a", 2)).unwrap();
            s.put(&lease("a", 3)).unwrap();
            s.put(&lease("b", 2)).unwrap();
            assert!(s.remove("a", &Key([3; 32])).unwrap());
            assert!(!s.remove("a", &Key([3; 32])).unwrap());
        }
        let s = RedbStore::open(&path).unwrap();
        let mut got = s.load().unwrap();
        got.sort_by(|x, y| x.lease.egress.cmp(&y.lease.egress));
        assert_eq!(got, vec![lease("a", 2), lease("b", 2)]);
    }

    #[test]
    fn a_batch_applies_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        let gone = Write::Remove {
            egress: "a".into(),
            public_key: Key([3; 32]),
        };
        s.apply(&[
            Write::Put(lease("a", 2)),
            Write::Put(lease("a", 3)),
            gone,
            Write::Put(lease("b", 4)),
        ])
        .unwrap();
        let mut got = s.load().unwrap();
        got.sort_by(|x, y| x.lease.egress.cmp(&y.lease.egress));
        assert_eq!(got, vec![lease("a", 2), lease("b", 4)]);
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.redb");
        let _s = RedbStore::open(&path).unwrap();
        let e = RedbStore::open(&path).err().unwrap();
        assert!(e.to_string().contains("another wgexitd"), "{e}");
    }
}
