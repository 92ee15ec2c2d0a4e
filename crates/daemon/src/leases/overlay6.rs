//! The overlay IPv6 addresses of one egress's leases (an egress with `ip6`/`ips6` and
//! `pool6`): one [`Pool6`] per egress IPv6's block of `pool6`, so an address tells which
//! egress IPv6 its traffic leaves from (see [`crate::config::egress6`]). A lease's
//! address is derived from its public key inside the block of the IPv6 that follows its
//! egress IPv4; it is released with the lease.

use std::net::{IpAddr, Ipv6Addr};

use super::pool6::Pool6;
use crate::config::egress6::EgressV6;
use wgexit::keys::Key;

#[derive(Debug, Clone)]
pub struct Overlay6 {
    config: EgressV6,
    /// One pool per block, in the order of the egress IPv6s.
    blocks: Vec<Pool6>,
    /// Live leases per egress IPv6, in the same order.
    leases: Vec<usize>,
}

impl Overlay6 {
    pub fn new(config: &EgressV6) -> Overlay6 {
        let blocks: Vec<Pool6> = config
            .blocks()
            .into_iter()
            .map(|(net, _)| Pool6::new(net))
            .collect();
        Overlay6 {
            config: config.clone(),
            leases: vec![0; blocks.len()],
            blocks,
        }
    }

    pub fn pool(&self) -> ipnet::Ipv6Net {
        self.config.pool
    }

    fn block_of(&self, addr: IpAddr) -> Option<usize> {
        self.blocks.iter().position(|b| b.leasable(addr))
    }

    /// An address for `key`, in the block of the egress IPv6 that follows the lease's
    /// `v4_index`th egress IPv4; `None` when that block is full.
    pub fn allocate(&mut self, v4_index: usize, key: &Key) -> Option<Ipv6Addr> {
        let i = self.config.index_for(v4_index);
        let addr = self.blocks.get_mut(i)?.allocate(key)?;
        self.leases[i] += 1;
        Some(addr)
    }

    /// Records a stored lease's address as taken. False when it is outside every block or
    /// taken already.
    pub fn mark_used(&mut self, addr: Ipv6Addr) -> bool {
        let Some(i) = self.block_of(addr.into()) else {
            return false;
        };
        let marked = self.blocks[i].mark_used(addr.into());
        if marked {
            self.leases[i] += 1;
        }
        marked
    }

    pub fn release(&mut self, addr: Ipv6Addr) {
        if let Some(i) = self.block_of(addr.into()) {
            self.blocks[i].release(addr.into());
            self.leases[i] = self.leases[i].saturating_sub(1);
        }
    }

    /// Each egress IPv6 with how many leases leave from it.
    pub fn usage(&self) -> Vec<(Ipv6Addr, usize)> {
        self.config
            .ips
            .iter()
            .copied()
            .zip(self.leases.iter().copied())
            .collect()
    }

    /// How many addresses are taken in all.
    pub fn in_use(&self) -> usize {
        self.blocks.iter().map(Pool6::in_use).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(ips: &[&str]) -> Overlay6 {
        Overlay6::new(&EgressV6 {
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            pool: "fd77:0:1::/64".parse().unwrap(),
        })
    }

    #[test]
    fn an_address_lies_in_the_block_of_the_ipv6_that_follows_the_ipv4() {
        let mut o = overlay(&["2001:db8::80", "2001:db8::81"]);
        let a = o.allocate(1, &Key([1; 32])).unwrap();
        assert_eq!(o.config.ip_of(a.into()), Some(o.config.ips[1]));
        // A third IPv4 (index 2) wraps to the first IPv6.
        let b = o.allocate(2, &Key([2; 32])).unwrap();
        assert_eq!(o.config.ip_of(b.into()), Some(o.config.ips[0]));
        assert_eq!(o.usage().iter().map(|u| u.1).collect::<Vec<_>>(), [1, 1]);
        // The gateway <pool6>::1 is never leased; a lease's address is freed with it.
        assert!(!o.mark_used("fd77:0:1::1".parse().unwrap()));
        assert!(!o.mark_used(a));
        o.release(a);
        assert_eq!(o.in_use(), 1);
        assert_eq!(o.allocate(1, &Key([1; 32])), Some(a));
    }

    #[test]
    fn one_ipv6_takes_every_lease() {
        let mut o = overlay(&["2001:db8::77"]);
        for n in 0..5u8 {
            let a = o.allocate(usize::from(n), &Key([n + 1; 32])).unwrap();
            assert!(o.pool().contains(&a));
        }
        assert_eq!(o.usage()[0].1, 5);
    }
}
