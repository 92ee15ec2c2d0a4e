//! A leader's liveness, finer than its etcd lease.
//!
//! etcd leases count whole seconds, and etcd looks for expired ones only every 500 ms: a
//! leader that dies is replaced 1-1.5 s after its last renewal at best. So while it leads
//! a group, a member also writes a pulse, `pulses/<group>`, every fifth of
//! `takeover_after` ([`Timing`]), each write a transaction that succeeds only while the
//! leader key is still the one it won (its revision). Standbys read the leader key and the
//! pulse every fifth of `takeover_after` and, once both have stayed unchanged for
//! `takeover_after` within one raft term ([`Silence`]), take the group over with a
//! transaction that succeeds only if neither has changed since (`election.rs`).
//!
//! Safety (never two holders): the leader holds its addresses only until `hold` (3/5 of
//! `takeover_after`) after sending the last pulse etcd acknowledged ([`Beat::Until`]). A
//! standby's takeover commits only if the pulse it saw is still the last one written, so
//! every pulse the leader had acknowledged was sent before that standby first saw it; the
//! standby acts `takeover_after` after that, by which time the leader has let go (the
//! 2/5 left cover its reaction and the clocks' rates). A pulse written after the standby's
//! transaction fails (the leader key changed), so it extends nothing: the leader learns it
//! was superseded ([`Beat::Superseded`]). etcd's lease stays the fence for everything else:
//! the leader key and the pulse are bound to the leader's lease, and the leader also gives
//! its addresses up when it cannot show a recent renewal (`membership.rs`).
//!
//! A leader key deleted together with the pool's identity (`etcdctl del --prefix`) is not
//! a takeover: no campaign can win while the identity is gone, and the leader keeps its
//! addresses, as the rest of the member keeps its tunnels (`epoch.rs`).
//!
//! When etcd has lost its quorum nobody can take over, and the leader keeps its addresses
//! (as with its lease): a failed pulse is followed by asking the etcd members about their
//! raft leader, and a probe that finds none running (no member silent: [`no_live_leader`])
//! counts like an acknowledged pulse sent when the probe was. That also covers an etcd
//! leader that has just stopped, before the others notice. A quorum that comes back has a new raft
//! leader, elected in a new term; a standby counts silence only within one term, from a
//! read that succeeded, and a takeover whose transaction committed in a later term than
//! its silence began waits `takeover_after` more before taking the addresses.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::etcd::Etcd;
use super::membership::refused;
use crate::leases::store::StoreError;

/// The pulse's timing, all from `takeover_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often the leader writes its pulse and standbys read it.
    pub every: Duration,
    /// How long a standby must see the same pulse before it takes over.
    pub silence: Duration,
    /// How long after sending an acknowledged pulse the leader may hold its addresses.
    pub hold: Duration,
}

impl Timing {
    pub fn new(takeover_after: Duration) -> Timing {
        Timing {
            every: takeover_after / 5,
            silence: takeover_after,
            hold: takeover_after * 3 / 5,
        }
    }
}

/// What the leader's pulses allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// It may hold the group's addresses until then.
    Until(Instant),
    /// The leader key is no longer the one it won: another member took the group over.
    Superseded,
}

/// The leader's side: writes the pulse while the leader key is at `revision`.
pub struct Pulse {
    pub etcd: Arc<Etcd>,
    pub timing: Timing,
    pub leader_key: String,
    pub pulse_key: String,
    /// The member's signed node name, as written to the pulse key.
    pub value: Vec<u8>,
    pub lease: i64,
    /// The epoch key and its value while the store is the pool's ([`super::epoch`]).
    pub epoch: (String, Vec<u8>),
}

/// What one pulse found.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Written: the leader key is still the one won.
    Written,
    /// The leader key is another's, or gone while the pool's identity is there: a campaign
    /// can have won it.
    Superseded,
    /// The leader key is gone with the pool's identity (`etcdctl del --prefix`): no
    /// campaign can win while it is (each checks it), so nothing changes hands.
    PoolLost,
}

impl Pulse {
    /// Beats until superseded, publishing what each beat allows on `tx`.
    pub async fn run(self, revision: i64, tx: watch::Sender<Beat>) {
        let mut tick = tokio::time::interval(self.timing.every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sent = Instant::now();
            match self.beat(revision).await {
                Ok(Found::Written | Found::PoolLost) => extend(&tx, sent + self.timing.hold),
                Ok(Found::Superseded) => {
                    let _ = tx.send(Beat::Superseded);
                    return;
                }
                Err(e) => {
                    tracing::debug!(key = %self.pulse_key, error = %e, "cannot write the pulse");
                    let probed = Instant::now();
                    if no_live_leader(&self.etcd, self.timing.every).await {
                        extend(&tx, probed + self.timing.hold);
                    }
                }
            }
        }
    }

