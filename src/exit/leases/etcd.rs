//! The lease store of a pool: etcd, shared by every member.
//!
//! Each lease is two keys (see [`crate::exit::cluster::etcd`]): its record under
//! `leases/<egress>/<key>` and its address's index entry under `addresses/<egress>/<ip>`.
//! A create is one transaction that writes both only if neither exists yet
//! (`create_revision == 0`), so two members leasing at once can never hand one address, or
//! one public key, out twice. A delete reads the record, checks its owner, and deletes it
//! only if it is still the record it read (`mod_revision` unchanged). Consecutive creates of
//! a batch go in one transaction when none conflicts, one at a time when one does.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::store::{check, Applied, LeaseStore, Refusal, StoreError, StoredLease, Write};
use crate::exit::cluster::etcd::Etcd;
use crate::keys::Key;

/// Creates per transaction: etcd allows 128 operations (and compares) in one.
const CREATES_PER_TXN: usize = 32;
/// Leases read per request when loading.
const LOAD_PAGE: i64 = 2000;
/// Attempts at a delete whose record changed between reading and deleting it.
const DELETE_ATTEMPTS: usize = 4;

pub struct EtcdStore {
    etcd: Arc<Etcd>,
}

fn write_key(w: &Write) -> (&str, Key) {
    match w {
        Write::Create(l) => (l.lease.egress.as_str(), l.lease.public_key),
        Write::Keep {
            egress, public_key, ..
        }
        | Write::Delete {
            egress, public_key, ..
        } => (egress.as_str(), *public_key),
    }
}

impl EtcdStore {
    pub fn new(etcd: Arc<Etcd>) -> EtcdStore {
        EtcdStore { etcd }
    }

    fn parse(&self, kv: &KeyValue) -> Result<StoredLease, StoreError> {
        serde_json::from_slice(kv.value()).map_err(|e| {
            StoreError::failed(
                self.etcd.name(),
                format!(
                    "record {} is unreadable: {e}",
                    String::from_utf8_lossy(kv.key())
                ),
            )
        })
    }

