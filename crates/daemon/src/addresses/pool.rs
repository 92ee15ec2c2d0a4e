//! Address allocation inside an egress's overlay pool.
//!
//! Never handed out: the network address, the first host (the exit node's own overlay
//! address) and the broadcast address. Allocation walks forward from where the last one
//! stopped, so a just-released address is the last to be reused.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

#[derive(Debug, Clone)]
pub struct Pool {
    net: Ipv4Net,
    used: BTreeSet<u32>,
    cursor: u32,
    /// Where [`Pool::start_at`] moved allocation to, from a range's first address.
    offset: usize,
    /// Where the next allocation in each block (by its first address) starts looking.
    block_cursors: HashMap<u32, u32>,
}

impl Pool {
    pub fn new(net: Ipv4Net) -> Pool {
        let first = Pool::first_leasable(net);
        Pool {
            net,
            used: BTreeSet::new(),
            cursor: first,
            offset: 0,
            block_cursors: HashMap::new(),
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
        self.offset = offset;
        self.block_cursors.clear();
    }

    /// The leasable addresses of `block` (a part of the pool), first and last; `None` when
    /// it has none.
    fn leasable_in(&self, block: Ipv4Net) -> Option<(u32, u32)> {
        let lo = u32::from(block.network()).max(Pool::first_leasable(self.net));
        let hi = u32::from(block.broadcast()).min(Pool::last_leasable(self.net));
        (lo <= hi).then_some((lo, hi))
    }

    /// How many addresses of `block` may be leased at all.
    pub fn capacity_in(&self, block: Ipv4Net) -> usize {
        self.leasable_in(block)
            .map_or(0, |(lo, hi)| (hi - lo + 1) as usize)
    }

    /// Takes the next free address inside `block`, or `None` when it has none free. Each
    /// block walks forward on its own, so a just-released address is the last reused.
    pub fn allocate_in(&mut self, block: Ipv4Net) -> Option<Ipv4Addr> {
        let (lo, hi) = self.leasable_in(block)?;
        let key = u32::from(block.network());
        let span = (hi - lo + 1) as usize;
        let start = *self
            .block_cursors
            .entry(key)
            .or_insert(lo + (self.offset % span) as u32);
        let start = start.clamp(lo, hi);
        let found = gap_in(&self.used, start, hi).or_else(|| gap_in(&self.used, lo, start))?;
        self.used.insert(found);
        self.block_cursors
            .insert(key, if found == hi { lo } else { found + 1 });
        Some(Ipv4Addr::from(found))
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
    fn allocation_in_a_block_stays_inside_it_and_skips_the_gateway() {
        let mut p = pool("100.96.0.0/24");
        let first: Ipv4Net = "100.96.0.0/26".parse().unwrap();
        let third: Ipv4Net = "100.96.0.128/26".parse().unwrap();
        assert_eq!(p.capacity_in(first), 62, "no network address, no gateway");
        assert_eq!(
            p.capacity_in(third),
            64,
            "a block's ends are hosts of the pool"
        );
        let got: Vec<_> = std::iter::from_fn(|| p.allocate_in(first)).collect();
        assert_eq!(got.len(), 62);
        assert!(got.iter().all(|a| first.contains(a)));
        assert!(!got.contains(&Pool::gateway(p.net())));
        assert_eq!(p.allocate_in(third), Some(Ipv4Addr::new(100, 96, 0, 128)));
        // A released address comes back last within its block.
        p.release(Ipv4Addr::new(100, 96, 0, 128).into());
        assert_eq!(p.allocate_in(third), Some(Ipv4Addr::new(100, 96, 0, 129)));
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