    /// One pulse, written if the leader key is still at `revision`.
    async fn beat(&self, revision: i64) -> Result<Found, StoreError> {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                self.leader_key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then(vec![TxnOp::put(
                self.pulse_key.clone(),
                self.value.clone(),
                Some(PutOptions::new().with_lease(self.lease)),
            )])
            .or_else(vec![
                TxnOp::get(self.leader_key.clone(), None),
                TxnOp::get(self.epoch.0.clone(), None),
            ]);
        let resp = self
            .etcd
            .race("writing the pulse", self.timing.every * 2, move |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(Found::Written);
        }
        let mut kvs = resp.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let (leader, epoch) = (kvs.next().flatten(), kvs.next().flatten());
        Ok(match (leader, epoch) {
            (None, epoch) if epoch.as_ref() != Some(&self.epoch.1) => Found::PoolLost,
            _ => Found::Superseded,
        })
    }
}

/// Whether no etcd member can be committing anything now: every member either refuses
/// the connection (it is not running) or answers naming no raft leader, or one that is not
/// running (it died; the others have not noticed yet). A member that is silent may be a
/// leader cut off from this one, so then the answer is no.
///
/// Any leader elected after this was elected in a new term, in which a standby starts
/// counting the pulse's silence again.
async fn no_live_leader(etcd: &Etcd, within: Duration) -> bool {
    let (mut running, mut named) = (Vec::new(), Vec::new());
    for status in etcd.status_each(within).await {
        match status {
            Ok(s) => {
                running.push(s.header().map_or(0, |h| h.member_id()));
                named.push(s.leader());
            }
            Err(Some(e)) if refused(&e) => {}
            Err(_) => return false,
        }
    }
    leaderless(&running, &named)
}

/// [`no_live_leader`]'s rule: `running`, the members that answered; `named`, the raft
/// leader each names (0: none).
fn leaderless(running: &[u64], named: &[u64]) -> bool {
    !running.is_empty() && named.iter().all(|l| *l == 0 || !running.contains(l))
}

/// Moves the beat's end later (never earlier, never out of `Superseded`).
fn extend(tx: &watch::Sender<Beat>, until: Instant) {
    tx.send_if_modified(|b| match b {
        Beat::Until(t) if *t < until => {
            *t = until;
            true
        }
        _ => false,
    });
}

/// A standby's reading of a group's leader: the revisions of its key and of its pulse,
/// and the raft term of the read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub leader: i64,
    pub pulse: i64,
    pub term: u64,
}

/// How long a standby has seen the same [`Seen`].
#[derive(Debug, Default)]
pub struct Silence {
    since: Option<(Seen, Instant)>,
}

impl Silence {
    /// Records a reading that arrived `at` (`None`: the read failed, or the leader has no
    /// pulse of its own) and returns it once the same has been seen for `silence`.
    pub fn observe(&mut self, seen: Option<Seen>, at: Instant, silence: Duration) -> Option<Seen> {
        let Some(seen) = seen else {
            self.since = None;
            return None;
        };
        match self.since {
            Some((before, first)) if before == seen => {
                (at.saturating_duration_since(first) >= silence).then_some(seen)
            }
            _ => {
                self.since = Some((seen, at));
                None
            }
        }
    }

    /// When the current reading was first seen.
    pub fn since(&self) -> Option<Instant> {
        self.since.map(|(_, at)| at)
    }
}

/// What a standby found.
pub enum Leader {
    /// The leader key is gone: campaign.
    Vacant,
    /// The leader and its pulse have not changed for `silence`.
    Silent(Seen),
}

/// One read of the leader key and the pulse, both from one revision.
enum Reading {
    Vacant,
    /// The leader key is there; with its pulse when it has one of its own (written by
    /// a member, bound to the leader's lease).
    Held(Option<Seen>),
}

/// The standby's side: reads the leader and its pulse every [`Timing::every`] until the
/// leader key is gone or both have been silent for [`Timing::silence`], or `within` passed
/// (`None`: look at the rest again).
pub async fn watch_leader(
    etcd: &Etcd,
    timing: Timing,
    keys: (&str, &str),
    silence: &mut Silence,
    within: Duration,
) -> Option<Leader> {
    let deadline = Instant::now() + within;
    // Not at once: a campaign has just found the key taken (or failed on a vacant one).
    let mut tick = tokio::time::interval_at(Instant::now() + timing.every, timing.every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while Instant::now() < deadline {
        tick.tick().await;
        let reading = read(etcd, keys, timing.silence / 2).await;
        let at = Instant::now();
        let seen = match reading {
            Ok(Reading::Vacant) => return Some(Leader::Vacant),
            Ok(Reading::Held(seen)) => seen,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the leader's pulse");
                None
            }
        };
        if let Some(seen) = silence.observe(seen, at, timing.silence) {
            return Some(Leader::Silent(seen));
        }
    }
    None
}

