//! What a network's resolver did, counted where it decides: queries answered from the
//! network's own names (including NXDOMAIN and empty answers), refused (the asker is no
//! member, or a name is for upstreams and there are none), and forwarded upstream. Atomic
//! counters, shared by the resolver and the status snapshot; they only go up.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// One network's resolver counters.
#[derive(Debug, Default)]
pub struct DnsCounts {
    answered: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
}

/// The counters as read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsTotals {
    /// Answered from the network's names (records, no data, or NXDOMAIN).
    pub answered: u64,
    /// Refused.
    pub refused: u64,
    /// Passed to an upstream (whatever it answered).
    pub forwarded: u64,
}

impl DnsCounts {
    pub fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn forwarded(&self) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    pub fn totals(&self) -> DnsTotals {
        DnsTotals {
            answered: self.answered.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
        }
    }
}
