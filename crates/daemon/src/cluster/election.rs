//! One leader per egress and per private network: a key `leaders/<group>` in etcd, created
//! only when absent and bound to the member's etcd lease, so it disappears when the leader
//! stops renewing it.
//!
//! Spaces that share an address (an egress IP or an endpoint's) must be held by one member,
//! so they are led together as a [`Group`] (see [`groups`] for its name): the same on every
//! member whatever the order of its tables. A member campaigns
//! and holds only while its shared settings agree with the pool's ([`super::agreement`]).
//!
//! The leader holds the group's addresses for as long as its [`Standing`] allows, and
//! gives them up the moment it does not: before the lease can expire for the others.
//! The others watch the key and campaign as soon as it goes, or take the group over when
//! the leader's pulse has stopped for `takeover_after` ([`super::pulse`]), well before its
//! lease can expire. A restarted member whose key is still there (its old lease has not
//! expired yet) takes it over at once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use tokio::time::Instant;

use super::epoch;
use super::etcd::Etcd;
use super::led::Led;
use super::membership::Standing;
use super::pulse::{self, Beat, Leader, Pulse, Seen, Silence, Timing};
use super::takeover::Takeover;
use crate::space::Space;

/// Spaces led together because they share an address.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// Egresses first, each kind in name order.
    pub spaces: Vec<Led>,
}

/// Partitions the egresses and networks of `config`'s shape into groups of those sharing an
/// address (an egress IP or an endpoint's). A group is named after its first space's store
/// name (see [`Space::store_key`]; egresses come first, in name order): the same groups,
/// named the same, in whatever order the tables come, and a group of egresses keeps the
/// name it had before networks could be led.
pub fn groups(spaces: Vec<Led>) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for led in spaces {
        let shares = |g: &Group| g.spaces.iter().any(|o| o.shares_an_address(&led));
        let joined: Vec<usize> = (0..out.len()).filter(|&i| shares(&out[i])).collect();
        let mut group = Group {
            name: String::new(),
            spaces: vec![led],
        };
        for i in joined.into_iter().rev() {
            group.spaces.extend(out.remove(i).spaces);
        }
        out.push(group);
    }
    for g in &mut out {
        g.spaces.sort_by_key(Led::space);
        g.name = g.spaces[0].space().store_key();
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Which spaces this member leads right now (for collection and status), each with its
/// term: a number that grows with every takeover.
#[derive(Clone, Default)]
pub struct Leading(Arc<RwLock<Terms>>);

#[derive(Default)]
struct Terms {
    next: u64,
    leading: HashMap<Space, u64>,
}

impl Leading {
    pub fn leads(&self, space: &Space) -> bool {
        self.term(space).is_some()
    }

    /// The term of this member's leadership of `space`, if it leads it.
    pub fn term(&self, space: &Space) -> Option<u64> {
        self.0.read().ok()?.leading.get(space).copied()
    }

    /// The spaces taken over since the terms in `known` were seen (updating `known`):
    /// whatever this member remembers of them is from before.
    pub fn taken_over(&self, known: &mut HashMap<Space, u64>) -> Vec<Space> {
        let Ok(t) = self.0.read() else {
            return Vec::new();
        };
        known.retain(|e, _| t.leading.contains_key(e));
        t.leading
            .iter()
            .filter(|(e, term)| known.insert((*e).clone(), **term) != Some(**term))
            .map(|(e, _)| e.clone())
            .collect()
    }

    pub(crate) fn set(&self, group: &Group, leads: bool) {
        if let Ok(mut t) = self.0.write() {
            for led in &group.spaces {
                if leads {
                    t.next += 1;
                    let term = t.next;
                    t.leading.entry(led.space()).or_insert(term);
                } else {
                    t.leading.remove(&led.space());
                }
            }
        }
    }
}

enum Campaign {
    Won(Won),
    /// Another member leads.
    Held,
}

/// A won campaign.
struct Won {
    /// The leader key's revision, which every pulse checks.
    revision: i64,
    /// When the campaign was sent: its pulse allows holding from then.
    sent: Instant,
    /// Taken from a silent leader in another raft term than its silence was seen in: the
    /// old leader may have held through etcd's lost quorum, so wait before holding.
    wait: bool,
}

/// Why [`Election::hold`] returned.
#[derive(PartialEq, Eq)]
enum Ended {
    /// The lease or the agreement no longer allow holding.
    Lapsed,
    /// Another member took the group over.
    Superseded,
}

/// A task that ends when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct Election {
    pub etcd: Arc<Etcd>,
    pub node: String,
    pub ttl: Duration,
    /// The leader's pulse and how long a standby waits for it ([`super::pulse`]).
    pub timing: Timing,
    pub takeover: Arc<Takeover>,
    pub leading: Leading,
    /// Whether this member's shared settings agree with the pool's.
    pub agrees: watch::Receiver<bool>,
    /// The pool's identity: no campaign succeeds in a store that lost it.
    pub epoch: String,
}

