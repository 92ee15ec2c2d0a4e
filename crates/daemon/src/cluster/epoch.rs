//! The pool's identity: an epoch (a random number) created with the pool at `epoch` in
//! etcd, signed, and remembered by every member in `state_dir/pool-epoch`.
//!
//! A store whose epoch is gone (`etcdctl del --prefix`, an etcd restored from a backup older
//! than the pool, another etcd) or is another one has lost the pool: members do not mirror
//! it (which would remove every peer), do not campaign in it, and never mint a new epoch,
//! egress key or CA for a pool they remember; they keep forwarding with what they have and
//! say what the operator must do ([`advice`]).

use std::path::{Path, PathBuf};

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};

use super::etcd::Etcd;
use super::ClusterError;
use crate::leases::store::StoreError;

const FILE: &str = "pool-epoch";

fn file(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The epoch this member remembers for pool `name`, if any.
pub fn remembered(state_dir: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(file(state_dir)).ok()?;
    let (pool, epoch) = text.trim().split_once(' ')?;
    (pool == name).then(|| epoch.to_string())
}

fn remember(state_dir: &Path, name: &str, epoch: &str) -> Result<(), ClusterError> {
    let path = file(state_dir);
    wgexit::fsutil::private_dir(state_dir)
        .and_then(|()| {
            wgexit::fsutil::write_atomic(&path, format!("{name} {epoch}\n").as_bytes(), 0o600)
        })
        .map_err(|e| ClusterError::Shared(format!("cannot write {}: {e}", path.display())))
}

/// The epoch in etcd, if one is there and a member wrote it.
pub async fn stored(etcd: &Etcd) -> Result<Option<String>, StoreError> {
    let key = etcd.epoch_key();
    let resp = etcd
        .run("reading the pool's epoch", |mut c| async move {
            c.get(key, None).await
        })
        .await?;
    Ok(resp.kvs().first().and_then(|kv| {
        let v = etcd.verified(kv.key(), kv.value())?;
        Some(String::from_utf8_lossy(v).into_owned())
    }))
}

/// What is wrong with the store's identity, if anything, for a member remembering
/// `remembered`.
pub fn problem(etcd: &Etcd, remembered: &str, stored: Option<&str>) -> Option<String> {
    let what = match stored {
        Some(s) if s == remembered => return None,
        Some(s) => format!("holds another pool (epoch {s}, this member served epoch {remembered})"),
        None => format!("has lost the pool's identity (epoch {remembered} is gone)"),
    };
    Some(format!(
        "the pool's store in etcd ({}) {what}; {}",
        etcd.key(""),
        advice()
    ))
}

/// What the operator must do about a store that lost the pool.
pub fn advice() -> &'static str {
    "members keep forwarding with the leases they have but do not follow the store, campaign in it or make new keys. Restore etcd from a backup of this pool (etcdctl snapshot restore) and the members catch up by themselves; or, to start the pool anew (every container leases again, clients get a new CA), stop every member, delete state_dir/pool-epoch on each and start them again"
}

/// The epoch this member may serve: the store's when it has one this member does not
/// contradict; a new one when neither the store nor this member knows of any. Refused when
/// the store lost the pool this member remembers.
pub async fn establish(etcd: &Etcd, state_dir: &Path, name: &str) -> Result<String, ClusterError> {
    let remembered = remembered(state_dir, name);
    let stored = stored(etcd).await?;
    let epoch = match (remembered, stored) {
        (Some(r), stored) => {
            if let Some(p) = problem(etcd, &r, stored.as_deref()) {
                return Err(ClusterError::Shared(p));
            }
            r
        }
        (None, Some(s)) => s,
        (None, None) => create(etcd).await?,
    };
    remember(state_dir, name, &epoch)?;
    Ok(epoch)
}

/// Creates the epoch unless one is there; returns the one there afterwards.
async fn create(etcd: &Etcd) -> Result<String, ClusterError> {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| ClusterError::Shared(format!("no randomness: {e}")))?;
    let fresh = hex::encode(raw);
    let key = etcd.epoch_key();
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(
            key.clone(),
            etcd.signed(&key, &fresh),
            None,
        )])
        .or_else(vec![TxnOp::get(key, None)]);
    let resp = etcd
        .run("creating the pool's epoch", |mut c| async move {
            c.txn(txn).await
        })
        .await?;
    if resp.succeeded() {
        tracing::info!(epoch = %fresh, "created the pool's identity in etcd");
        return Ok(fresh);
    }
    let there = match resp.op_responses().first() {
        Some(TxnOpResponse::Get(g)) => g.kvs().first().and_then(|kv| {
            let v = etcd.verified(kv.key(), kv.value())?;
            Some(String::from_utf8_lossy(v).into_owned())
        }),
        _ => None,
    };
    there.ok_or_else(|| {
        ClusterError::Shared(format!(
            "{} in etcd was not written by a member of this pool",
            etcd.epoch_key()
        ))
    })
}

/// The compare that holds while the store is the pool's (for writes that must not happen
/// in a store that lost it, such as a campaign).
pub fn intact(etcd: &Etcd, epoch: &str) -> Compare {
    let key = etcd.epoch_key();
    let value = etcd.signed(&key, epoch);
    Compare::value(key, CompareOp::Equal, value)
}
