//! Idle-lease collection: which leases belong to peers that have gone away.
//!
//! A peer is alive while the exit node hears from it. Handshakes alone are too coarse (a
//! session rekeys only every two minutes), so the collector also watches each peer's
//! received-bytes counter: the keepalive the exit node hands out (`persistent_keepalive`)
//! moves it every few seconds for as long as the container's host is up.
//!
//! * A peer that was ever heard from is idle once neither a handshake nor received bytes
//!   have been seen for `peer_timeout`.
//! * A peer never heard from (no handshake, nothing received) is idle `first_handshake_timeout`
//!   after this process first looked at it.
//!
//! What this process has not watched itself it does not hold against a peer: after a restart
//! every peer gets the full timeout again, counted from the restart (a host that vanished
//! while the daemon was down is collected one timeout after the daemon is back).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::keys::Key;
use crate::wg::PeerStatus;

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

#[derive(Debug)]
struct Seen {
    rx_bytes: u64,
    first_seen: SystemTime,
    active_at: SystemTime,
}

/// What the collector has observed of each peer, by (egress, public key).
#[derive(Debug, Default)]
pub struct Activity {
    seen: HashMap<(String, Key), Seen>,
}

fn later(a: SystemTime, b: Option<SystemTime>) -> SystemTime {
    match b {
        Some(b) if b > a => b,
        _ => a,
    }
}

impl Activity {
    /// Records what the device says about `key`'s peer at `now` (`None`: the device has no
    /// such peer right now) and says whether its lease is to be collected.
    pub fn observe(
        &mut self,
        egress: &str,
        key: &Key,
        peer: Option<&PeerStatus>,
        now: SystemTime,
        timeouts: Timeouts,
    ) -> Option<Idle> {
        let rx_bytes = peer.map_or(0, |p| p.rx_bytes);
        let handshake = peer.and_then(|p| p.last_handshake);
        let seen = self.seen.entry((egress.to_string(), *key)).or_insert(Seen {
            rx_bytes,
            first_seen: now,
            active_at: now,
        });
        if rx_bytes != seen.rx_bytes {
            seen.rx_bytes = rx_bytes;
            seen.active_at = now;
        }
        let elapsed = |since: SystemTime| now.duration_since(since).unwrap_or_default();
        if handshake.is_some() || rx_bytes > 0 {
            let last = later(later(seen.first_seen, Some(seen.active_at)), handshake);
            (elapsed(last) >= timeouts.peer).then_some(Idle::Silent(timeouts.peer))
        } else {
            (elapsed(seen.first_seen) >= timeouts.first_handshake)
                .then_some(Idle::NeverHandshaken(timeouts.first_handshake))
        }
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

    #[test]
    fn keepalives_keep_a_peer_whose_handshake_is_old() {
        let mut a = Activity::default();
        let k = Key([1; 32]);
        let hs = Some(at(0));
        for s in (0..60).step_by(3) {
            // Only the byte counter moves; the handshake stays at 0.
            assert_eq!(a.observe("e", &k, Some(&peer(32 * s, hs)), at(s), T), None);
        }
        // Silence: collected once peer_timeout has passed since bytes last moved (57).
        assert_eq!(
            a.observe("e", &k, Some(&peer(32 * 57, hs)), at(60), T),
            None
        );
        assert_eq!(
            a.observe("e", &k, Some(&peer(32 * 57, hs)), at(67), T),
            Some(Idle::Silent(T.peer))
        );
    }

    #[test]
    fn a_peer_never_heard_from_goes_after_the_first_handshake_timeout() {
        let mut a = Activity::default();
        let k = Key([2; 32]);
        assert_eq!(a.observe("e", &k, None, at(0), T), None);
        assert_eq!(a.observe("e", &k, Some(&peer(0, None)), at(4), T), None);
        assert_eq!(
            a.observe("e", &k, Some(&peer(0, None)), at(5), T),
            Some(Idle::NeverHandshaken(T.first_handshake))
        );
        // The same peer in another egress is another lease.
        assert_eq!(a.observe("f", &k, None, at(5), T), None);
    }

    #[test]
    fn after_a_restart_old_history_counts_from_the_first_look() {
        let mut a = Activity::default();
        let k = Key([3; 32]);
        // The last handshake was an hour before this process started.
        let old = Some(at(0));
        assert_eq!(a.observe("e", &k, Some(&peer(100, old)), at(3600), T), None);
        assert_eq!(a.observe("e", &k, Some(&peer(100, old)), at(3609), T), None);
        assert_eq!(
            a.observe("e", &k, Some(&peer(100, old)), at(3610), T),
            Some(Idle::Silent(T.peer))
        );
        // A fresh handshake counts even if bytes did not move.
        let mut b = Activity::default();
        b.observe("e", &k, Some(&peer(100, old)), at(0), T);
        assert_eq!(
            b.observe("e", &k, Some(&peer(100, Some(at(8)))), at(15), T),
            None
        );
    }

    #[test]
    fn forgotten_peers_start_over() {
        let mut a = Activity::default();
        let k = Key([4; 32]);
        a.observe("e", &k, None, at(0), T);
        a.retain("e", &HashSet::new());
        assert_eq!(a.observe("e", &k, None, at(5), T), None);
    }
}
