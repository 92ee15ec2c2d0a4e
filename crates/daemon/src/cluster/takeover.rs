//! Taking a space (an egress or a private network) over without making its members wait.
//!
//! A new leader has every peer already (hot standby), the same identity and, once its
//! addresses are announced, the containers' packets. What it lacks is a session: the
//! containers' keys were agreed with the old leader, so their packets are dropped until
//! they handshake again, which WireGuard does by itself only after its timers run out
//! (15 s and more). So the leader keeps each peer's last seen endpoint in etcd
//! ([`Takeover::publish_endpoints`]), and the next leader sets those endpoints and turns
//! each peer's persistent keepalive on for a moment: both backends send a keepalive at
//! once when it is turned on, and with no session that keepalive starts a handshake.
//!
//! That first handshake can be lost (the initiation, or the container's response), and
//! WireGuard sends the next only after `REKEY_TIMEOUT` (5 s). So a peer that has not
//! completed a handshake 100 ms after its wake is woken again as a new peer
//! ([`WireGuard::initiate_again`], which clears WireGuard's wait), then after 200 and 400 ms more
//! ([`REWAKE_AFTER`]): a lost first handshake costs about 100 ms, not 5 s
//! ([`rewake_silent`]).
//!
//! Each peer is changed with the lease registry locked and only while the registry still
//! holds its lease at the same address ([`still_leased`]): a lease released, or its
//! address leased to another key, between the wake and the keepalive going off again must
//! not get its peer back, nor take the address from the new holder.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{Txn, TxnOp};
use tokio::sync::MutexGuard;

use super::conntrack_sync::ConntrackSync;
use super::election::{Group, Leading};
use super::etcd::Etcd;
use super::floating::Floating;
use super::led::Led;
use super::ClusterError;
use crate::dataplane::{devices, Dataplane, HostDataplane, Peer, SpaceDevice};
use crate::leases::registry::Registry;
use crate::leases::service::LeaseService;
use crate::space::Space;
use wgexit::api::Lease;
use wgexit::keys::Key;
use wgexit::wg::{PeerConfig, PeerStatus, WireGuard};

/// How often the leader looks for changed endpoints.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Endpoints written per transaction (etcd allows 128 operations).
const PUTS_PER_TXN: usize = 100;
/// How long woken peers keep their keepalive before it is turned off again.
const WAKE_FOR: Duration = Duration::from_secs(5);
/// How long a woken peer has to complete a handshake before it is woken again, each time:
/// a handshake takes one round trip, so a peer on the same network that is silent after
/// 100 ms has lost it; the waits double so that a far peer (a round trip over 100 ms),
/// whose handshake each wake restarts, completes one within a few. After the last, a
/// silent peer is left to WireGuard's own retries (its container may simply be gone).
const REWAKE_AFTER: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

pub struct Takeover {
    pub etcd: Arc<Etcd>,
    pub service: Arc<LeaseService<HostDataplane>>,
    pub floating: Floating,
    pub conntrack: Arc<ConntrackSync>,
}

impl Takeover {
    /// Takes the group's addresses, then starts a handshake with every peer whose endpoint
    /// is known.
    /// The handshakes start in the background: the leader must stay free to give the group
    /// up the moment its standing says so, even while etcd is slow to answer.
    ///
    /// `may_hold` is asked once more after the connection state is loaded (which can take
    /// a while), right before the addresses are added.
    pub async fn acquire(
        &self,
        group: &Group,
        may_hold: impl Fn() -> bool,
    ) -> Result<(), ClusterError> {
        self.restore_connections(group).await;
        if !may_hold() {
            return Err(ClusterError::Float(
                "this member's pulse went stale while it loaded the connection state".into(),
            ));
        }
        self.floating.acquire(group).await?;
        self.count_leading(group, true);
        tracing::info!(group = %group.name, "addresses added and announced");
        for led in &group.spaces {
            let (etcd, service, led) = (self.etcd.clone(), self.service.clone(), led.clone());
            tokio::spawn(async move {
                match &led {
                    Led::Egress(e) => wake(&etcd, &service, e).await,
                    Led::Network(n) => wake(&etcd, &service, n).await,
                }
            });
        }
        Ok(())
    }

