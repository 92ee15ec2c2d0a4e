//! `max_leases_per_owner`: how many leases one owner (a token, or a named token's name) may
//! hold in one egress.
//!
//! Left out, each owner gets a fair share: the egress's capacity divided by the number of
//! owners its token file names, so no token can fill a pool others share (one that keeps
//! leasing random keys, whose leases live until `first_handshake_timeout`, stops at its
//! share). Set, it is one number for every egress; one no pool could ever hold (more than
//! the largest pool leases) is refused, and in an egress whose pool is smaller than it an owner
//! is bounded by the pool alone.

use super::{ConfigError, EgressConfig, Invalid};
use crate::addresses::pool::Pool;

/// The quota a private network's members get when none is set: a network's /48 or /64 has
/// room far beyond any share.
pub const NETWORK_DEFAULT: usize = 16384;

/// `max_leases_per_owner`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseQuota {
    /// Set in the config: the same for every owner of every egress.
    Fixed(usize),
    /// Left out: an equal share of each egress's capacity per owner.
    FairShare,
}

impl LeaseQuota {
    /// The most leases one of `owners` owners may hold in an egress of `capacity` leases.
    pub fn per_owner(self, capacity: usize, owners: usize) -> usize {
        match self {
            LeaseQuota::Fixed(n) => n,
            LeaseQuota::FairShare => (capacity / owners.max(1)).max(1),
        }
    }

    /// The most leases one owner may hold in a private network.
    pub fn per_network_owner(self) -> usize {
        match self {
            LeaseQuota::Fixed(n) => n,
            LeaseQuota::FairShare => NETWORK_DEFAULT,
        }
    }
}

/// `max_leases_per_owner` as written: at least 1, and no more than the largest pool holds.
pub(super) fn parse(
    raw: Option<usize>,
    egresses: &[EgressConfig],
    invalid: &Invalid,
) -> Result<LeaseQuota, ConfigError> {
    let key = || "max_leases_per_owner".to_string();
    let Some(n) = raw else {
        return Ok(LeaseQuota::FairShare);
    };
    if n == 0 {
        return Err(invalid(key(), "must be at least 1".into()));
    }
    let largest = egresses
        .iter()
        .map(|e| (Pool::new(e.pool).capacity(), e))
        .max_by_key(|(capacity, _)| *capacity);
    if let Some((capacity, e)) = largest.filter(|(capacity, _)| n > *capacity) {
        return Err(invalid(
            key(),
            format!(
                "{n} is more leases than any egress's pool holds (the largest, egress {:?}'s {}, holds {capacity}): no owner could ever reach it; lower it, or leave it out to give each token of an egress an equal share of its pool",
                e.name, e.pool
            ),
        ));
    }
    Ok(LeaseQuota::Fixed(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::egress;

    fn check(raw: Option<usize>) -> Result<LeaseQuota, ConfigError> {
        let egresses = [egress("a", "100.96.0.0/20"), egress("b", "100.97.0.0/24")];
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: "t.toml".into(),
            key,
            message,
        };
        parse(raw, &egresses, &invalid)
    }

    #[test]
    fn left_out_each_owner_gets_an_equal_share() {
        let q = check(None).unwrap();
        assert_eq!(q, LeaseQuota::FairShare);
        // A /20 pool leases 4093 addresses.
        assert_eq!(q.per_owner(4093, 1), 4093);
        assert_eq!(q.per_owner(4093, 2), 2046);
        assert_eq!(q.per_owner(4093, 3), 1364);
        assert_eq!(q.per_owner(13, 100), 1, "never none at all");
        assert_eq!(q.per_owner(13, 0), 13);
        assert_eq!(q.per_network_owner(), NETWORK_DEFAULT);
    }

    #[test]
    fn a_set_quota_holds_for_every_owner_and_must_fit_some_pool() {
        let q = check(Some(253)).unwrap();
        assert_eq!(q.per_owner(4093, 5), 253);
        assert_eq!(q.per_network_owner(), 253);
        // More than b's /24 but within a's /20: binding in a, b's pool bounds it there.
        assert_eq!(check(Some(4093)).unwrap(), LeaseQuota::Fixed(4093));
        let e = check(Some(4094)).unwrap_err().to_string();
        assert!(e.contains("max_leases_per_owner"), "{e}");
        assert!(e.contains("\"a\"") && e.contains("holds 4093"), "{e}");
        let e = check(Some(0)).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
    }
}
