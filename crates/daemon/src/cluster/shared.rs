//! What a pool's members share from etcd: every egress's and network's WireGuard identity and the API's
//! CA. The first member to start makes each (a transaction that writes it only if it is
//! absent); every other member reads what is there, so all of them answer with the same
//! keys and certificates chaining to the same CA. Both private keys are stored sealed with
//! the pool's secret ([`super::secret`]): etcd's contents alone reveal neither.

use std::collections::HashMap;
use std::path::Path;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::etcd::Etcd;
use super::ClusterError;
use crate::api::tls;
use crate::identity::Identities;
use crate::leases::store::StoreError;
use crate::space::Space;
use wgexit::keys::Key;

/// Seals `plain` at `key` unless something is there; returns what is there afterwards,
/// opened.
async fn create_or_read(etcd: &Etcd, key: String, plain: Vec<u8>) -> Result<Vec<u8>, ClusterError> {
    let sealed = etcd
        .secret()
        .seal(&key, &plain)
        .map_err(|e| ClusterError::Shared(e.to_string()))?;
    let stored = create_or_read_raw(etcd, key.clone(), sealed).await?;
    etcd.secret()
        .open(&key, &stored)
        .map_err(|e| ClusterError::Shared(format!("{key} in etcd is refused: {e}")))
}

/// Writes `value` at `key` unless something is there; returns what is there afterwards.
async fn create_or_read_raw(
    etcd: &Etcd,
    key: String,
    value: Vec<u8>,
) -> Result<Vec<u8>, StoreError> {
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(key.clone(), value.clone(), None)])
        .or_else(vec![TxnOp::get(key, None)]);
    let resp = etcd
        .run(
            "sharing pool state",
            |mut c| async move { c.txn(txn).await },
        )
        .await?;
    if resp.succeeded() {
        return Ok(value);
    }
    match resp.op_responses().first() {
        Some(TxnOpResponse::Get(g)) => Ok(g
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec())
            .unwrap_or(value)),
        _ => Ok(value),
    }
}

/// Every space's key pair, made by the first member that needed it, by the space's name
/// (an egress's and a network's apart: their keys in etcd are `identity/<store name>`).
pub async fn identities(etcd: &Etcd, spaces: &[Space]) -> Result<Identities, ClusterError> {
    let mut private = HashMap::new();
    for space in spaces {
        let fresh = Key::generate_private()
            .map_err(|err| ClusterError::Shared(format!("{space}: cannot make a key: {err}")))?;
        let key = etcd.identity_key(&space.store_key());
        let stored = create_or_read(etcd, key.clone(), fresh.to_base64().into_bytes()).await?;
        let text = String::from_utf8_lossy(&stored);
        let shared = Key::from_base64(text.trim())
            .map_err(|err| ClusterError::Shared(format!("{key} in etcd is not a key: {err}")))?;
        private.insert(space.name().to_string(), shared);
    }
    Ok(Identities::from_private(private))
}

#[derive(Serialize, Deserialize)]
struct SharedCa {
    cert: String,
    key: String,
}

/// The pool's CA, made by the first member, installed under `state_dir/tls` so this
/// member's server certificate is issued by it.
pub async fn ca(etcd: &Etcd, state_dir: &Path) -> Result<(), ClusterError> {
    let (cert, key) = tls::new_ca()?;
    let fresh = serde_json::to_vec(&SharedCa { cert, key })
        .map_err(|e| ClusterError::Shared(e.to_string()))?;
    let stored = create_or_read(etcd, etcd.ca_key(), fresh).await?;
    let ca: SharedCa = serde_json::from_slice(&stored).map_err(|e| {
        ClusterError::Shared(format!("{} in etcd is unreadable: {e}", etcd.ca_key()))
    })?;
    tls::install_ca(state_dir, &ca.cert, &ca.key)?;
    Ok(())
}