    /// Loads the old leader's connection state (of the group's egresses: a network forwards
    /// without NAT, so its flows need none) before the addresses (and so the servers'
    /// packets) arrive here.
    async fn restore_connections(&self, group: &Group) {
        for e in group.spaces.iter().filter_map(Led::egress) {
            match self.conntrack.restore(e).await {
                Ok(n) => {
                    tracing::info!(egress = %e.name, connections = n, "connection state restored")
                }
                Err(err) => {
                    tracing::warn!(egress = %e.name, error = %err, "cannot restore connection state; open connections may be reset")
                }
            }
        }
    }

    pub async fn release(&self, group: &Group) -> Result<(), ClusterError> {
        self.count_leading(group, false);
        self.floating.release(group).await
    }

    fn count_leading(&self, group: &Group, leads: bool) {
        for led in &group.spaces {
            self.service.metrics.set_leader(&led.space(), leads);
        }
    }
}

async fn endpoints(etcd: &Etcd, space: &Space) -> Result<HashMap<Key, SocketAddr>, ClusterError> {
    let prefix = etcd.endpoints_prefix(&space.store_key());
    let records = etcd
        .verified_range("reading peers' endpoints", &prefix)
        .await?;
    Ok(records
        .into_iter()
        .filter_map(|(key, value)| {
            let key = Key::from_hex(&key).ok()?;
            Some((key, std::str::from_utf8(&value).ok()?.parse().ok()?))
        })
        .collect())
}

/// Wakes the space's peers, and sets them back after [`WAKE_FOR`].
async fn wake<C>(etcd: &Etcd, service: &Arc<LeaseService<HostDataplane>>, cfg: &C)
where
    C: SpaceDevice,
    HostDataplane: Dataplane<C>,
{
    let space = cfg.space();
    let (started, since) = (Instant::now(), SystemTime::now());
    let woken = match wake_peers(etcd, service, cfg).await {
        Ok(woken) => woken,
        Err(err) => {
            tracing::warn!(%space, error = %err, "took the space over but cannot start handshakes; peers come back on their own timers");
            return;
        }
    };
    tracing::info!(%space, peers = woken.len(), "took the space over; handshakes started");
    rewake_silent(service, cfg, &woken, since).await;
    tokio::time::sleep_until((started + WAKE_FOR).into()).await;
    for (l, endpoint) in woken {
        let Some(_locked) = lock_if_leased(service, &space, &l).await else {
            continue;
        };
        // Back to the lease's own peer entry: keepalive off, endpoint kept.
        let peer = Peer {
            endpoint: Some(endpoint),
            ..devices::peer_of(&l)
        };
        let _ = service.dataplane().add_peer(cfg, &peer).await;
    }
}

/// Sets each leased peer's endpoint and turns its keepalive on (which starts a
/// handshake). Returns the peers woken, with their endpoints.
async fn wake_peers<C: SpaceDevice>(
    etcd: &Etcd,
    service: &LeaseService<HostDataplane>,
    cfg: &C,
) -> Result<Vec<(Lease, SocketAddr)>, ClusterError> {
    let space = cfg.space();
    let endpoints = endpoints(etcd, &space).await?;
    let leases = service.space_leases(&space).await;
    let backend = service.dataplane().backend();
    let mut woken = Vec::new();
    for l in leases {
        let Some(endpoint) = endpoints.get(&l.public_key) else {
            continue;
        };
        let Some(_locked) = lock_if_leased(service, &space, &l).await else {
            continue;
        };
        match backend
            .set_peer(cfg.wg_interface(), &woken_peer(&l, *endpoint))
            .await
        {
            Ok(()) => woken.push((l, *endpoint)),
            Err(err) => {
                tracing::debug!(public_key = %l.public_key, error = %err, "cannot wake a peer")
            }
        }
    }
    Ok(woken)
}

/// The lease's own peer entry (its addresses), at `endpoint`, keepalive on.
fn woken_peer(l: &Lease, endpoint: SocketAddr) -> PeerConfig {
    PeerConfig {
        endpoint: Some(endpoint),
        persistent_keepalive: Some(1),
        ..devices::peer_config(&devices::peer_of(l))
    }
}

