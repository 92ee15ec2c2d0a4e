//! Address allocation inside an egress's overlay pool.
//!
//! Never handed out: the network address, the first host (the exit node's own overlay
//! address) and the broadcast address. Allocation walks forward from where the last one
//! stopped, so a just-released address is the last to be reused.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

#[derive(Debug, Clone)]
pub struct Pool {
    net: Ipv4Net,
    used: BTreeSet<u32>,
    cursor: u32,
}

impl Pool {
    pub fn new(net: Ipv4Net) -> Pool {
        let first = Pool::first_leasable(net);
        Pool {
            net,
            used: BTreeSet::new(),
            cursor: first,
        }
    }

    /// The exit node's own address in `net`: its first host. Never leased.
    pub fn gateway(net: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(net.network()) + 1)
    }

    fn first_leasable(net: Ipv4Net) -> u32 {
        u32::from(Pool::gateway(net)) + 1
    }

    /// The network addresses are leased from.
    pub fn net(&self) -> Ipv4Net {
        self.net
    }

    fn last_leasable(net: Ipv4Net) -> u32 {
        u32::from(net.broadcast()) - 1
    }

    /// How many addresses the pool can lease in all.
    pub fn capacity(&self) -> usize {
        (Pool::last_leasable(self.net) + 1 - Pool::first_leasable(self.net)) as usize
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    /// Whether `addr` may be leased from this pool at all.
    pub fn leasable(&self, addr: IpAddr) -> bool {
        let IpAddr::V4(a) = addr else {
            return false;
        };
        (Pool::first_leasable(self.net)..=Pool::last_leasable(self.net)).contains(&u32::from(a))
    }

    /// Records `addr` as taken (when loading stored leases). False if it cannot be leased
    /// or is taken already.
    pub fn mark_used(&mut self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) if self.leasable(addr) => self.used.insert(u32::from(a)),
            _ => false,
        }
    }

    pub fn release(&mut self, addr: IpAddr) {
        if let IpAddr::V4(a) = addr {
            self.used.remove(&u32::from(a));
        }
    }

    /// Moves where the next allocation starts looking to `offset` (modulo the pool's
    /// size) from its first leasable address.
    pub fn start_at(&mut self, offset: usize) {
        let first = Pool::first_leasable(self.net);
        self.cursor = first + (offset % self.capacity().max(1)) as u32;
    }

    /// Takes the next free address, or `None` when the pool is full.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let first = Pool::first_leasable(self.net);
        let last = Pool::last_leasable(self.net);
        if self.used.len() >= self.capacity() {
            return None;
        }
        let start = self.cursor.clamp(first, last);
        // The first gap at or after `start`, else the first gap from the beginning.
        let found = gap_in(&self.used, start, last).or_else(|| gap_in(&self.used, first, start))?;
        self.used.insert(found);
        self.cursor = if found == last { first } else { found + 1 };
        Some(Ipv4Addr::from(found))
    }
}

/// The lowest value in `from..=to` not in `used`.
fn gap_in(used: &BTreeSet<u32>, from: u32, to: u32) -> Option<u32> {
    let mut candidate = from;
    for &u in used.range(from..=to) {
        if u != candidate {
            break;
        }
        if candidate == to {
            return None;
        }
        candidate += 1;
    }
    (candidate <= to && !used.contains(&candidate)).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str) -> Pool {
        Pool::new(s.parse().unwrap())
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let mut p = pool("100.96.0.0/29");
        assert_eq!(p.capacity(), 5);
        let got: Vec<_> = std::iter::from_fn(|| p.allocate()).collect();
        let want: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(100, 96, 0, i)).collect();
        assert_eq!(got, want);
        assert_eq!(p.allocate(), None);
        assert_eq!(Pool::gateway(p.net()), Ipv4Addr::new(100, 96, 0, 1));
        for host in [0, 1, 7] {
            assert!(!p.leasable(Ipv4Addr::new(100, 96, 0, host).into()));
        }
    }

    #[test]
    fn released_addresses_are_reused_last() {
        let mut p = pool("100.96.0.0/29");
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.release(a.into());
        let c = p.allocate().unwrap();
        assert_ne!(c, a);
        assert_ne!(c, b);
        // Fill up; the released one comes back only when nothing else is free.
        let rest: Vec<_> = std::iter::from_fn(|| p.allocate()).collect();
        assert_eq!(rest.last(), Some(&a));
    }

    #[test]
    fn never_hands_out_an_address_twice() {
        let mut p = pool("100.96.0.0/24");
        assert!(p.mark_used(Ipv4Addr::new(100, 96, 0, 2).into()));
        assert!(!p.mark_used(Ipv4Addr::new(100, 96, 0, 2).into()));
        assert!(p.mark_used(Ipv4Addr::new(100, 96, 0, 9).into()));
        let mut seen = BTreeSet::new();
        while let Some(a) = p.allocate() {
            assert!(seen.insert(a), "{a} twice");
            assert_ne!(a, Ipv4Addr::new(100, 96, 0, 2));
            assert_ne!(a, Ipv4Addr::new(100, 96, 0, 9));
        }
        assert_eq!(seen.len(), p.capacity() - 2);
    }

    #[test]
    fn large_pool_allocates_without_scanning_everything() {
        let mut p = pool("100.64.0.0/14");
        for _ in 0..60_000 {
            p.allocate().unwrap();
        }
        assert_eq!(p.in_use(), 60_000);
    }
}
