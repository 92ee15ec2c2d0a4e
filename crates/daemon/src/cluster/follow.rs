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

use super::etcd::{parse_lease_key, Etcd};
use crate::dataplane::Dataplane;
use crate::leases::etcd::{parse_record, EtcdStore};
use crate::leases::service::LeaseService;

/// Pause between attempts to catch up while etcd cannot be read.
const RETRY: Duration = Duration::from_millis(500);

/// Follows the store's leases from `revision` on, for as long as the daemon runs.
pub async fn follow<D: Dataplane>(
    etcd: Arc<Etcd>,
    store: Arc<EtcdStore>,
    service: Arc<LeaseService<D>>,
    mut revision: i64,
) {
    loop {
        match watch(&etcd, &service, revision).await {
            Ok(()) => tracing::warn!("the lease watch ended; catching up with etcd"),
            Err(e) => tracing::warn!(error = %e, "the lease watch broke; catching up with etcd"),
        }
        let mut logged = false;
        revision = loop {
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
    }
}

/// Applies every lease change from `revision` on until the watch breaks.
async fn watch<D: Dataplane>(
    etcd: &Etcd,
    service: &LeaseService<D>,
    revision: i64,
) -> Result<(), String> {
    let prefix = etcd.leases_prefix();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision);
    let key = prefix.clone();
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
