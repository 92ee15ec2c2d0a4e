//! File descriptors: the soft limit raised to the hard one at start, and the share of it
//! API connections may take, so that a flood of connections never leaves the daemon without
//! descriptors for what must go on (WireGuard's UAPI sockets, `nft`, etcd, the store).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors kept for everything but API connections and DNS: UAPI sockets and
/// wireguard-go's pipes, `nft` runs, etcd's connections, the store, token files, listeners.
pub const RESERVE: u64 = 256;

/// Where the kernel caps any process's descriptors when the hard limit is "unlimited".
const NR_OPEN: &str = "/proc/sys/fs/nr_open";

/// Raises the soft `RLIMIT_NOFILE` to the hard one; the limit in force afterwards.
pub fn raise_limit() -> Result<u64, nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let ceiling = std::fs::read_to_string(NR_OPEN)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(ceiling);
    if soft >= target {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    Ok(target)
}

/// The soft limit in force (1,024, the usual default, when it cannot be read).
pub fn limit() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// How many API connections `limit` leaves room for: half of what [`RESERVE`] leaves, the
/// other half for over-cap refusals, DNS and forwarded queries.
pub fn api_connections(limit: u64) -> usize {
    usize::try_from(limit.saturating_sub(RESERVE) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// What each source address holds (connections, queries), each released when its
/// [`SourceSlot`] drops: so that no one source takes all of a bounded resource.
#[derive(Default)]
pub struct PerSource {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One held thing's place in its source's count.
pub struct SourceSlot {
    sources: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    /// A slot for `ip` unless it holds `max` already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut held = self.held.lock().ok()?;
        let n = held.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.sources.held.lock() {
            if let Some(n) = held.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_holds_at_most_its_share_until_it_lets_go() {
        let sources = Arc::new(PerSource::default());
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "2001:db8::7".parse().unwrap();
        let first = sources.take(a, 2).unwrap();
        let _second = sources.take(a, 2).unwrap();
        assert!(sources.take(a, 2).is_none());
        assert!(
            sources.take(b, 2).is_some(),
            "another source is not held back"
        );
        drop(first);
        assert!(sources.take(a, 2).is_some());
    }

    #[test]
    fn api_connections_leave_the_reserve_and_half_the_rest() {
        assert_eq!(api_connections(1024), 384);
        assert_eq!(api_connections(65536), 32640);
        assert_eq!(api_connections(100), 1);
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let limit = raise_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, limit);
        assert!(soft <= hard);
    }
}
