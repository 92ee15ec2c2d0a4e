//! This member's life in etcd: one etcd lease of `leader_ttl`, renewed every third of it,
//! to which its member record and every leader key it holds are bound.
//!
//! What the renewals say is published as a [`Standing`]. Leadership is safe while etcd
//! cannot have let the lease expire yet: renewed at `sent`, it lasts at least until
//! `sent + leader_ttl` for everyone, so holding an egress until `sent + 4/5 leader_ttl`
//! ([`Standing::Renewed::safe_until`]) leaves a margin before any other member could take
//! it. Renewals (and grants) go to every etcd member at once ([`Etcd::race`]): one balanced
//! connection may send them to a member that has just died or restarted and does not
//! answer yet, and renewals lost that way, though a quorum was there, let the lease expire.
//!
//! When renewals fail, the etcd members that can be reached are asked whether they have a
//! raft leader: if every one that answers has none, the cluster has lost its quorum and
//! nobody can expire the lease or take the egress ([`Standing::NoQuorum`]), so the leader
//! keeps its addresses and forwarding goes on — but when an etcd member is silent (cut
//! off rather than down: it refuses no connection), only if the lease was still safe when
//! that was seen: a lease that ran out first may have been expired by that member, leading
//! without knowing it lost its quorum, its revocation committed the moment the quorum is
//! back. When a leader is found again, it was elected after the last probe that found
//! none, and a new etcd leader extends every lease by its TTL: the lease is safe until
//! that probe's time plus 4/5 `leader_ttl`, and is renewed again at once. Anything else (no
//! etcd member answers, or one that has a leader) means a quorum may exist without us: the
//! addresses go.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::agreement::SharedSettings;
use super::etcd::Etcd;
use crate::leases::store::StoreError;

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
    /// What this member must share with the pool ([`super::agreement`]), published with
    /// its record.
    pub settings: SharedSettings,
}

/// What the etcd members that answer say about their raft leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quorum {
    /// Every member that answered has no leader (and at least one answered); `silent`:
    /// some member neither answered nor refused the connection (it may be running, cut
    /// off, still believing it leads).
    Lost { silent: bool },
    /// A member has a leader: a quorum exists, perhaps without us.
    Exists,
    /// No member answered.
    Unknown,
}

/// Whether `e` says the connection was refused: the member's host answered, its etcd is
/// not running.
pub(super) fn refused(e: &etcd_client::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = err.source();
    }
    format!("{e:?}").contains("ConnectionRefused")
}

async fn quorum(etcd: &Etcd, within: Duration) -> Quorum {
    let mut answered = 0;
    let mut silent = false;
    for status in etcd.status_each(within).await {
        match status {
            Ok(s) if s.leader() == 0 => answered += 1,
            Ok(_) => return Quorum::Exists,
            Err(Some(e)) if refused(&e) => {}
            Err(_) => silent = true,
        }
    }
    if answered > 0 {
        Quorum::Lost { silent }
    } else {
        Quorum::Unknown
    }
}

/// The renewal loop's memory between rounds.
struct Round {
    lease: Option<i64>,
    /// When a probe last began that found etcd without a leader.
    no_leader_at: Option<Instant>,
}

impl Membership {
    /// Renews (or first grants) the lease for as long as the daemon runs, publishing the
    /// standing on `tx`.
    pub async fn run(self, tx: watch::Sender<Standing>) {
        let period = self.ttl / 3;
        let margin = self.ttl / 5;
        let mut round = Round {
            lease: None,
            no_leader_at: None,
        };
        loop {
            let sent = Instant::now();
            let renewed = match round.lease {
                None => self.grant().await,
                Some(id) => self.renew(id).await,
            };
            let mut next = sent + period;
            let standing = match renewed {
                Ok(id) => {
                    round.lease = Some(id);
                    Standing::Renewed {
                        lease: id,
                        safe_until: sent + self.ttl - margin,
                    }
                }
                Err(Renewal::Expired) => {
                    round.lease = None;
                    Standing::Lost
                }
                Err(Renewal::Failed) => {
                    let now = *tx.borrow();
                    let (standing, retry) = self.after_failure(&mut round, now, period).await;
                    if retry {
                        next = Instant::now() + PROBE_INTERVAL;
                    }
                    standing
                }
            };
            let before = *tx.borrow();
            if before != standing {
                log_change(before, standing);
                let _ = tx.send(standing);
            }
            tokio::time::sleep_until(next).await;
        }
    }

