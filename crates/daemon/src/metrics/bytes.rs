//! Bytes through a space's device as counters that only go up.
//!
//! A WireGuard device counts bytes per peer, and a peer's counters go when its lease does, so
//! the sum over the device's peers falls whenever a peer leaves. The tally remembers each
//! peer's counters from the last look and adds only what grew since; a peer seen for the
//! first time adds all it has, a counter found smaller (the peer was removed and added again)
//! counts from zero. Bytes of a peer that came and went between two looks are not seen.

use std::collections::HashMap;

use crate::space::Space;
use wgexit::keys::Key;

/// How much a counter grew from `before` to `now`: all of `now` when it is smaller (it
/// started again from zero in between).
pub fn grown(now: u64, before: u64) -> u64 {
    now.checked_sub(before).unwrap_or(now)
}

/// A peer's (received, transmitted) counters.
pub type PeerBytes = (u64, u64);

#[derive(Debug, Default)]
pub struct ByteTally {
    last: HashMap<(Space, Key), PeerBytes>,
}

impl ByteTally {
    /// Takes `space`'s peers as the device shows them now; returns how many bytes were
    /// received and transmitted since the last look.
    pub fn observe(&mut self, space: &Space, peers: &[(Key, PeerBytes)]) -> PeerBytes {
        let mut grown = (0u64, 0u64);
        let mut seen = HashMap::with_capacity(peers.len());
        for &(key, (rx, tx)) in peers {
            let (last_rx, last_tx) = self
                .last
                .get(&(space.clone(), key))
                .copied()
                .unwrap_or((0, 0));
            grown.0 = grown.0.saturating_add(self::grown(rx, last_rx));
            grown.1 = grown.1.saturating_add(self::grown(tx, last_tx));
            seen.insert((space.clone(), key), (rx, tx));
        }
        self.last.retain(|(s, _), _| s != space);
        self.last.extend(seen);
        grown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_what_each_peer_added_and_never_falls() {
        let (a, b) = (Key([1; 32]), Key([2; 32]));
        let mut t = ByteTally::default();
        let (e, f) = (Space::Egress("e".into()), Space::Network("e".into()));
        assert_eq!(t.observe(&e, &[(a, (100, 10))]), (100, 10));
        assert_eq!(t.observe(&e, &[(a, (150, 10)), (b, (5, 5))]), (55, 5));
        // a leaves: nothing is taken back.
        assert_eq!(t.observe(&e, &[(b, (7, 5))]), (2, 0));
        // a comes back with fresh counters.
        assert_eq!(t.observe(&e, &[(a, (3, 1)), (b, (7, 5))]), (3, 1));
        // b restarted between looks: counted from zero.
        assert_eq!(t.observe(&e, &[(a, (3, 1)), (b, (1, 1))]), (1, 1));
        // A network of the same name is tallied apart.
        assert_eq!(t.observe(&f, &[(a, (3, 1))]), (3, 1));
        assert_eq!(t.observe(&e, &[(a, (3, 1)), (b, (1, 1))]), (0, 0));
    }
}
