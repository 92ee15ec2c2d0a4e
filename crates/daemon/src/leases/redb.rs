//! The embedded lease store: `redb`, pure Rust, ACID, every commit fsync'd
//! (`Durability::Immediate`), so a lease the API has answered with survives a crash.
//!
//! Two tables: `leases` (`egress/public key` → the lease as JSON) and `addresses`
//! (`egress/address` → the public key holding it), the index that lets a create check its
//! address in the same transaction. The index is rebuilt from `leases` at every open, so a
//! store written by an older version (which had no index) is read as it is.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};

use super::store::{check, Applied, LeaseStore, StoreError, StoredLease, Write};
use wgexit::keys::Key;

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const ADDRESSES: TableDefinition<&str, &[u8]> = TableDefinition::new("addresses");

fn lease_key(egress: &str, public_key: &Key) -> String {
    format!("{egress}/{}", public_key.to_base64())
}

fn address_key(egress: &str, address: &IpAddr) -> String {
    format!("{egress}/{address}")
}

pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

/// Both tables of one write transaction.
struct Tables<'t> {
    leases: Table<'t, &'static str, &'static [u8]>,
    addresses: Table<'t, &'static str, &'static [u8]>,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let err = |detail: String| StoreError::failed(path.display().to_string(), detail);
        let db = crate::redb_file::create(path).map_err(|e| {
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
        store.rebuild_index()?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::failed(self.path.display().to_string(), e.to_string())
    }

    /// Runs `f` on both tables in one write transaction; commits (fsync) when it returns
    /// `(true, _)`, else lets the transaction go unwritten.
    fn transact<T>(
        &self,
        f: impl FnOnce(&mut Tables) -> Result<(bool, T), StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let (commit, out) = {
            let mut tables = Tables {
                leases: txn.open_table(LEASES).map_err(|e| self.err(e))?,
                addresses: txn.open_table(ADDRESSES).map_err(|e| self.err(e))?,
            };
            f(&mut tables)?
        };
        if commit {
            txn.commit().map_err(|e| self.err(e))?;
        } else {
            txn.abort().map_err(|e| self.err(e))?;
        }
        Ok(out)
    }

    /// The address index, made anew from the leases (the first lease of an address wins;
    /// the registry reports the others as misfits).
    fn rebuild_index(&self) -> Result<(), StoreError> {
        let leases = self.load_from(&self.db.begin_read().map_err(|e| self.err(e))?);
        let leases = match leases {
            Ok(l) => l,
            // A fresh store has no tables yet.
            Err(None) => Vec::new(),
            Err(Some(e)) => return Err(e),
        };
        self.transact(|t| {
            t.addresses.retain(|_, _| false).map_err(|e| self.err(e))?;
            for l in &leases {
                let at = address_key(&l.lease.egress, &l.lease.address);
                if t.addresses
                    .get(at.as_str())
                    .map_err(|e| self.err(e))?
                    .is_none()
                {
                    t.addresses
                        .insert(at.as_str(), l.lease.public_key.0.as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            Ok((true, ()))
        })
    }

    fn load_from(
        &self,
        txn: &redb::ReadTransaction,
    ) -> Result<Vec<StoredLease>, Option<StoreError>> {
        let table = match txn.open_table(LEASES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Err(None),
            Err(e) => return Err(Some(self.err(e))),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| Some(self.err(e)))? {
            let (k, v) = row.map_err(|e| Some(self.err(e)))?;
            let lease = serde_json::from_slice::<StoredLease>(v.value()).map_err(|e| {
                Some(self.err(format!("record {:?} is unreadable: {e}", k.value())))
            })?;
            out.push(lease);
        }
        Ok(out)
    }

    fn lease_in(
        &self,
        t: &Tables,
        egress: &str,
        key: &Key,
    ) -> Result<Option<StoredLease>, StoreError> {
        let Some(v) = t
            .leases
            .get(lease_key(egress, key).as_str())
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| self.err(format!("record {egress}/{key} is unreadable: {e}")))
    }

    fn holder_in(
        &self,
        t: &Tables,
        egress: &str,
        address: &IpAddr,
    ) -> Result<Option<Key>, StoreError> {
        let v = t
            .addresses
            .get(address_key(egress, address).as_str())
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| <[u8; 32]>::try_from(v.value()).ok().map(Key)))
    }

    /// Checks `w` against the tables and applies it; `Ok(Err(_))` is a refusal.
    fn apply_one(
        &self,
        t: &mut Tables,
        w: &Write,
    ) -> Result<Result<(), super::store::Refusal>, StoreError> {
        let (egress, &key) = w.lease_id();
        // Read what the condition needs first (any read error fails the batch).
        let existing = self.lease_in(t, egress, &key)?;
        let holder = match w {
            Write::Create(l) => self.holder_in(t, egress, &l.lease.address)?,
            _ => None,
        };
        if let Err(refused) = check(w, |_| existing.clone(), |_| holder) {
            return Ok(Err(refused));
        }
        match (w, existing) {
            (Write::Create(l), _) => {
                let value = serde_json::to_vec(l).map_err(|e| self.err(e))?;
                t.leases
                    .insert(lease_key(egress, &key).as_str(), value.as_slice())
                    .map_err(|e| self.err(e))?;
                t.addresses
                    .insert(
                        address_key(egress, &l.lease.address).as_str(),
                        key.0.as_slice(),
                    )
                    .map_err(|e| self.err(e))?;
            }
            (Write::Seen { endpoint, .. }, Some(mut seen)) => {
                seen.endpoint = Some(*endpoint);
                let value = serde_json::to_vec(&seen).map_err(|e| self.err(e))?;
                t.leases
                    .insert(lease_key(egress, &key).as_str(), value.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            (Write::Delete { .. }, Some(old)) => {
                t.leases
                    .remove(lease_key(egress, &key).as_str())
                    .map_err(|e| self.err(e))?;
                if self.holder_in(t, egress, &old.lease.address)? == Some(key) {
                    t.addresses
                        .remove(address_key(egress, &old.lease.address).as_str())
                        .map_err(|e| self.err(e))?;
                }
            }
            _ => {}
        }
        Ok(Ok(()))
    }
}

impl LeaseStore for RedbStore {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn apply(&self, writes: &[Write]) -> Result<Applied, StoreError> {
        self.transact(|t| {
            let mut applied = Vec::with_capacity(writes.len());
            let mut changed = false;
            for w in writes {
                let outcome = self.apply_one(t, w)?;
                changed |= outcome.is_ok() && w.mutates();
                applied.push(outcome);
            }
            // A batch that changes nothing costs no fsync.
            Ok((changed, applied))
        })
    }

    fn load(&self) -> Result<Vec<StoredLease>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        match self.load_from(&txn) {
            Ok(l) => Ok(l),
            Err(None) => Ok(Vec::new()),
            Err(Some(e)) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::Refusal;
    use super::*;

    fn lease(egress: &str, n: u8) -> StoredLease {
        lease_at(egress, n, n)
    }

    fn lease_at(egress: &str, key: u8, host: u8) -> StoredLease {
        crate::leases::store::test_lease(egress, key, host, "o")
    }

    fn delete(egress: &str, n: u8, owner: Option<&str>) -> Write {
        Write::Delete {
            egress: egress.into(),
            public_key: Key([n; 32]),
            owner: owner.map(String::from),
        }
    }

    fn sorted(mut v: Vec<StoredLease>) -> Vec<StoredLease> {
        v.sort_by(|x, y| {
            (&x.lease.egress, x.lease.address).cmp(&(&y.lease.egress, y.lease.address))
        });
        v
    }

    #[test]
    fn leases_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            let got = s
                .apply(&[
                    Write::Create(lease("a", 2)),
                    Write::Create(lease("a", 3)),
                    Write::Create(lease("b", 2)),
                    delete("a", 3, None),
                    delete("a", 3, None),
                ])
                .unwrap();
            assert_eq!(got[3], Ok(()));
            assert_eq!(got[4], Err(Refusal::Absent(Key([3; 32]))));
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(
            sorted(s.load().unwrap()),
            vec![lease("a", 2), lease("b", 2)]
        );
    }

    #[test]
    fn a_second_lease_of_one_address_or_one_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        let got = s
            .apply(&[
                Write::Create(lease_at("a", 1, 5)),
                // Another key, the same address: refused.
                Write::Create(lease_at("a", 2, 5)),
                // The same key, another address: refused.
                Write::Create(lease_at("a", 1, 6)),
                // The same address in another egress is another address.
                Write::Create(lease_at("b", 2, 5)),
            ])
            .unwrap();
        assert_eq!(
            got,
            vec![
                Ok(()),
                Err(Refusal::AddressLeased {
                    address: IpAddr::from([100, 96, 0, 5]),
                    holder: Key([1; 32])
                }),
                Err(Refusal::KeyLeased {
                    key: Key([1; 32]),
                    held: Some(Box::new(lease_at("a", 1, 5))),
                }),
                Ok(()),
            ]
        );
        // Refusals hold across batches and reopening, and a deleted address is free again.
        drop(s);
        let s = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        assert!(s.apply(&[Write::Create(lease_at("a", 3, 5))]).unwrap()[0].is_err());
        let got = s
            .apply(&[delete("a", 1, None), Write::Create(lease_at("a", 3, 5))])
            .unwrap();
        assert_eq!(got, vec![Ok(()), Ok(())]);
        assert_eq!(
            sorted(s.load().unwrap()),
            vec![lease_at("a", 3, 5), lease_at("b", 2, 5)]
        );
    }

    #[test]
    fn deletes_and_keeps_check_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("leases.redb")).unwrap();
        s.apply(&[Write::Create(lease("a", 1))]).unwrap();
        let keep = |owner: &str| Write::Keep {
            egress: "a".into(),
            public_key: Key([1; 32]),
            owner: owner.into(),
        };
        let got = s
            .apply(&[
                delete("a", 1, Some("mallory")),
                keep("mallory"),
                keep("o"),
                delete("a", 1, Some("o")),
                keep("o"),
            ])
            .unwrap();
        let not_owner = Err(Refusal::NotOwner(Key([1; 32])));
        assert_eq!(
            got,
            vec![
                not_owner.clone(),
                not_owner,
                Ok(()),
                Ok(()),
                Err(Refusal::Absent(Key([1; 32])))
            ]
        );
        assert!(s.load().unwrap().is_empty());
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
