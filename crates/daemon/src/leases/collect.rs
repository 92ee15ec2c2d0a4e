//! Idle-lease collection: which leases belong to peers that have gone away.
//!
//! A peer is alive while the exit node hears from it. Handshakes alone are too coarse (a
//! session rekeys only every two minutes), so the collector also watches each peer's
//! received-bytes counter: the keepalive the exit node hands out (`persistent_keepalive`)
//! moves it every few seconds for as long as the container's host is up.
//!
//! * A peer that was heard from is idle once neither a handshake nor received bytes have
//!   been seen for `peer_timeout`.
//! * A peer not heard from is idle `first_handshake_timeout` after the last moment it could
//!   have handshaken: when this process first looked at it, or when the peer or its device
//!   was made anew (the peer missing from the device, its counters gone backwards, its
//!   handshake gone). A reboot, an `ip link del` or a reconcile that re-adds peers thus
//!   restarts the clock instead of getting every idle container's lease collected.
//!
//! What this process has not watched itself it does not hold against a peer: after a restart
//! every peer gets the full timeout again, counted from the restart. In a pool only the
//! leader watches an egress's peers, so a member that takes an egress over (again) starts
//! its clock anew ([`Activity::restart`]): what it saw before it lost the egress is not
//! held against peers that have not handshaken with it yet. Time is measured with
//! the monotonic clock; the device's wall-clock handshake times are turned into ages.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use wgexit::keys::Key;
use wgexit::wg::PeerStatus;

/// Why a lease is collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Heard from before, silent for `peer_timeout`.
    Silent(Duration),
    /// Never heard from within `first_handshake_timeout`.
    NeverHandshaken(Duration),
}

impl std::fmt::Display for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Idle::Silent(d) => write!(f, "no handshake or traffic for {} s", d.as_secs()),
            Idle::NeverHandshaken(d) => write!(f, "no handshake within {} s", d.as_secs()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub peer: Duration,
    pub first_handshake: Duration,
}

/// The moment of an observation: monotonic for measuring, wall-clock for the device's
/// handshake times.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub fn current() -> Now {
        Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// When, on the monotonic clock, a wall-clock moment was (never later than now).
    fn mono_of(&self, t: SystemTime) -> Instant {
        let age = self.wall.duration_since(t).unwrap_or_default();
        self.mono.checked_sub(age).unwrap_or(self.mono)
    }
}

#[derive(Debug)]
struct Seen {
    rx_bytes: u64,
    handshake: Option<SystemTime>,
    /// The last moment the peer could have handshaken from scratch.
    since: Instant,
    /// The last evidence of life, if any since `since`.
    heard_at: Option<Instant>,
}

impl Seen {
    /// This process's first look: history from before it counts as heard, from now.
    fn first_look(peer: Option<&PeerStatus>, now: Now) -> Seen {
        let mut seen = Seen::restart(peer, now);
        if seen.rx_bytes > 0 || seen.handshake.is_some() {
            seen.heard_at = Some(now.mono);
        }
        seen
    }

    /// The peer (or its device) made anew: it could handshake from now on.
    fn restart(peer: Option<&PeerStatus>, now: Now) -> Seen {
        Seen {
            rx_bytes: peer.map_or(0, |p| p.rx_bytes),
            handshake: peer.and_then(|p| p.last_handshake),
            since: now.mono,
            heard_at: None,
        }
    }

    /// Whether `peer` shows the peer or its device was made anew since the last look.
    fn restarted(&self, peer: Option<&PeerStatus>) -> bool {
        match peer {
            None => true,
            Some(p) => {
                p.rx_bytes < self.rx_bytes
                    || (self.handshake.is_some() && p.last_handshake.is_none())
            }
        }
    }

    /// Takes in what the device says now.
    fn update(&mut self, peer: &PeerStatus, now: Now) {
        if peer.rx_bytes != self.rx_bytes {
            self.rx_bytes = peer.rx_bytes;
            self.heard_at = Some(now.mono);
        }
        if let Some(h) = peer.last_handshake {
            if self.handshake != Some(h) {
                self.handshake = Some(h);
                let at = now.mono_of(h).max(self.since);
                self.heard_at = Some(self.heard_at.map_or(at, |t| t.max(at)));
            }
        }
    }

