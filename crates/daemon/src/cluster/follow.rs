//! Hot standby: every member watches the pool's leases in etcd and programs each one
//! made or released by any member on its own devices, so whichever member leads an egress
//! next already has every peer.
//!
//! The watch starts from the revision the leases were read at, so nothing is missed. When
//! it breaks (etcd unreachable, quorum lost, history compacted) the member catches up from
//! a fresh read ([`LeaseService::resync`]) and watches again from there.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};

use super::epoch;
use super::etcd::{parse_lease_key, Etcd};
use crate::cluster::lease_store::{parse_record, EtcdStore};
use crate::dataplane::SpacesDataplane;
use crate::leases::service::LeaseService;

/// Pause between attempts to catch up while etcd cannot be read.
const RETRY: Duration = Duration::from_millis(500);

/// Follows the store's leases from `revision` on, for as long as the daemon runs, while
/// the store holds the pool's identity `epoch`.
pub async fn follow<D: SpacesDataplane>(
    etcd: Arc<Etcd>,
    store: Arc<EtcdStore>,
    service: Arc<LeaseService<D>>,
    mut revision: i64,
    epoch: String,
) {
    loop {
        match watch(&etcd, &service, revision, &epoch).await {
            Ok(()) => tracing::warn!("the lease watch ended; catching up with etcd"),
            Err(e) => tracing::warn!(error = %e, "the lease watch broke; catching up with etcd"),
        }
        revision = catch_up(&etcd, &store, &service, &epoch).await;
    }
}

/// Makes this member's leases the store's again, once the store can be read and holds the
/// pool's identity (a store that lost it is not mirrored: that would remove every peer);
/// returns the revision to watch from.
async fn catch_up<D: SpacesDataplane>(
    etcd: &Etcd,
    store: &EtcdStore,
    service: &LeaseService<D>,
    epoch: &str,
) -> i64 {
    let mut logged = false;
    let mut lost = false;
    let revision = loop {
        match epoch::stored(etcd).await {
            Ok(stored) => match epoch::problem(etcd, epoch, stored.as_deref()) {
                Some(problem) => {
                    if !lost {
                        tracing::error!(%problem, "not following the pool's store");
                        lost = true;
                    }
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                None if lost => {
                    tracing::info!("the pool's identity is in etcd again; catching up");
                    lost = false;
                }
                None => {}
            },
            Err(e) => {
                if !logged {
                    tracing::error!(error = %e, "cannot catch up with etcd; forwarding goes on, new leases wait for it");
                    logged = true;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        }
        match service.resync(|| store.load_at()).await {
            Ok(r) => break r + 1,
            Err(e) => {
                if !logged {
                    tracing::error!(error = %e, "cannot catch up with etcd; forwarding goes on, new leases wait for it");
                    logged = true;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    if logged {
        tracing::info!("caught up with etcd again");
    }
    revision
}

/// Why a change to the pool's identity stops the watch, if `events` hold one.
fn identity_change(etcd: &Etcd, epoch: &str, events: &[etcd_client::Event]) -> Option<String> {
    let key = etcd.epoch_key();
    events
        .iter()
        .filter_map(|e| Some((e.event_type(), e.kv()?)))
        .filter(|(_, kv)| kv.key() == key.as_bytes())
        .find_map(|(kind, kv)| {
            let now = match kind {
                EventType::Delete => None,
                EventType::Put => etcd
                    .verified(kv.key(), kv.value())
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
            };
            epoch::problem(etcd, epoch, now.as_deref())
        })
}

/// Applies every lease change from `revision` on until the watch breaks. The watch covers
/// the whole pool, so a change to its identity is seen in the same response as the
/// deletions that come with it, and none of them is applied.
async fn watch<D: SpacesDataplane>(
    etcd: &Etcd,
    service: &LeaseService<D>,
    revision: i64,
    epoch: &str,
) -> Result<(), String> {
    let prefix = etcd.leases_prefix();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision);
    let key = etcd.key("");
    let mut stream = etcd
        .run("watching the leases", |mut c| async move {
            c.watch(key, Some(options)).await
        })
        .await
        .map_err(|e| e.to_string())?;
    while let Some(resp) = stream.message().await.map_err(|e| e.to_string())? {
        if resp.canceled() {
            return Err(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            ));
        }
        if let Some(problem) = identity_change(etcd, epoch, resp.events()) {
            return Err(problem);
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let rest = String::from_utf8_lossy(kv.key());
            let Some((egress, key)) = rest.strip_prefix(&prefix).and_then(parse_lease_key) else {
                continue;
            };
            let applied = match event.event_type() {
                // A record no member wrote is logged and never programmed.
                EventType::Put => match parse_record(etcd, kv.key(), kv.value()) {
                    Some(stored) => service.adopt_remote(stored).await,
                    None => Ok(()),
                },
                EventType::Delete => service.drop_remote(&egress, &key).await,
            };
            if let Err(e) = applied {
                // The device is repaired by the next reconcile, which reads the registry.
                tracing::error!(%egress, public_key = %key, error = %e, "cannot program a lease made by another member");
            }
        }
    }
    Ok(())
}
