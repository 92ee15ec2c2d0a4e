//! Peer changes of concurrent requests, applied to the devices together.
//!
//! A lease queues its peer while it holds the registry lock (so changes reach the devices in
//! the order the registry made them), lets the lock go, and waits for its change to be
//! applied. Whoever waits first takes every change queued so far and applies them, the
//! adds to one device in one backend request (one UAPI `set` for `wireguard-go`, one
//! netlink message for the kernel); changes queued meanwhile make the next batch. So 64
//! concurrent leases cost a few device updates, not 64, and no request holds the registry
//! lock across one. A batch the device refuses is applied again change by change, so each
//! request learns its own outcome.

use std::future::Future;

use tokio::sync::{oneshot, Mutex};

use wgexit::keys::Key;
use wgexit::wg::{PeerConfig, WgError, WireGuard};

/// One queued change to device `device`.
#[derive(Debug, Clone)]
pub enum PeerChange {
    Set { device: String, peer: PeerConfig },
    Remove { device: String, key: Key },
}

impl PeerChange {
    fn device(&self) -> &str {
        match self {
            PeerChange::Set { device, .. } | PeerChange::Remove { device, .. } => device,
        }
    }
}

type Waiter = oneshot::Sender<Result<(), WgError>>;

/// The queue of peer changes not yet applied.
#[derive(Default)]
pub struct PeerQueue {
    pending: std::sync::Mutex<Vec<(PeerChange, Waiter)>>,
    /// Held by whoever applies a batch: one batch at a time, in queue order.
    applying: Mutex<()>,
}

impl PeerQueue {
    /// Queues `change` now, behind every change queued before it; the returned future
    /// applies it (with whatever else is queued by then) through `wg`, or waits for the
    /// request already applying it.
    pub fn submit<'a, W: WireGuard>(
        &'a self,
        wg: &'a W,
        change: PeerChange,
    ) -> impl Future<Output = Result<(), WgError>> + 'a {
        let mut rx = self.push(change.clone());
        async move {
            loop {
                let _turn = self.applying.lock().await;
                match rx.try_recv() {
                    Ok(outcome) => return outcome,
                    // The request applying it went away mid-batch (its client hung up):
                    // queue it again; every change is idempotent.
                    Err(oneshot::error::TryRecvError::Closed) => rx = self.push(change.clone()),
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
                let batch =
                    std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
                apply_batch(wg, batch).await;
            }
        }
    }

    fn push(&self, change: PeerChange) -> oneshot::Receiver<Result<(), WgError>> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((change, tx));
        rx
    }
}

/// Applies `batch` in order: each run of adds to one device in one request.
async fn apply_batch<W: WireGuard>(wg: &W, batch: Vec<(PeerChange, Waiter)>) {
    let mut rest = batch.into_iter().peekable();
    while let Some((first, waiter)) = rest.next() {
        match first {
            PeerChange::Remove { device, key } => {
                let _ = waiter.send(wg.remove_peer(&device, &key).await);
            }
            PeerChange::Set { device, peer } => {
                let mut peers = vec![peer];
                let mut waiters = vec![waiter];
                while let Some((next, _)) = rest.peek() {
                    let PeerChange::Set { peer, .. } = next else {
                        break;
                    };
                    if next.device() != device {
                        break;
                    }
                    peers.push(peer.clone());
                    if let Some((_, w)) = rest.next() {
                        waiters.push(w);
                    }
                }
                set_together(wg, &device, &peers, waiters).await;
            }
        }
    }
}