/// Wakes again, after each wait of [`REWAKE_AFTER`], each of the `woken` peers that has
/// not completed a handshake since `since` (when they were first woken).
async fn rewake_silent<C: SpaceDevice>(
    service: &LeaseService<HostDataplane>,
    cfg: &C,
    woken: &[(Lease, SocketAddr)],
    since: SystemTime,
) {
    let space = cfg.space();
    let backend = service.dataplane().backend();
    let mut silent: Vec<&(Lease, SocketAddr)> = woken.iter().collect();
    for (round, wait) in (1..).zip(REWAKE_AFTER) {
        tokio::time::sleep(wait).await;
        let shaken = match backend.status(cfg.wg_interface()).await {
            Ok(device) => shaken_since(&device.peers, since),
            Err(err) => {
                tracing::debug!(%space, error = %err, "cannot read the device to see which peers answered");
                return;
            }
        };
        silent.retain(|(l, _)| !shaken.contains(&l.public_key));
        if silent.is_empty() {
            return;
        }
        tracing::info!(%space, peers = silent.len(), round, "no handshake yet; waking those peers again");
        for (l, endpoint) in &silent {
            let Some(_locked) = lock_if_leased(service, &space, l).await else {
                continue;
            };
            let peer = woken_peer(l, *endpoint);
            if let Err(err) = backend.initiate_again(cfg.wg_interface(), &peer).await {
                tracing::warn!(%space, public_key = %l.public_key, error = %err, "cannot wake a peer again; the next reconcile puts it back");
            }
        }
    }
}

/// The peers of `peers` whose last handshake was at or after `since`.
fn shaken_since(peers: &[PeerStatus], since: SystemTime) -> HashSet<Key> {
    peers
        .iter()
        .filter(|p| p.last_handshake.is_some_and(|t| t >= since))
        .map(|p| p.public_key)
        .collect()
}

/// Endpoints published for each space's peers.
type Published = HashMap<(Space, Key), SocketAddr>;

impl Takeover {
    /// While this member leads a space, writes its peers' endpoints to etcd when they
    /// change (at most every [`PUBLISH_EVERY`]), for the next leader.
    pub async fn publish_endpoints(self: Arc<Self>, leading: Leading) {
        let mut published = Published::new();
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let spaces = Led::all(&self.service.config);
        loop {
            tick.tick().await;
            for led in &spaces {
                let space = led.space();
                if !leading.leads(&space) {
                    // The next leader publishes its own; ours would be stale by then.
                    published.retain(|(s, _), _| *s != space);
                    continue;
                }
                let done = match led {
                    Led::Egress(e) => self.publish_space(e, &mut published).await,
                    Led::Network(n) => self.publish_space(n, &mut published).await,
                };
                if let Err(err) = done {
                    tracing::debug!(%space, error = %err, "cannot publish endpoints");
                }
            }
        }
    }

    async fn publish_space<C>(&self, cfg: &C, published: &mut Published) -> Result<(), ClusterError>
    where
        C: SpaceDevice,
        HostDataplane: Dataplane<C>,
    {
        let Some(device) = self.service.dataplane().device(cfg).await? else {
            return Ok(());
        };
        let space = cfg.space();
        prune(published, &space, device.peers.iter().map(|p| p.public_key));
        let changed: Vec<(Key, SocketAddr)> = device
            .peers
            .iter()
            .filter_map(|p| Some((p.public_key, p.endpoint?)))
            .filter(|(k, ep)| published.get(&(space.clone(), *k)) != Some(ep))
            .collect();
        let store_key = space.store_key();
        for chunk in changed.chunks(PUTS_PER_TXN) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, ep)| {
                    let key = self.etcd.endpoint_key(&store_key, k);
                    let value = self.etcd.signed(&key, ep.to_string());
                    TxnOp::put(key, value, None)
                })
                .collect();
            let txn = Txn::new().and_then(ops);
            self.etcd
                .run(
                    "publishing endpoints",
                    |mut c| async move { c.txn(txn).await },
                )
                .await?;
            for (k, ep) in chunk {
                published.insert((space.clone(), *k), *ep);
            }
        }
        Ok(())
    }
}

