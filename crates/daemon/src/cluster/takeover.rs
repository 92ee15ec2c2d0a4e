//! Taking an egress over without making containers wait.
//!
//! A new leader has every peer already (hot standby), the same identity and, once its
//! addresses are announced, the containers' packets. What it lacks is a session: the
//! containers' keys were agreed with the old leader, so their packets are dropped until
//! they handshake again, which WireGuard does by itself only after its timers run out
//! (15 s and more). So the leader keeps each peer's last seen endpoint in etcd
//! ([`Takeover::publish_endpoints`]), and the next leader sets those endpoints and turns
//! each peer's persistent keepalive on for a moment: both backends send a keepalive at
//! once when it is turned on, and with no session that keepalive starts a handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{GetOptions, Txn, TxnOp};

use super::conntrack_sync::ConntrackSync;
use super::election::{Group, Leading};
use super::etcd::Etcd;
use super::floating::Floating;
use super::ClusterError;
use crate::config::EgressConfig;
use crate::dataplane::{devices, Dataplane, HostDataplane, Peer};
use crate::leases::service::LeaseService;
use wgexit::keys::Key;
use wgexit::wg::{PeerConfig, WireGuard};

/// How often the leader looks for changed endpoints.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Endpoints written per transaction (etcd allows 128 operations).
const PUTS_PER_TXN: usize = 100;
/// How long woken peers keep their keepalive before it is turned off again.
const WAKE_FOR: Duration = Duration::from_secs(5);

pub struct Takeover {
    pub etcd: Arc<Etcd>,
    pub service: Arc<LeaseService<HostDataplane>>,
    pub floating: Floating,
    pub conntrack: Arc<ConntrackSync>,
}

impl Takeover {
    /// Takes the group's addresses, then starts a handshake with every peer whose endpoint
    /// is known.
    pub async fn acquire(&self, group: &Group) -> Result<(), ClusterError> {
        self.restore_connections(group).await;
        self.floating.acquire(group).await?;
        for e in &group.egresses {
            match self.wake_peers(e).await {
                Ok(n) => {
                    tracing::info!(egress = %e.name, peers = n, "took the egress over; handshakes started")
                }
                Err(err) => {
                    tracing::warn!(egress = %e.name, error = %err, "took the egress over but cannot start handshakes; peers come back on their own timers")
                }
            }
        }
        Ok(())
    }

    /// Loads the old leader's connection state before the addresses (and so the servers'
    /// packets) arrive here.
    async fn restore_connections(&self, group: &Group) {
        for e in &group.egresses {
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
        self.floating.release(group).await
    }

    async fn endpoints(&self, egress: &str) -> Result<HashMap<Key, SocketAddr>, ClusterError> {
        let prefix = self.etcd.endpoints_prefix(egress);
        let p = prefix.clone();
        let resp = self
            .etcd
            .run("reading peers' endpoints", |mut c| async move {
                c.get(p, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = Key::from_hex(kv.key_str().ok()?.strip_prefix(&prefix)?).ok()?;
                Some((key, kv.value_str().ok()?.parse().ok()?))
            })
            .collect())
    }

    /// Sets each leased peer's endpoint and turns its keepalive on (which starts a
    /// handshake), and off again a little later. Returns how many peers were woken.
    async fn wake_peers(&self, e: &EgressConfig) -> Result<usize, ClusterError> {
        let endpoints = self.endpoints(&e.name).await?;
        let leases = self.service.leases_of(&e.name).await;
        let backend = self.service.dataplane().backend();
        let mut woken = Vec::new();
        for l in leases {
            let Some(endpoint) = endpoints.get(&l.public_key) else {
                continue;
            };
            // The lease's own peer entry (its IPv4 and IPv6), at its endpoint, keepalive on.
            let peer = PeerConfig {
                endpoint: Some(*endpoint),
                persistent_keepalive: Some(1),
                ..devices::peer_config(&devices::peer_of(&l))
            };
            match backend.set_peer(&e.wg_interface, &peer).await {
                Ok(()) => woken.push((l, *endpoint)),
                Err(err) => {
                    tracing::debug!(public_key = %l.public_key, error = %err, "cannot wake a peer")
                }
            }
        }
        let n = woken.len();
        let service = self.service.clone();
        let e = e.clone();
        tokio::spawn(async move {
            tokio::time::sleep(WAKE_FOR).await;
            for (l, endpoint) in woken {
                // Back to the lease's own peer entry: keepalive off, endpoint kept.
                let peer = Peer {
                    public_key: l.public_key,
                    address: l.address,
                    address6: l.address6,
                    endpoint: Some(endpoint),
                };
                let _ = service.dataplane().add_peer(&e, &peer).await;
            }
        });
        Ok(n)
    }

    /// While this member leads an egress, writes its peers' endpoints to etcd when they
    /// change (at most every [`PUBLISH_EVERY`]), for the next leader.
    pub async fn publish_endpoints(self: Arc<Self>, leading: Leading) {
        let mut published: HashMap<(String, Key), SocketAddr> = HashMap::new();
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for e in &self.service.config.egress {
                if !leading.leads(&e.name) {
                    continue;
                }
                if let Err(err) = self.publish_egress(e, &mut published).await {
                    tracing::debug!(egress = %e.name, error = %err, "cannot publish endpoints");
                }
            }
        }
    }

    async fn publish_egress(
        &self,
        e: &EgressConfig,
        published: &mut HashMap<(String, Key), SocketAddr>,
    ) -> Result<(), ClusterError> {
        let Some(device) = self.service.dataplane().device(e).await? else {
            return Ok(());
        };
        let changed: Vec<(Key, SocketAddr)> = device
            .peers
            .iter()
            .filter_map(|p| Some((p.public_key, p.endpoint?)))
            .filter(|(k, ep)| published.get(&(e.name.clone(), *k)) != Some(ep))
            .collect();
        for chunk in changed.chunks(PUTS_PER_TXN) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, ep)| TxnOp::put(self.etcd.endpoint_key(&e.name, k), ep.to_string(), None))
                .collect();
            let txn = Txn::new().and_then(ops);
            self.etcd
                .run(
                    "publishing endpoints",
                    |mut c| async move { c.txn(txn).await },
                )
                .await?;
            for (k, ep) in chunk {
                published.insert((e.name.clone(), *k), *ep);
            }
        }
        Ok(())
    }
}