impl Election {
    /// Campaigns for `group` and holds it while allowed, for as long as the daemon runs.
    pub async fn run(self: Arc<Self>, group: Group, mut standing: watch::Receiver<Standing>) {
        let key = self.etcd.leader_key(&group.name);
        // Addresses left from an earlier run are not ours until the campaign says so.
        let mut holding = true;
        let mut agrees = self.agrees.clone();
        let mut silence = Silence::default();
        let mut silent = None;
        loop {
            let Some(lease) = self.valid_lease(&mut standing).await else {
                self.give_up(&group, &mut holding).await;
                continue;
            };
            if !*agrees.borrow_and_update() {
                self.give_up(&group, &mut holding).await;
                let _ = tokio::time::timeout(self.ttl / 2, agrees.changed()).await;
                continue;
            }
            match self.campaign(&group, lease, silent.take()).await {
                Ok(Campaign::Won(won)) => {
                    silence = Silence::default();
                    holding = self
                        .lead(&group, lease, won, &mut standing, &mut agrees)
                        .await;
                }
                Ok(Campaign::Held) => {
                    self.give_up(&group, &mut holding).await;
                    let keys = (key.as_str(), &*self.etcd.pulse_key(&group.name));
                    let found =
                        pulse::watch_leader(&self.etcd, self.timing, keys, &mut silence, self.ttl)
                            .await;
                    if let Some(Leader::Silent(seen)) = found {
                        silent = Some((seen, silence.since()));
                    }
                }
                Err(e) => {
                    tracing::debug!(group = %group.name, error = %e, "cannot campaign");
                    self.give_up(&group, &mut holding).await;
                    tokio::time::sleep(self.ttl / 4).await;
                }
            }
        }
    }

    /// Leads `group` from a won campaign, with its pulse, until the leadership ends; the
    /// addresses are given up on return.
    async fn lead(
        &self,
        group: &Group,
        lease: i64,
        won: Won,
        standing: &mut watch::Receiver<Standing>,
        agrees: &mut watch::Receiver<bool>,
    ) -> bool {
        let key = self.etcd.leader_key(&group.name);
        let pulse_key = self.etcd.pulse_key(&group.name);
        let (tx, mut beat) = watch::channel(Beat::Until(won.sent + self.timing.hold));
        let pulse = Pulse {
            etcd: self.etcd.clone(),
            timing: self.timing,
            value: self.etcd.signed(&pulse_key, &self.node),
            leader_key: key.clone(),
            pulse_key,
            lease,
            epoch: (
                self.etcd.epoch_key(),
                self.etcd.signed(&self.etcd.epoch_key(), &self.epoch),
            ),
        };
        // Stops with this leadership, even when the election's task is aborted.
        let _beating = AbortOnDrop(tokio::spawn(pulse.run(won.revision, tx)));
        if won.wait {
            tracing::info!(group = %group.name, "won in a new raft term: waiting out the old leader before taking its addresses");
            tokio::time::sleep(self.timing.silence).await;
        }
        let mut holding;
        loop {
            tracing::info!(group = %group.name, "leading");
            let ended = self.hold(group, lease, standing, agrees, &mut beat).await;
            holding = true;
            self.give_up(group, &mut holding).await;
            if ended == Ended::Superseded {
                break;
            }
            if !*agrees.borrow() {
                self.resign(&key).await;
                break;
            }
            if !self.still_ours(lease, standing).await {
                break;
            }
        }
        holding
    }

