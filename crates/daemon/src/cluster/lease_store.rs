//! The lease store of a pool: etcd, shared by every member.
//!
//! Each lease is two keys (see [`super::etcd`]): its record under
//! `leases/<egress>/<key>` and its address's index entry under `addresses/<egress>/<ip>`.
//! A create is one transaction that writes both only if neither exists yet
//! (`create_revision == 0`), so two members leasing at once can never hand one address, or
//! one public key, out twice. A delete reads the record, checks its owner, and deletes it
//! only if it is still the record it read (`mod_revision` unchanged). Consecutive creates of
//! a batch go in one transaction when none conflicts, one at a time when one does.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::etcd::Etcd;
use crate::leases::store::{check, Applied, LeaseStore, Refusal, StoreError, StoredLease, Write};
use wgexit::keys::Key;

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
    let (egress, key) = w.lease_id();
    (egress, *key)
}

impl EtcdStore {
    pub fn new(etcd: Arc<Etcd>) -> EtcdStore {
        EtcdStore { etcd }
    }

    /// The lease of a record, or `None` (logged) when it was not written by a member of
    /// this pool or cannot be read: such a record is never served nor programmed.
    fn parse(&self, kv: &KeyValue) -> Option<StoredLease> {
        parse_record(&self.etcd, kv.key(), kv.value())
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
            out.extend(resp.kvs().iter().filter_map(|kv| self.parse(kv)));
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
            let creates = distinct_creates(&writes[i..]);
            if creates.len() > 1 && self.create_all_retrying(&creates).await? {
                out.extend(creates.iter().map(|_| Ok(())));
                i += creates.len();
                continue;
            }
            out.push(self.apply_one_retrying(&writes[i]).await?);
            i += 1;
        }
        Ok(out)
    }

    /// [`EtcdStore::apply_one`], again when the etcd member the call went to refused the
    /// connection (one member down: the client has not noticed yet, and the request was
    /// never sent, so sending it again is safe).
    async fn apply_one_retrying(&self, w: &Write) -> Result<Result<(), Refusal>, StoreError> {
        let mut attempt = 0;
        loop {
            match self.apply_one(w).await {
                Err(e) if never_sent(&e) && attempt < RESENDS => attempt += 1,
                other => return other,
            }
        }
    }

    async fn create_all_retrying(&self, creates: &[&StoredLease]) -> Result<bool, StoreError> {
        let mut attempt = 0;
        loop {
            match self.create_all(creates).await {
                Err(e) if never_sent(&e) && attempt < RESENDS => attempt += 1,
                other => return other,
            }
        }
    }

    async fn apply_one(&self, w: &Write) -> Result<Result<(), Refusal>, StoreError> {
        match w {
            Write::Create(l) => self.create(l).await,
            // A pool keeps endpoints apart from the leases (see `cluster::takeover`), so that
            // a peer roaming does not rewrite its lease on every member: `Seen` only checks.
            Write::Keep { .. } | Write::Seen { .. } => {
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
        let value = self.etcd.signed(&record, value);
        let holder = self.etcd.signed(&index, l.lease.public_key.to_hex());
        Ok((
            vec![
                Compare::create_revision(record.clone(), CompareOp::Equal, 0),
                Compare::create_revision(index.clone(), CompareOp::Equal, 0),
            ],
            vec![
                TxnOp::put(record, value, None),
                TxnOp::put(index, holder, None),
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
        let existing = found(0).and_then(|kv| self.parse(&kv));
        let holder = found(1).and_then(|kv| {
            let hex = self.etcd.verified(kv.key(), kv.value())?;
            Key::from_hex(std::str::from_utf8(hex).ok()?).ok()
        });
        // The write lost to one made meanwhile; say which way.
        Ok(
            match check(&Write::Create(l.clone()), |_| existing.clone(), |_| holder) {
                Ok(()) => Err(Refusal::KeyLeased {
                    key: l.lease.public_key,
                    held: None,
                }),
                refused => refused,
            },
        )
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
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| Some((self.parse(kv)?, kv.mod_revision()))))
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
            let ours = self.etcd.signed(&index, key.to_hex());
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
                            .when(vec![Compare::value(index.clone(), CompareOp::Equal, ours)])
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

/// The lease a record at etcd key `key` holds, if a member of the pool wrote it; a record
/// that fails its check or cannot be read is logged and `None`.
pub fn parse_record(etcd: &Etcd, key: &[u8], value: &[u8]) -> Option<StoredLease> {
    let json = etcd.verified(key, value)?;
    match serde_json::from_slice(json) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "unreadable lease record in etcd; ignored");
            None
        }
    }
}

/// Times a call is sent again after an etcd member refused the connection.
const RESENDS: usize = 3;

/// Whether the call failed before reaching any etcd member (the connection was refused),
/// so sending it again cannot apply it twice.
fn never_sent(e: &StoreError) -> bool {
    e.unavailable && e.detail.contains("tcp connect error")
}

/// The creates at the start of `writes` that can share one transaction: at most
/// [`CREATES_PER_TXN`], no key or address twice (etcd refuses a transaction that names one
/// key twice).
fn distinct_creates(writes: &[Write]) -> Vec<&StoredLease> {
    let mut seen = std::collections::HashSet::new();
    writes
        .iter()
        .take(CREATES_PER_TXN)
        .map_while(|w| match w {
            Write::Create(l) => {
                let key = (l.lease.egress.as_str(), l.lease.public_key);
                let address = (l.lease.egress.as_str(), l.lease.address);
                (seen.insert(Ok(key)) && seen.insert(Err(address))).then_some(l)
            }
            _ => None,
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::cluster::test_etcd::TestEtcd;

    fn lease_at(egress: &str, key: u8, host: u8, owner: &str) -> StoredLease {
        crate::leases::store::test_lease(egress, key, host, owner)
    }

    fn delete(egress: &str, n: u8, owner: Option<&str>) -> Write {
        Write::Delete {
            egress: egress.into(),
            public_key: Key([n; 32]),
            owner: owner.map(String::from),
        }
    }

    fn store(etcd: &TestEtcd, name: &str) -> EtcdStore {
        let c = etcd.cluster(name, "a");
        EtcdStore::new(Arc::new(Etcd::connect(&c).unwrap()))
    }

    fn sorted(mut v: Vec<StoredLease>) -> Vec<StoredLease> {
        v.sort_by(|x, y| {
            (&x.lease.egress, x.lease.address).cmp(&(&y.lease.egress, y.lease.address))
        });
        v
    }

    #[test]
    fn creates_refuse_a_leased_key_or_address_and_deletes_check_the_owner() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = store(&etcd, "t1");
        let got = s
            .apply(&[
                Write::Create(lease_at("a", 1, 5, "o")),
                // Another key, the same address: refused, naming the holder.
                Write::Create(lease_at("a", 2, 5, "o")),
                // The same key, another address: refused.
                Write::Create(lease_at("a", 1, 6, "o")),
                // The same address in another egress is another address.
                Write::Create(lease_at("b", 2, 5, "o")),
                delete("a", 1, Some("mallory")),
                Write::Keep {
                    egress: "a".into(),
                    public_key: Key([1; 32]),
                    owner: "mallory".into(),
                },
                Write::Keep {
                    egress: "a".into(),
                    public_key: Key([1; 32]),
                    owner: "o".into(),
                },
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
                    held: Some(Box::new(lease_at("a", 1, 5, "o"))),
                }),
                Ok(()),
                Err(Refusal::NotOwner(Key([1; 32]))),
                Err(Refusal::NotOwner(Key([1; 32]))),
                Ok(()),
            ]
        );
        // A deleted lease frees its address; deleting again finds nothing.
        let got = s
            .apply(&[
                delete("a", 1, Some("o")),
                delete("a", 1, None),
                Write::Create(lease_at("a", 3, 5, "o")),
            ])
            .unwrap();
        assert_eq!(
            got,
            vec![Ok(()), Err(Refusal::Absent(Key([1; 32]))), Ok(())]
        );
        // Another member (another connection) sees the same leases.
        let other = store(&etcd, "t1");
        assert_eq!(
            sorted(other.load().unwrap()),
            vec![lease_at("a", 3, 5, "o"), lease_at("b", 2, 5, "o")]
        );
        // Other pools are other key spaces.
        assert!(store(&etcd, "t2").load().unwrap().is_empty());
    }

    #[test]
    fn batched_creates_fall_back_to_one_at_a_time_on_a_conflict() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = store(&etcd, "t");
        let first: Vec<Write> = (2..40)
            .map(|n| Write::Create(lease_at("a", n, n, "o")))
            .collect();
        assert!(s.apply(&first).unwrap().iter().all(Result::is_ok));
        // A batch in which one create conflicts: the others still go in.
        let mut second: Vec<Write> = (40..80)
            .map(|n| Write::Create(lease_at("a", n, n, "o")))
            .collect();
        second[10] = Write::Create(lease_at("a", 200, 3, "o"));
        let got = s.apply(&second).unwrap();
        assert_eq!(got.iter().filter(|r| r.is_err()).count(), 1);
        assert!(matches!(got[10], Err(Refusal::AddressLeased { .. })));
        assert_eq!(s.load().unwrap().len(), 38 + 39);
    }

    #[test]
    fn two_members_creating_at_once_never_share_an_address() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let (a, b) = (store(&etcd, "t"), store(&etcd, "t"));
        // Both try every address of 100.96.0.2-101 with their own keys, racing.
        let results: Vec<Applied> = std::thread::scope(|s| {
            let ha = s.spawn(|| {
                (2..102)
                    .map(|h| a.apply(&[Write::Create(lease_at("a", 1 + h % 100, h, "a"))]))
                    .collect::<Vec<_>>()
            });
            let hb = s.spawn(|| {
                (2..102)
                    .map(|h| b.apply(&[Write::Create(lease_at("a", 101 + h % 100, h, "b"))]))
                    .collect::<Vec<_>>()
            });
            let mut out = ha.join().unwrap();
            out.extend(hb.join().unwrap());
            out.into_iter().map(Result::unwrap).collect()
        });
        let granted = results.iter().filter(|r| r[0].is_ok()).count();
        assert_eq!(granted, 100, "each address exactly once");
        let stored = a.load().unwrap();
        let mut addresses: Vec<_> = stored.iter().map(|l| l.lease.address).collect();
        addresses.sort();
        addresses.dedup();
        assert_eq!((stored.len(), addresses.len()), (100, 100));
    }

    /// A record put by hand (plain JSON, or a member's record copied to another key) is
    /// not a lease: not loaded, and its key can still be leased properly.
    #[test]
    fn records_no_member_signed_are_ignored() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = store(&etcd, "t");
        assert!(s.apply(&[Write::Create(lease_at("a", 1, 5, "o"))]).unwrap()[0].is_ok());
        let real_key = s.etcd.lease_key("a", &Key([1; 32]));
        let forged_key = s.etcd.lease_key("a", &Key([9; 32]));
        let plain_key = s.etcd.lease_key("a", &Key([8; 32]));
        let plain = serde_json::to_vec(&lease_at("a", 8, 8, "o")).unwrap();
        s.etcd
            .block("forging", move |mut c| async move {
                let real = c.get(real_key, None).await?;
                let copied = real.kvs()[0].value().to_vec();
                c.put(forged_key, copied, None).await?;
                c.put(plain_key, plain, None).await
            })
            .unwrap();
        assert_eq!(s.load().unwrap(), vec![lease_at("a", 1, 5, "o")]);
        // The hand-written records hold nothing a member will honour.
        let got = s.apply(&[Write::Create(lease_at("a", 7, 8, "o"))]).unwrap();
        assert_eq!(got, vec![Ok(())]);
    }

    #[test]
    fn an_unreachable_etcd_is_unavailable() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = store(&etcd, "t");
        drop(etcd);
        let e = s
            .apply(&[Write::Create(lease_at("a", 1, 5, "o"))])
            .unwrap_err();
        assert!(e.unavailable, "{e}");
    }
}