    /// The standing when a renewal failed, and whether to renew again at once.
    ///
    /// `NoQuorum` as soon as etcd says so (an etcd member notices a lost quorum only after
    /// its election timeout, so it is asked again until the next renewal is due), but,
    /// when some etcd member is silent (not refusing: perhaps running, cut off), only while
    /// the lease is known to be alive: a lease that has run out may already be expired by
    /// such a member, leading without knowing it lost its quorum, its revocation waiting in
    /// its log to be committed the moment the quorum is back.
    ///
    /// When a leader is found again after `NoQuorum`: it was elected after the last probe
    /// that found none, and a new etcd leader extends every lease by its TTL, so the lease
    /// lives at least that long; the renewal is tried again at once.
    async fn after_failure(
        &self,
        round: &mut Round,
        now: Standing,
        period: Duration,
    ) -> (Standing, bool) {
        let Some(id) = round.lease else {
            return (Standing::Lost, false);
        };
        let until = Instant::now() + period;
        loop {
            let probed = Instant::now();
            match quorum(&self.etcd, period / 3).await {
                Quorum::Lost { silent } if !silent || alive(now, id, Instant::now()) => {
                    round.no_leader_at = Some(probed);
                    return (Standing::NoQuorum { lease: id }, false);
                }
                Quorum::Lost { .. } => return (Standing::Lost, false),
                Quorum::Exists => {
                    return (quorum_back(self.ttl, round.no_leader_at, now, id), true)
                }
                Quorum::Unknown => {}
            }
            if Instant::now() + PROBE_INTERVAL >= until {
                break;
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        match now {
            Standing::Renewed { .. } => (now, false),
            _ => (Standing::Lost, false),
        }
    }

    /// A new etcd lease, asked of every etcd member at once (a lease granted twice is
    /// dropped unused and expires), and the member record bound to it.
    async fn grant(&self) -> Result<i64, Renewal> {
        let ttl = self.ttl.as_secs().max(1) as i64;
        let record = serde_json::to_vec(&self.record).map_err(|_| Renewal::Failed)?;
        let key = self.etcd.member_key(&self.record.node);
        let record = self.etcd.signed(&key, record);
        let settings_key = self.etcd.settings_key(&self.record.node);
        let settings = serde_json::to_vec(&self.settings).map_err(|_| Renewal::Failed)?;
        let settings = self.etcd.signed(&settings_key, settings);
        let within = self.ttl / 3;
        let failed = |e: StoreError| {
            tracing::debug!(error = %e, "cannot join the pool in etcd");
            Renewal::Failed
        };
        let id = self
            .etcd
            .race("joining the pool", within, move |mut c| async move {
                Ok(c.lease_grant(ttl, None).await?.id())
            })
            .await
            .map_err(failed)?;
        self.etcd
            .race("joining the pool", within, move |mut c| {
                let bound = || Some(PutOptions::new().with_lease(id));
                let txn = Txn::new().and_then(vec![
                    TxnOp::put(key.clone(), record.clone(), bound()),
                    TxnOp::put(settings_key.clone(), settings.clone(), bound()),
                ]);
                async move { c.txn(txn).await }
            })
            .await
            .map_err(failed)?;
        Ok(id)
    }

    /// Renews the lease through every etcd member at once: the first answer counts.
    async fn renew(&self, id: i64) -> Result<i64, Renewal> {
        let ttl = self
            .etcd
            .race(
                "renewing this member's lease",
                self.ttl / 3,
                move |mut c| async move {
                    let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    match stream.message().await? {
                        Some(r) => Ok(r.ttl()),
                        None => Err(etcd_client::Error::LeaseKeepAliveError(
                            "the keep-alive stream ended without an answer".into(),
                        )),
                    }
                },
            )
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "cannot renew this member's lease");
                Renewal::Failed
            })?;
        if ttl > 0 {
            Ok(id)
        } else {
            tracing::info!(lease = id, "etcd says this member's lease has expired");
            Err(Renewal::Expired)
        }
    }
}

/// Whether lease `id` is known to be alive at `at`, by the standing so far.
fn alive(now: Standing, id: i64, at: Instant) -> bool {
    match now {
        Standing::NoQuorum { lease } => lease == id,
        Standing::Renewed { lease, safe_until } => lease == id && at < safe_until,
        Standing::Lost => false,
    }
}

/// The standing when etcd has a leader again but the renewal failed; `no_leader_at`: when
/// the last probe that found no leader began.
fn quorum_back(ttl: Duration, no_leader_at: Option<Instant>, now: Standing, id: i64) -> Standing {
    match (now, no_leader_at) {
        (Standing::NoQuorum { lease }, Some(at)) if lease == id => Standing::Renewed {
            lease: id,
            safe_until: at + ttl - ttl / 5,
        },
        (Standing::Renewed { .. }, _) => now,
        _ => Standing::Lost,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_quorum_keeps_only_a_lease_still_safe_when_it_was_seen() {
        let t = Instant::now();
        let renewed = Standing::Renewed {
            lease: 7,
            safe_until: t + Duration::from_millis(800),
        };
        assert!(alive(renewed, 7, t + Duration::from_millis(799)));
        // Past its safe time the lease may have been expired by an etcd leader that had
        // not yet stepped down.
        assert!(!alive(renewed, 7, t + Duration::from_millis(800)));
        assert!(!alive(renewed, 8, t));
        assert!(alive(
            Standing::NoQuorum { lease: 7 },
            7,
            t + Duration::from_secs(60)
        ));
        assert!(!alive(Standing::Lost, 7, t));
    }

    #[test]
    fn a_refused_connection_is_told_from_silence() {
        use std::io::{Error, ErrorKind};
        let refusal = etcd_client::Error::IoError(Error::from(ErrorKind::ConnectionRefused));
        assert!(refused(&refusal));
        let silence = etcd_client::Error::IoError(Error::from(ErrorKind::TimedOut));
        assert!(!refused(&silence));
    }

    #[test]
    fn quorum_back_counts_from_the_last_probe_that_found_no_leader() {
        let ttl = Duration::from_secs(1);
        let at = Instant::now();
        assert_eq!(
            quorum_back(ttl, Some(at), Standing::NoQuorum { lease: 7 }, 7),
            Standing::Renewed {
                lease: 7,
                safe_until: at + Duration::from_millis(800)
            }
        );
        assert_eq!(
            quorum_back(ttl, None, Standing::NoQuorum { lease: 7 }, 7),
            Standing::Lost
        );
        assert_eq!(
            quorum_back(ttl, Some(at), Standing::NoQuorum { lease: 6 }, 7),
            Standing::Lost
        );
        let renewed = Standing::Renewed {
            lease: 7,
            safe_until: at,
        };
        assert_eq!(quorum_back(ttl, Some(at), renewed, 7), renewed);
        assert_eq!(
            quorum_back(ttl, Some(at), Standing::Lost, 7),
            Standing::Lost
        );
    }
}