    fn idle(&self, now: Now, timeouts: Timeouts) -> Option<Idle> {
        match self.heard_at {
            Some(t) => {
                (now.mono.duration_since(t) >= timeouts.peer).then_some(Idle::Silent(timeouts.peer))
            }
            None => (now.mono.duration_since(self.since) >= timeouts.first_handshake)
                .then_some(Idle::NeverHandshaken(timeouts.first_handshake)),
        }
    }
}

/// What the collector has observed of each peer, by (egress, public key).
#[derive(Debug, Default)]
pub struct Activity {
    seen: HashMap<(String, Key), Seen>,
}

impl Activity {
    /// Records what the device says about `key`'s peer at `now` (`None`: the device has no
    /// such peer right now) and says whether its lease is to be collected.
    pub fn observe(
        &mut self,
        egress: &str,
        key: &Key,
        peer: Option<&PeerStatus>,
        now: Now,
        timeouts: Timeouts,
    ) -> Option<Idle> {
        let seen = match self.seen.entry((egress.to_string(), *key)) {
            Entry::Vacant(v) => {
                v.insert(Seen::first_look(peer, now));
                return None;
            }
            Entry::Occupied(o) => o.into_mut(),
        };
        match peer {
            Some(peer) if !seen.restarted(Some(peer)) => {
                seen.update(peer, now);
                seen.idle(now, timeouts)
            }
            _ => {
                *seen = Seen::restart(peer, now);
                None
            }
        }
    }

    /// Starts every peer of `egress` afresh, as at this process's first look: for a member
    /// that has just taken the egress over and did not watch it meanwhile.
    pub fn restart(&mut self, egress: &str) {
        self.seen.retain(|(e, _), _| e != egress);
    }