/// Sets `peers` on `device` in one request; if it fails, one by one, so each waiter
/// learns whether its own peer is there.
async fn set_together<W: WireGuard>(
    wg: &W,
    device: &str,
    peers: &[PeerConfig],
    waiters: Vec<Waiter>,
) {
    if peers.len() > 1 && wg.set_peers(device, peers).await.is_ok() {
        for waiter in waiters {
            let _ = waiter.send(Ok(()));
        }
        return;
    }
    for (peer, waiter) in peers.iter().zip(waiters) {
        let _ = waiter.send(wg.set_peer(device, peer).await);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use wgexit::wg::{DeviceConfig, DeviceStatus};

    /// Records the requests a device receives; refuses any set that holds `bad`.
    #[derive(Default)]
    struct Recorder {
        requests: StdMutex<Vec<String>>,
        bad: Option<Key>,
    }

    impl WireGuard for Recorder {
        async fn create(&self, _: &str) -> Result<(), WgError> {
            Ok(())
        }
        async fn configure(&self, _: &str, _: &DeviceConfig) -> Result<(), WgError> {
            Ok(())
        }
        async fn set_peers(&self, name: &str, peers: &[PeerConfig]) -> Result<(), WgError> {
            let keys: Vec<String> = peers
                .iter()
                .map(|p| p.public_key.to_hex()[..4].to_string())
                .collect();
            self.requests
                .lock()
                .unwrap()
                .push(format!("{name} set {}", keys.join(",")));
            if peers.iter().any(|p| Some(p.public_key) == self.bad) {
                return Err(WgError::Uapi {
                    name: name.into(),
                    detail: "errno=22".into(),
                });
            }
            Ok(())
        }
        async fn remove_peer(&self, name: &str, key: &Key) -> Result<(), WgError> {
            self.requests
                .lock()
                .unwrap()
                .push(format!("{name} remove {}", &key.to_hex()[..4]));
            Ok(())
        }
        async fn status(&self, name: &str) -> Result<DeviceStatus, WgError> {
            Err(WgError::NoSuchDevice(name.into()))
        }
        async fn exists(&self, _: &str) -> bool {
            true
        }
        async fn delete(&self, _: &str) -> Result<(), WgError> {
            Ok(())
        }
    }

    fn key(b: u8) -> Key {
        Key::from_hex(&format!("{b:02x}").repeat(32)).unwrap()
    }

    fn set(device: &str, b: u8) -> PeerChange {
        PeerChange::Set {
            device: device.into(),
            peer: PeerConfig {
                public_key: key(b),
                endpoint: None,
                allowed_ips: vec!["100.96.0.2/32".parse().unwrap()],
                persistent_keepalive: None,
            },
        }
    }

    #[tokio::test]
    async fn queued_changes_go_together_in_order() {
        let wg = Recorder::default();
        let q = PeerQueue::default();
        let a = q.submit(&wg, set("wg0", 0x11));
        let b = q.submit(&wg, set("wg0", 0x22));
        let c = q.submit(
            &wg,
            PeerChange::Remove {
                device: "wg0".into(),
                key: key(0x33),
            },
        );
        let d = q.submit(&wg, set("wg1", 0x44));
        let e = q.submit(&wg, set("wg1", 0x55));
        // The last waiter applies everything; the others find their outcome ready.
        e.await.unwrap();
        for f in [a, b, c, d] {
            f.await.unwrap();
        }
        assert_eq!(
            *wg.requests.lock().unwrap(),
            vec!["wg0 set 1111,2222", "wg0 remove 3333", "wg1 set 4444,5555"]
        );
        // A change queued later makes a batch of its own.
        q.submit(&wg, set("wg0", 0x66)).await.unwrap();
        assert_eq!(wg.requests.lock().unwrap().last().unwrap(), "wg0 set 6666");
    }

    #[tokio::test]
    async fn a_refused_batch_tells_each_change_its_own_outcome() {
        let wg = Recorder {
            bad: Some(key(0x22)),
            ..Default::default()
        };
        let q = PeerQueue::default();
        let a = q.submit(&wg, set("wg0", 0x11));
        let b = q.submit(&wg, set("wg0", 0x22));
        let c = q.submit(&wg, set("wg0", 0x33));
        a.await.unwrap();
        assert!(b.await.is_err());
        c.await.unwrap();
        assert_eq!(
            *wg.requests.lock().unwrap(),
            vec![
                "wg0 set 1111,2222,3333",
                "wg0 set 1111",
                "wg0 set 2222",
                "wg0 set 3333"
            ]
        );
    }
}
