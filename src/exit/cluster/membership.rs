//! This member's life in etcd: one etcd lease of `leader_ttl`, renewed every third of it,
//! to which its member record and every leader key it holds are bound.
//!
//! What the renewals say is published as a [`Standing`]. Leadership is safe while etcd
//! cannot have let the lease expire yet: renewed at `sent`, it lasts at least until
//! `sent + leader_ttl` for everyone, so holding an egress until `sent + 4/5 leader_ttl`
//! ([`Standing::Renewed::safe_until`]) leaves a margin before any other member could take
//! it. When renewals fail, the etcd members that can be reached are asked whether they
//! have a raft leader: if every one that answers has none, the cluster has lost its quorum
//! and nobody can expire the lease or take the egress ([`Standing::NoQuorum`]), so the
//! leader keeps its addresses and forwarding goes on; when quorum comes back, etcd's new
//! leader extends every lease by its TTL, and renewals resume. Anything else (no etcd member
//! answers, or one that has a leader) means a quorum may exist without us: the addresses go.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::etcd::Etcd;

/// How often etcd is asked about its quorum while renewals fail.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Not (yet) holding a valid etcd lease.
    Lost,
    /// Renewed: no other member can take this member's egresses before `safe_until`.
    Renewed { lease: i64, safe_until: Instant },
    /// Renewals fail and etcd has no quorum: nobody can take this member's egresses.
    NoQuorum { lease: i64 },
}

impl Standing {
    /// The etcd lease this member may act on now, if any.
    pub fn valid_lease(&self, now: Instant) -> Option<i64> {
        match *self {
            Standing::Renewed { lease, safe_until } if now < safe_until => Some(lease),
            Standing::NoQuorum { lease } => Some(lease),
            _ => None,
        }
    }
}

/// A member's record in etcd (`members/<node>`), for `wgexitd status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub node: String,
    pub api: String,
}

/// The renewal loop's settings.
pub struct Membership {
    pub etcd: Arc<Etcd>,
    pub ttl: Duration,
    pub record: MemberRecord,
}

/// What the etcd members that answer say about their raft leader.
async fn quorum_lost(endpoints: &[String], within: Duration) -> bool {
    let mut answered = 0;
    for ep in endpoints {
        let options = ConnectOptions::new().with_connect_timeout(within);
        let status = tokio::time::timeout(within, async {
            let mut c = Client::connect([ep.as_str()], Some(options)).await?;
            c.status().await
        })
        .await;
        match status {
            Ok(Ok(s)) if s.leader() == 0 => answered += 1,
            // A member with a leader: a quorum exists, perhaps without us.
            Ok(Ok(_)) => return false,
            _ => {}
        }
    }
    answered > 0
}

impl Membership {
    /// Renews (or first grants) the lease for as long as the daemon runs, publishing the
    /// standing on `tx`.
    pub async fn run(self, tx: watch::Sender<Standing>) {
        let period = self.ttl / 3;
        let margin = self.ttl / 5;
        let mut lease: Option<i64> = None;
        loop {
            let sent = Instant::now();
            let renewed = match lease {
                None => self.grant().await,
                Some(id) => self.renew(id).await,
            };
            let standing = match renewed {
                Ok(id) => {
                    lease = Some(id);
                    Standing::Renewed {
                        lease: id,
                        safe_until: sent + self.ttl - margin,
                    }
                }
                Err(Renewal::Expired) => {
                    lease = None;
                    Standing::Lost
                }
                Err(Renewal::Failed) => {
                    let now = *tx.borrow();
                    self.after_failure(lease, now, period).await
                }
            };
            let before = *tx.borrow();
            if before != standing {
                log_change(before, standing);
                let _ = tx.send(standing);
            }
            tokio::time::sleep_until(sent + period).await;
        }
    }

    /// The standing when a renewal failed: `NoQuorum` as soon as etcd says so (an etcd
    /// member notices a lost quorum only after its election timeout, so it is asked again
    /// until the next renewal is due), else unchanged while still safe, else `Lost`.
    async fn after_failure(&self, lease: Option<i64>, now: Standing, period: Duration) -> Standing {
        let Some(id) = lease else {
            return Standing::Lost;
        };
        let until = Instant::now() + period;
        loop {
            if quorum_lost(self.etcd.endpoints(), period / 3).await {
                return Standing::NoQuorum { lease: id };
            }
            if Instant::now() + PROBE_INTERVAL >= until {
                break;
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        match now {
            Standing::Renewed { .. } => now,
            _ => Standing::Lost,
        }
    }

    async fn grant(&self) -> Result<i64, Renewal> {
        let ttl = self.ttl.as_secs().max(1) as i64;
        let record = serde_json::to_vec(&self.record).map_err(|_| Renewal::Failed)?;
        let key = self.etcd.member_key(&self.record.node);
        let within = self.ttl / 3;
        self.etcd
            .run_for("joining the pool", within, move |mut c| async move {
                let granted = c.lease_grant(ttl, None).await?;
                let id = granted.id();
                c.put(key, record, Some(PutOptions::new().with_lease(id)))
                    .await?;
                Ok(id)
            })
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "cannot join the pool in etcd");
                Renewal::Failed
            })
    }

    async fn renew(&self, id: i64) -> Result<i64, Renewal> {
        let ttl = self
            .etcd
            .run_for(
                "renewing this member's lease",
                self.ttl / 3,
                move |mut c| async move {
                    let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    Ok(stream.message().await?.map_or(0, |r| r.ttl()))
                },
            )
            .await
            .map_err(|_| Renewal::Failed)?;
        if ttl > 0 {
            Ok(id)
        } else {
            Err(Renewal::Expired)
        }
    }
}

enum Renewal {
    /// etcd says the lease is gone.
    Expired,
    /// No answer.
    Failed,
}

fn log_change(from: Standing, to: Standing) {
    match (from, to) {
        (_, Standing::Renewed { .. }) if !matches!(from, Standing::Renewed { .. }) => {
            tracing::info!("holding a lease in etcd; may lead egresses")
        }
        (_, Standing::NoQuorum { .. }) => tracing::warn!(
            "etcd has lost its quorum: keeping the egresses this member leads (nobody can take them); new leases wait for etcd"
        ),
        (_, Standing::Lost) => {
            tracing::warn!("no valid lease in etcd: this member leads no egress until it has one")
        }
        _ => {}
    }
}