/// The registry, locked, if it still holds `l` as it was ([`still_leased`]): a peer changed
/// while this is held cannot be of a lease released meanwhile.
async fn lock_if_leased<'a>(
    service: &'a LeaseService<HostDataplane>,
    space: &Space,
    l: &Lease,
) -> Option<MutexGuard<'a, Registry>> {
    let registry = service.registry().lock().await;
    still_leased(&registry, space, l).then_some(registry)
}

/// Whether `registry` still holds `l`: the same key in `space`, at the same addresses.
pub fn still_leased(registry: &Registry, space: &Space, l: &Lease) -> bool {
    registry
        .egress(space)
        .ok()
        .and_then(|e| e.get(&l.public_key))
        .is_some_and(|s| s.lease.address == l.address && s.lease.address6 == l.address6)
}

/// Forgets what was published for peers of `space` that are no longer on its device
/// (their leases are gone; so are their endpoints in etcd).
fn prune(published: &mut Published, space: &Space, peers: impl Iterator<Item = Key>) {
    let present: HashSet<Key> = peers.collect();
    published.retain(|(s, k), _| s != space || present.contains(k));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::tests::egress;
    use crate::leases::redb::RedbStore;
    use crate::leases::registry::tests::stored_lease;
    use crate::leases::store::StoredLease;

    fn lease(n: u8, host: u8) -> StoredLease {
        stored_lease(n, host, "o")
    }

    /// A lease released and its address leased to another key (by another member) while
    /// woken peers wait to be set back: the old key is no longer leased, the new one is.
    #[test]
    fn a_released_or_re_leased_address_is_not_the_old_keys() {
        let t = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&t.path().join("l.redb")).unwrap());
        let (mut r, _) =
            Registry::from_leases(&[egress("a", "100.96.0.0/24")], &[], store, Vec::new());
        let (old, new) = (lease(1, 5), lease(2, 5));
        r.adopt(old.clone());
        let (a, b) = (Space::Egress("a".into()), Space::Egress("b".into()));
        assert!(still_leased(&r, &a, &old.lease));
        assert!(!still_leased(&r, &b, &old.lease));
        assert!(!still_leased(&r, &Space::Network("a".into()), &old.lease));
        r.drop_remote(&a, &old.lease.public_key);
        assert!(!still_leased(&r, &a, &old.lease));
        r.adopt(new.clone());
        assert!(!still_leased(&r, &a, &old.lease));
        assert!(still_leased(&r, &a, &new.lease));
        // The same key leased again elsewhere is not the lease that was woken.
        r.adopt(lease(2, 9));
        assert!(!still_leased(&r, &a, &new.lease));
    }

    /// A peer that shook hands before the wake (with this member, when it led before) or
    /// never is still silent; one that shook hands since is not.
    #[test]
    fn only_a_handshake_since_the_wake_counts() {
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let status = |n: u8, last: Option<SystemTime>| PeerStatus {
            public_key: Key([n; 32]),
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake: last,
            rx_bytes: 0,
            tx_bytes: 0,
        };
        let peers = [
            status(1, None),
            status(2, Some(since - Duration::from_millis(1))),
            status(3, Some(since)),
            status(4, Some(since + Duration::from_millis(40))),
        ];
        let shaken = shaken_since(&peers, since);
        assert_eq!(shaken, HashSet::from([Key([3; 32]), Key([4; 32])]));
    }

    #[test]
    fn published_endpoints_of_gone_peers_are_forgotten() {
        let ep: SocketAddr = "198.51.100.31:4000".parse().unwrap();
        let (a, b) = (Space::Egress("a".into()), Space::Network("a".into()));
        let mut published = Published::new();
        for n in 1..=3 {
            published.insert((a.clone(), Key([n; 32])), ep);
        }
        published.insert((b.clone(), Key([1; 32])), ep);
        prune(&mut published, &a, [Key([2; 32])].into_iter());
        let mut left: Vec<_> = published.keys().cloned().collect();
        left.sort();
        assert_eq!(left, vec![(a, Key([2; 32])), (b, Key([1; 32]))]);
    }
}
