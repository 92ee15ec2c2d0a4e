//! What a network's resolver did, counted where it decides: queries answered from the
//! network's own names (including NXDOMAIN and empty answers), refused (the asker is no
//! member, or a name is for upstreams and there are none), and forwarded upstream. The
//! counters are `/metrics`' own (`wgexit_network_dns_queries`), shared with the resolver:
//! one atomic add per query, read by the status snapshot too.

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// One network's resolver counters.
#[derive(Debug, Clone, Default)]
pub struct DnsCounts {
    pub answered: Counter,
    pub refused: Counter,
    pub forwarded: Counter,
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
        self.answered.inc();
    }

    pub fn refused(&self) {
        self.refused.inc();
    }

    pub fn forwarded(&self) {
        self.forwarded.inc();
    }

    pub fn totals(&self) -> DnsTotals {
        DnsTotals {
            answered: self.answered.get(),
            refused: self.refused.get(),
            forwarded: self.forwarded.get(),
        }
    }
}