async fn read(etcd: &Etcd, keys: (&str, &str), within: Duration) -> Result<Reading, StoreError> {
    let (leader_key, pulse_key) = (keys.0.to_string(), keys.1.to_string());
    let txn = Txn::new().and_then(vec![
        TxnOp::get(leader_key, None),
        TxnOp::get(pulse_key, None),
    ]);
    let resp = etcd
        .race("reading the leader's pulse", within, move |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
    let term = resp.header().map_or(0, |h| h.raft_term());
    let mut kvs = resp.op_responses().into_iter().map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    });
    let (Some(leader), pulse) = (kvs.next().flatten(), kvs.next().flatten()) else {
        return Ok(Reading::Vacant);
    };
    let seen = pulse
        .filter(|p| p.lease() == leader.lease() && etcd.verified(p.key(), p.value()).is_some())
        .map(|p| Seen {
            leader: leader.mod_revision(),
            pulse: p.mod_revision(),
            term,
        });
    Ok(Reading::Held(seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SILENCE: Duration = Duration::from_millis(500);

    fn seen(pulse: i64, term: u64) -> Option<Seen> {
        Some(Seen {
            leader: 10,
            pulse,
            term,
        })
    }

    #[test]
    fn silence_is_the_same_pulse_seen_for_takeover_after() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut s = Silence::default();
        assert_eq!(s.observe(seen(20, 3), ms(0), SILENCE), None);
        assert_eq!(s.observe(seen(20, 3), ms(499), SILENCE), None);
        assert_eq!(s.observe(seen(20, 3), ms(500), SILENCE), seen(20, 3));
        // A new pulse starts the count again.
        assert_eq!(s.observe(seen(21, 3), ms(600), SILENCE), None);
        assert_eq!(s.observe(seen(21, 3), ms(1000), SILENCE), None);
        assert_eq!(s.since(), Some(ms(600)));
    }

    #[test]
    fn a_failed_read_a_missing_pulse_or_a_new_raft_term_starts_the_count_again() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut s = Silence::default();
        s.observe(seen(20, 3), ms(0), SILENCE);
        // etcd lost its quorum and got it back: a new term, whatever the revisions.
        assert_eq!(s.observe(seen(20, 4), ms(400), SILENCE), None);
        assert_eq!(s.observe(seen(20, 4), ms(800), SILENCE), None);
        assert_eq!(s.observe(seen(20, 4), ms(900), SILENCE), seen(20, 4));
        s.observe(None, ms(1000), SILENCE);
        assert_eq!(s.since(), None);
        assert_eq!(s.observe(seen(20, 4), ms(1100), SILENCE), None);
        assert_eq!(s.observe(seen(20, 4), ms(1599), SILENCE), None);
        assert_eq!(s.observe(seen(20, 4), ms(1600), SILENCE), seen(20, 4));
    }

    #[test]
    fn the_leader_lets_go_well_before_a_standby_may_take_over() {
        let t = Timing::new(Duration::from_millis(500));
        assert_eq!(t.every, Duration::from_millis(100));
        assert_eq!(t.hold, Duration::from_millis(300));
        // What is left covers the leader's reaction: two pulses' worth.
        assert!(t.silence - t.hold >= 2 * t.every);
    }

    #[test]
    fn etcd_is_leaderless_only_if_no_running_member_leads() {
        // Members 1 and 2 answer; 3 refuses the connection (stopped).
        assert!(leaderless(&[1, 2], &[0, 0]));
        // They still name 3, which has just stopped: it cannot commit anything.
        assert!(leaderless(&[1, 2], &[3, 3]));
        assert!(leaderless(&[1, 2], &[3, 0]));
        // One of them leads: a quorum works.
        assert!(!leaderless(&[1, 2], &[2, 2]));
        assert!(!leaderless(&[1, 2], &[0, 2]));
        // Nobody answered: nothing is known.
        assert!(!leaderless(&[], &[]));
    }

    #[test]
    fn a_beat_only_ever_moves_later_and_superseded_stays() {
        let t = Instant::now();
        let (tx, rx) = watch::channel(Beat::Until(t + SILENCE));
        extend(&tx, t);
        assert_eq!(*rx.borrow(), Beat::Until(t + SILENCE));
        extend(&tx, t + 2 * SILENCE);
        assert_eq!(*rx.borrow(), Beat::Until(t + 2 * SILENCE));
        tx.send(Beat::Superseded).unwrap();
        extend(&tx, t + 3 * SILENCE);
        assert_eq!(*rx.borrow(), Beat::Superseded);
    }
}