    /// Forgets peers of `egress` that are no longer leased.
    pub fn retain(&mut self, egress: &str, leased: &HashSet<Key>) {
        self.seen
            .retain(|(e, k), _| e != egress || leased.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        peer: Duration::from_secs(10),
        first_handshake: Duration::from_secs(5),
    };

    fn peer(rx: u64, handshake: Option<SystemTime>) -> PeerStatus {
        PeerStatus {
            public_key: Key([1; 32]),
            endpoint: None,
            allowed_ips: vec![],
            last_handshake: handshake,
            rx_bytes: rx,
            tx_bytes: 0,
        }
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    /// `s` seconds into the test, on both clocks.
    fn now(s: u64) -> Now {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        Now {
            mono: *BASE.get_or_init(Instant::now) + Duration::from_secs(s),
            wall: at(s),
        }
    }

    #[test]
    fn keepalives_keep_a_peer_whose_handshake_is_old() {
        let mut a = Activity::default();
        let k = Key([1; 32]);
        let hs = Some(at(0));
        for s in (0..60).step_by(3) {
            // Only the byte counter moves; the handshake stays at 0.
            assert_eq!(a.observe("e", &k, Some(&peer(32 * s, hs)), now(s), T), None);
        }
        // Silence: collected once peer_timeout has passed since bytes last moved (57).
        assert_eq!(
            a.observe("e", &k, Some(&peer(32 * 57, hs)), now(60), T),
            None
        );
        assert_eq!(
            a.observe("e", &k, Some(&peer(32 * 57, hs)), now(67), T),
            Some(Idle::Silent(T.peer))
        );
    }

    #[test]
    fn a_peer_never_heard_from_goes_after_the_first_handshake_timeout() {
        let mut a = Activity::default();
        let k = Key([2; 32]);
        assert_eq!(a.observe("e", &k, None, now(0), T), None);
        assert_eq!(a.observe("e", &k, Some(&peer(0, None)), now(4), T), None);
        assert_eq!(
            a.observe("e", &k, Some(&peer(0, None)), now(5), T),
            Some(Idle::NeverHandshaken(T.first_handshake))
        );
        // The same peer in another egress is another lease.
        assert_eq!(a.observe("f", &k, None, now(5), T), None);
    }

    #[test]
    fn after_a_restart_old_history_counts_from_the_first_look() {
        let mut a = Activity::default();
        let k = Key([3; 32]);
        // The last handshake was an hour before this process started.
        let old = Some(at(0));
        assert_eq!(
            a.observe("e", &k, Some(&peer(100, old)), now(3600), T),
            None
        );
        assert_eq!(
            a.observe("e", &k, Some(&peer(100, old)), now(3609), T),
            None
        );
        assert_eq!(
            a.observe("e", &k, Some(&peer(100, old)), now(3610), T),
            Some(Idle::Silent(T.peer))
        );
        // A fresh handshake counts even if bytes did not move.
        let mut b = Activity::default();
        b.observe("e", &k, Some(&peer(100, old)), now(0), T);
        assert_eq!(
            b.observe("e", &k, Some(&peer(100, Some(at(8)))), now(15), T),
            None
        );
    }

    #[test]
    fn forgotten_peers_start_over() {
        let mut a = Activity::default();
        let k = Key([4; 32]);
        a.observe("e", &k, None, now(0), T);
        a.retain("e", &HashSet::new());
        assert_eq!(a.observe("e", &k, None, now(5), T), None);
    }

    /// A member that led an egress, lost it and takes it back: its last look at a peer was
    /// before it lost the egress. Taking over restarts the clock; without that the live
    /// peer would be collected at the first look.
    #[test]
    fn a_takeover_restarts_the_clock() {
        let k = Key([6; 32]);
        let watched = |a: &mut Activity| {
            for s in (0..=20).step_by(5) {
                assert_eq!(
                    a.observe("e", &k, Some(&peer(10 + s, Some(at(0)))), now(s), T),
                    None
                );
            }
        };
        // Not leading from 20 to 100; the peer handshook with the other member meanwhile.
        // This member's device saw none of that: its counters are where they were.
        let seen_again = peer(30, Some(at(0)));
        let mut stale = Activity::default();
        watched(&mut stale);
        assert_eq!(
            stale.observe("e", &k, Some(&seen_again), now(100), T),
            Some(Idle::Silent(T.peer)),
            "the defect: collected at once"
        );
        let mut a = Activity::default();
        watched(&mut a);
        a.observe("f", &k, Some(&peer(0, None)), now(20), T);
        a.restart("e");
        assert_eq!(a.observe("e", &k, Some(&seen_again), now(100), T), None);
        assert_eq!(a.observe("e", &k, Some(&seen_again), now(109), T), None);
        // A peer that stays silent with this member goes a full timeout after the takeover.
        assert_eq!(
            a.observe("e", &k, Some(&seen_again), now(110), T),
            Some(Idle::Silent(T.peer))
        );
        // Other egresses keep their clocks.
        assert_eq!(
            a.observe("f", &k, Some(&peer(0, None)), now(25), T),
            Some(Idle::NeverHandshaken(T.first_handshake))
        );
    }

    #[test]
    fn a_recreated_device_restarts_the_clock() {
        let mut a = Activity::default();
        let k = Key([5; 32]);
        // Alive until 100: bytes move, a handshake at 90.
        for s in (0..=100).step_by(5) {
            assert_eq!(
                a.observe(
                    "e",
                    &k,
                    Some(&peer(100 + s, Some(at(90.min(s))))),
                    now(s),
                    T
                ),
                None
            );
        }
        // At 101 the device is made anew: counters at zero, no handshake. Not collected
        // at once, but first_handshake_timeout later if nothing comes.
        assert_eq!(a.observe("e", &k, Some(&peer(0, None)), now(101), T), None);
        assert_eq!(a.observe("e", &k, Some(&peer(0, None)), now(105), T), None);
        assert_eq!(
            a.observe("e", &k, Some(&peer(0, None)), now(106), T),
            Some(Idle::NeverHandshaken(T.first_handshake))
        );
        // A peer missing from the device (about to be re-added) restarts it too.
        let mut b = Activity::default();
        b.observe("e", &k, Some(&peer(10, Some(at(0)))), now(0), T);
        assert_eq!(b.observe("e", &k, None, now(9), T), None);
        assert_eq!(b.observe("e", &k, Some(&peer(0, None)), now(13), T), None);
        // ... and a handshake after the re-add is life.
        assert_eq!(
            b.observe("e", &k, Some(&peer(148, Some(at(14)))), now(15), T),
            None
        );
        assert_eq!(
            b.observe("e", &k, Some(&peer(148, Some(at(14)))), now(23), T),
            None
        );
        assert_eq!(
            b.observe("e", &k, Some(&peer(148, Some(at(14)))), now(25), T),
            Some(Idle::Silent(T.peer))
        );
    }
}