    /// Every stored lease, and the etcd revision they were read at (a watch from the next
    /// revision on misses nothing).
    pub async fn load_at(&self) -> Result<(Vec<StoredLease>, i64), StoreError> {
        let prefix = self.etcd.leases_prefix();
        let end = prefix_end(&prefix);
        let mut from = prefix.clone().into_bytes();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let start = from.clone();
            let resp = self
                .etcd
                .run("reading the leases", |mut c| async move {
                    c.get(start, Some(options)).await
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                out.push(self.parse(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    pub async fn apply_async(&self, writes: &[Write]) -> Result<Applied, StoreError> {
        let mut out = Vec::with_capacity(writes.len());
        let mut i = 0;
        while i < writes.len() {
            let creates: Vec<&StoredLease> = writes[i..]
                .iter()
                .take(CREATES_PER_TXN)
                .map_while(|w| match w {
                    Write::Create(l) => Some(l),
                    _ => None,
                })
                .collect();
            if creates.len() > 1 && self.create_all(&creates).await? {
                out.extend(creates.iter().map(|_| Ok(())));
                i += creates.len();
                continue;
            }
            out.push(self.apply_one(&writes[i]).await?);
            i += 1;
        }
        Ok(out)
    }

    async fn apply_one(&self, w: &Write) -> Result<Result<(), Refusal>, StoreError> {
        match w {
            Write::Create(l) => self.create(l).await,
            Write::Keep { .. } => {
                let (egress, key) = write_key(w);
                let found = self.read(egress, &key).await?;
                let existing = found.map(|(l, _)| l);
                Ok(check(w, |_| existing.clone(), |_| None))
            }
            Write::Delete { .. } => self.delete(w).await,
        }
    }

    /// The compares and puts that create `l`.
    fn create_ops(&self, l: &StoredLease) -> Result<(Vec<Compare>, Vec<TxnOp>), StoreError> {
        let egress = &l.lease.egress;
        let record = self.etcd.lease_key(egress, &l.lease.public_key);
        let index = self.etcd.address_key(egress, &l.lease.address);
        let value = serde_json::to_vec(l)
            .map_err(|e| StoreError::failed(self.etcd.name(), e.to_string()))?;
        Ok((
            vec![
                Compare::create_revision(record.clone(), CompareOp::Equal, 0),
                Compare::create_revision(index.clone(), CompareOp::Equal, 0),
            ],
            vec![
                TxnOp::put(record, value, None),
                TxnOp::put(index, l.lease.public_key.to_hex(), None),
            ],
        ))
    }

    /// Creates every lease of `creates` in one transaction if none conflicts; false (and
    /// nothing written) if one does.
    async fn create_all(&self, creates: &[&StoredLease]) -> Result<bool, StoreError> {
        let mut compares = Vec::new();
        let mut puts = Vec::new();
        for l in creates {
            let (c, p) = self.create_ops(l)?;
            compares.extend(c);
            puts.extend(p);
        }
        let txn = Txn::new().when(compares).and_then(puts);
        let resp = self
            .etcd
            .run("creating leases", |mut c| async move { c.txn(txn).await })
            .await?;
        Ok(resp.succeeded())
    }

    async fn create(&self, l: &StoredLease) -> Result<Result<(), Refusal>, StoreError> {
        let (compares, puts) = self.create_ops(l)?;
        let egress = &l.lease.egress;
        let txn = Txn::new().when(compares).and_then(puts).or_else(vec![
            TxnOp::get(self.etcd.lease_key(egress, &l.lease.public_key), None),
            TxnOp::get(self.etcd.address_key(egress, &l.lease.address), None),
        ]);
        let resp = self
            .etcd
            .run("creating a lease", |mut c| async move { c.txn(txn).await })
            .await?;
        if resp.succeeded() {
            return Ok(Ok(()));
        }
        let found = |i: usize| -> Option<KeyValue> {
            match resp.op_responses().get(i) {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().cloned(),
                _ => None,
            }
        };
        let existing = found(0).map(|kv| self.parse(&kv)).transpose()?;
        let holder = found(1).and_then(|kv| Key::from_hex(kv.value_str().ok()?).ok());
        // The write lost to one made meanwhile; say which way.
        Ok(match check(&Write::Create(l.clone()), |_| existing.clone(), |_| holder) {
            Ok(()) => Err(Refusal::KeyLeased(l.lease.public_key)),
            refused => refused,
        })
    }

    /// The lease of `key` in `egress` and its `mod_revision`.
    async fn read(
        &self,
        egress: &str,
        key: &Key,
    ) -> Result<Option<(StoredLease, i64)>, StoreError> {
        let record = self.etcd.lease_key(egress, key);
        let resp = self
            .etcd
            .run("reading a lease", |mut c| async move {
                c.get(record, None).await
            })
            .await?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some((self.parse(kv)?, kv.mod_revision()))),
            None => Ok(None),
        }
    }

    async fn delete(&self, w: &Write) -> Result<Result<(), Refusal>, StoreError> {
        let (egress, key) = write_key(w);
        for _ in 0..DELETE_ATTEMPTS {
            let found = self.read(egress, &key).await?;
            let existing = found.as_ref().map(|(l, _)| l.clone());
            if let Err(refused) = check(w, |_| existing.clone(), |_| None) {
                return Ok(Err(refused));
            }
            let Some((lease, revision)) = found else {
                return Ok(Err(Refusal::Absent(key)));
            };
            let record = self.etcd.lease_key(egress, &key);
            let index = self.etcd.address_key(egress, &lease.lease.address);
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    record.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then(vec![
                    TxnOp::delete(record, None),
                    TxnOp::delete(self.etcd.endpoint_key(egress, &key), None),
                    // The index entry goes only if it is this lease's.
                    TxnOp::txn(
                        Txn::new()
                            .when(vec![Compare::value(
                                index.clone(),
                                CompareOp::Equal,
                                key.to_hex(),
                            )])
                            .and_then(vec![TxnOp::delete(index, None)]),
                    ),
                ]);
            let resp = self
                .etcd
                .run("deleting a lease", |mut c| async move { c.txn(txn).await })
                .await?;
            if resp.succeeded() {
                return Ok(Ok(()));
            }
        }
        Err(StoreError::unavailable(
            self.etcd.name(),
            format!("the lease of {key} in {egress} kept changing while it was being deleted"),
        ))
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `--prefix`).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl LeaseStore for EtcdStore {
    fn name(&self) -> String {
        self.etcd.name()
    }

    fn apply(&self, writes: &[Write]) -> Result<Applied, StoreError> {
        futures::executor::block_on(self.apply_async(writes))
    }

    fn load(&self) -> Result<Vec<StoredLease>, StoreError> {
        futures::executor::block_on(self.load_at()).map(|(leases, _)| leases)
    }
}