    /// The lease to campaign with, waiting up to half a TTL for one.
    async fn valid_lease(&self, standing: &mut watch::Receiver<Standing>) -> Option<i64> {
        let deadline = Instant::now() + self.ttl / 2;
        loop {
            let current = *standing.borrow_and_update();
            if let Some(lease) = current.valid_lease(Instant::now()) {
                return Some(lease);
            }
            match tokio::time::timeout_at(deadline, standing.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// After giving a group up for want of a renewal: whether `lease` turns out to be alive
    /// after all (renewed again, or etcd found without quorum, so it cannot have expired).
    /// The leader key is bound to it, so the group is still this member's.
    async fn still_ours(&self, lease: i64, standing: &mut watch::Receiver<Standing>) -> bool {
        let deadline = Instant::now() + self.ttl;
        loop {
            match *standing.borrow_and_update() {
                Standing::NoQuorum { lease: l } if l == lease => return true,
                Standing::Renewed {
                    lease: l,
                    safe_until,
                } if l == lease && Instant::now() < safe_until => return true,
                Standing::Lost => return false,
                _ => {}
            }
            match tokio::time::timeout_at(deadline, standing.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    async fn give_up(&self, group: &Group, holding: &mut bool) {
        if !*holding {
            return;
        }
        self.leading.set(group, false);
        match self.takeover.release(group).await {
            Ok(()) => *holding = false,
            Err(e) => {
                tracing::error!(group = %group.name, error = %e, "cannot give the group's addresses up; retrying")
            }
        }
    }

    /// Holds the group while the standing and the pulse allow it: the addresses go when
    /// the pulse goes stale and come back when it is fresh again (a pulse acknowledged, or
    /// etcd found without a quorum).
    async fn hold(
        &self,
        group: &Group,
        lease: i64,
        standing: &mut watch::Receiver<Standing>,
        agrees: &mut watch::Receiver<bool>,
        beat: &mut watch::Receiver<Beat>,
    ) -> Ended {
        let mut acquired = false;
        loop {
            let current = *standing.borrow_and_update();
            if current.valid_lease(Instant::now()) != Some(lease) {
                tracing::warn!(group = %group.name, "giving the group up: this member cannot prove it still leads");
                return Ended::Lapsed;
            }
            if !*agrees.borrow_and_update() {
                tracing::warn!(group = %group.name, "giving the group up: this member's shared settings no longer agree with the pool's");
                return Ended::Lapsed;
            }
            let Beat::Until(beats_until) = *beat.borrow_and_update() else {
                tracing::warn!(group = %group.name, "giving the group up: another member took it over");
                return Ended::Superseded;
            };
            let fresh = Instant::now() < beats_until;
            if fresh && !acquired {
                acquired = self.acquire(group, beat).await;
            } else if !fresh && acquired {
                tracing::warn!(group = %group.name, "giving the group's addresses up: no pulse acknowledged by etcd in time");
                let mut holding = true;
                self.give_up(group, &mut holding).await;
                acquired = holding;
            }
            let wake = match current {
                Standing::Renewed { safe_until, .. } => safe_until,
                _ => Instant::now() + self.ttl,
            };
            let wake = match (fresh, acquired) {
                (true, true) => wake.min(beats_until),
                (true, false) => wake.min(Instant::now() + Duration::from_secs(1)),
                (false, _) => wake,
            };
            tokio::select! {
                changed = standing.changed() => if changed.is_err() { return Ended::Lapsed },
                changed = agrees.changed() => if changed.is_err() { return Ended::Lapsed },
                changed = beat.changed() => if changed.is_err() { return Ended::Lapsed },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Takes the group's addresses, if the pulse is still fresh when they are added;
    /// whether that worked.
    async fn acquire(&self, group: &Group, beat: &watch::Receiver<Beat>) -> bool {
        let fresh = || matches!(*beat.borrow(), Beat::Until(t) if Instant::now() < t);
        match self.takeover.acquire(group, fresh).await {
            Ok(()) => {
                self.leading.set(group, true);
                true
            }
            Err(e) => {
                tracing::error!(group = %group.name, error = %e, "cannot take the group's addresses; retrying");
                false
            }
        }
    }

    /// Writes the leader key and a first pulse, bound to `lease`: when the key is absent,
    /// or, after `silent` (what a standby saw unchanged for `takeover_after`, and since
    /// when), when neither has changed since.
    async fn campaign(
        &self,
        group: &Group,
        lease: i64,
        silent: Option<(Seen, Option<Instant>)>,
    ) -> Result<Campaign, String> {
        let k = self.etcd.leader_key(&group.name);
        // Signed: a leader key written by anything but a member is nobody's.
        let node = self.etcd.signed(&k, &self.node);
        let txn = Txn::new()
            .when(self.claim(group, silent.map(|(seen, _)| seen)))
            .and_then(self.writes(group, lease))
            .or_else(vec![TxnOp::get(k.clone(), None)]);
        let sent = Instant::now();
        // Sent to every etcd member at once (a restarted one may hold it unanswered); a
        // second copy finds the key ours and takes it again below.
        let resp = self
            .etcd
            .race("campaigning", self.ttl / 3, move |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|e| e.to_string())?;
        // The answering member's term: no earlier than that of the entry won.
        let term = resp.header().map_or(0, |h| h.raft_term());
        let won = |revision| {
            let wait = silent.is_some_and(|(seen, since)| {
                let silent_ms = since.map_or(0, |s| s.elapsed().as_millis());
                tracing::info!(group = %group.name, silent_ms, "took the group over from a leader whose pulse stopped");
                seen.term != term
            });
            Campaign::Won(Won {
                revision,
                sent,
                wait,
            })
        };
        if resp.succeeded() {
            return Ok(won(resp.header().map_or(0, |h| h.revision())));
        }
        let Some(TxnOpResponse::Get(got)) = resp.op_responses().into_iter().next() else {
            return Ok(Campaign::Held);
        };
        let from_silence = |kv: &etcd_client::KeyValue| {
            silent.is_some_and(|(seen, _)| kv.mod_revision() != seen.leader)
        };
        match got.kvs().first() {
            // Another copy of this takeover won (this copy, answered first, found the key
            // already changed): it committed before this answer, so in this term or earlier.
            Some(kv)
                if kv.value() == node.as_slice() && kv.lease() == lease && from_silence(kv) =>
            {
                Ok(won(kv.mod_revision()))
            }
            Some(kv) if kv.value() == node.as_slice() => {
                self.reclaim(group, lease, kv.mod_revision()).await
            }
            _ => Ok(Campaign::Held),
        }
    }

    /// What a campaign needs: the leader key absent, or as a silent leader left it.
    fn claim(&self, group: &Group, silent: Option<Seen>) -> Vec<Compare> {
        let k = self.etcd.leader_key(&group.name);
        let intact = epoch::intact(&self.etcd, &self.epoch);
        match silent {
            None => vec![Compare::create_revision(k, CompareOp::Equal, 0), intact],
            Some(seen) => {
                let pulse_key = self.etcd.pulse_key(&group.name);
                vec![
                    Compare::mod_revision(k, CompareOp::Equal, seen.leader),
                    Compare::mod_revision(pulse_key, CompareOp::Equal, seen.pulse),
                    intact,
                ]
            }
        }
    }

    /// The leader key and a pulse, both signed and bound to `lease`.
    fn writes(&self, group: &Group, lease: i64) -> Vec<TxnOp> {
        let k = self.etcd.leader_key(&group.name);
        let pulse_key = self.etcd.pulse_key(&group.name);
        let bound = || Some(PutOptions::new().with_lease(lease));
        vec![
            TxnOp::put(k.clone(), self.etcd.signed(&k, &self.node), bound()),
            TxnOp::put(
                pulse_key.clone(),
                self.etcd.signed(&pulse_key, &self.node),
                bound(),
            ),
        ]
    }

    /// Takes a leader key that is this member's over, with a new pulse: one from before a
    /// restart (its old lease still running), from before its pulse went stale, or won by
    /// another copy of the same campaign. Its pulse may be old, so it is written anew.
    async fn reclaim(&self, group: &Group, lease: i64, revision: i64) -> Result<Campaign, String> {
        let k = self.etcd.leader_key(&group.name);
        let reclaim = Txn::new()
            .when(vec![
                Compare::mod_revision(k, CompareOp::Equal, revision),
                epoch::intact(&self.etcd, &self.epoch),
            ])
            .and_then(self.writes(group, lease));
        let sent = Instant::now();
        let resp = self
            .etcd
            .run_for("reclaiming leadership", self.ttl / 3, |mut c| async move {
                c.txn(reclaim).await
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            Campaign::Won(Won {
                revision,
                sent,
                wait: false,
            })
        } else {
            Campaign::Held
        })
    }

    /// Deletes the leader key if it is still this member's, so another member may lead
    /// at once (this member's etcd lease lives on).
    async fn resign(&self, key: &str) {
        let ours = self.etcd.signed(key, &self.node);
        let k = key.to_string();
        let txn = Txn::new()
            .when(vec![Compare::value(k.clone(), CompareOp::Equal, ours)])
            .and_then(vec![TxnOp::delete(k, None)]);
        if let Err(e) = self
            .etcd
            .run_for("resigning", self.ttl / 3, |mut c| async move {
                c.txn(txn).await
            })
            .await
        {
            tracing::warn!(error = %e, "cannot resign; the leadership lapses with this member's etcd lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::network::tests::network;
    use crate::config::tests::egress;
    use crate::leases::egress_ips::EgressIps;

    #[test]
    fn every_takeover_is_a_new_term() {
        let g = groups(vec![Led::Egress(egress("a", "100.96.0.0/24"))]).remove(0);
        let a = Space::Egress("a".into());
        let leading = Leading::default();
        let mut known = HashMap::new();
        assert!(leading.taken_over(&mut known).is_empty());
        leading.set(&g, true);
        assert_eq!(leading.taken_over(&mut known), vec![a.clone()]);
        // Still leading: no new term, even when told again.
        leading.set(&g, true);
        assert!(leading.taken_over(&mut known).is_empty());
        // Lost and taken back between two looks: a new term.
        leading.set(&g, false);
        leading.set(&g, true);
        assert_eq!(leading.taken_over(&mut known), vec![a.clone()]);
        leading.set(&g, false);
        assert!(leading.taken_over(&mut known).is_empty() && known.is_empty());
    }

    #[test]
    fn spaces_sharing_an_address_are_led_together() {
        let mut a = egress("a", "100.96.0.0/24");
        let mut b = egress("b", "100.97.0.0/24");
        let mut c = egress("c", "100.98.0.0/24");
        let mut d = egress("d", "100.99.0.0/24");
        a.egress_ips = EgressIps::single("203.0.113.1".parse().unwrap());
        a.endpoint = "198.51.100.1:1".parse().unwrap();
        b.egress_ips = EgressIps::single("203.0.113.2".parse().unwrap());
        b.endpoint = "198.51.100.2:1".parse().unwrap();
        // c shares a's egress IP and b's endpoint: all three go together.
        c.egress_ips = a.egress_ips.clone();
        c.endpoint = "198.51.100.2:2".parse().unwrap();
        d.egress_ips = EgressIps::single("203.0.113.4".parse().unwrap());
        d.endpoint = "198.51.100.4:1".parse().unwrap();
        // A network whose endpoint shares d's address goes with d; one of its own alone.
        let mut n = network("n", "fdaa:0:1::/48", "wgn-n");
        n.endpoint = "198.51.100.4:2".parse().unwrap();
        let mut m = network("m", "fdaa:0:2::/48", "wgn-m");
        m.endpoint = "198.51.100.9:2".parse().unwrap();
        let all = [
            Led::Egress(a),
            Led::Egress(b),
            Led::Egress(c),
            Led::Egress(d),
            Led::Network(n),
            Led::Network(m),
        ];
        let named = |g: Vec<Group>| -> Vec<(String, Vec<String>)> {
            g.iter()
                .map(|g| {
                    let spaces = g.spaces.iter().map(|l| l.space().to_string()).collect();
                    (g.name.clone(), spaces)
                })
                .collect()
        };
        let names = named(groups(all.to_vec()));
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        assert_eq!(
            names,
            vec![
                ("a".into(), s(&["egress a", "egress b", "egress c"])),
                ("d".into(), s(&["egress d", "network n"])),
                ("network:m".into(), s(&["network m"])),
            ]
        );
        // Every order of the tables gives the same groups with the same names.
        for order in [[5, 3, 2, 1, 0, 4], [2, 4, 0, 3, 5, 1], [4, 1, 3, 5, 0, 2]] {
            let shuffled: Vec<Led> = order.iter().map(|&i| all[i].clone()).collect();
            assert_eq!(named(groups(shuffled)), names, "order {order:?}");
        }
    }
}
