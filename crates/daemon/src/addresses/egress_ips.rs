//! An egress's set of static IPv4 egress IPs and how leases are spread over them.
//!
//! The overlay pool is split into one sub-block per egress IP (the pool halved as often as
//! it takes to have a block for each IP; blocks beyond the last IP are not leased from),
//! and a lease's address is allocated inside the block of the IP it is given. The egress IP
//! of a lease is thus a function of its address: it survives restarts with nothing stored,
//! and the firewall's SNAT map from block to IP needs no change per lease.
//!
//! `spread` gives a new lease the IP with the fewest leases; `exclusive` only an IP no
//! lease holds, refusing the lease when there is none.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

/// Each egress IP's block holds at least this many addresses (a /29).
pub const MIN_BLOCK_PREFIX: u8 = 29;

/// How new leases are given an egress IP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Assign {
    /// The IP with the fewest leases.
    #[default]
    Spread,
    /// An IP no other lease holds; refused when none is free.
    Exclusive,
}

impl Assign {
    pub fn parse(s: &str) -> Option<Assign> {
        match s {
            "spread" => Some(Assign::Spread),
            "exclusive" => Some(Assign::Exclusive),
            _ => None,
        }
    }
}

/// The egress IPs of one egress (at least one, no repeats) and how they are assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressIps {
    ips: Vec<Ipv4Addr>,
    pub assign: Assign,
}

impl EgressIps {
    /// `None` when `ips` is empty.
    pub fn new(ips: Vec<Ipv4Addr>, assign: Assign) -> Option<EgressIps> {
        (!ips.is_empty()).then_some(EgressIps { ips, assign })
    }

    /// One IP, spread (today's `ip = ...`).
    pub fn single(ip: Ipv4Addr) -> EgressIps {
        EgressIps {
            ips: vec![ip],
            assign: Assign::Spread,
        }
    }

    pub fn ips(&self) -> &[Ipv4Addr] {
        &self.ips
    }

    /// The IP old clients are told of: the first.
    pub fn first(&self) -> Ipv4Addr {
        self.ips[0]
    }

    /// Each IP's block of `pool`, in the order of the IPs.
    pub fn blocks(&self, pool: Ipv4Net) -> Vec<(Ipv4Net, Ipv4Addr)> {
        let prefix = (pool.prefix_len() + split_bits(self.ips.len())).min(32);
        pool.subnets(prefix)
            .map(|subnets| subnets.zip(self.ips.iter().copied()).collect())
            .unwrap_or_default()
    }

    /// Whether `pool` gives every IP a block of at least a /29.
    pub fn fit(&self, pool: Ipv4Net) -> bool {
        pool.prefix_len() + split_bits(self.ips.len()) <= MIN_BLOCK_PREFIX
    }

    /// The smallest pool prefix length that fits `n` IPs.
    pub fn widest_prefix_for(n: usize) -> u8 {
        MIN_BLOCK_PREFIX.saturating_sub(split_bits(n))
    }
}

/// How many times a pool is halved to give `n` blocks.
fn split_bits(n: usize) -> u8 {
    n.max(1).next_power_of_two().trailing_zeros() as u8
}

/// Every IP is held by a lease and `assign` is exclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted(pub Vec<Ipv4Addr>);

/// The egress IPs of one egress with how many live leases each carries: what the registry
/// asks where to allocate a new lease.
#[derive(Debug, Clone)]
pub struct IpUsage {
    assign: Assign,
    blocks: Vec<(Ipv4Net, Ipv4Addr)>,
    leases: Vec<usize>,
}

impl IpUsage {
    pub fn new(ips: &EgressIps, pool: Ipv4Net) -> IpUsage {
        let blocks = ips.blocks(pool);
        IpUsage {
            assign: ips.assign,
            leases: vec![0; blocks.len()],
            blocks,
        }
    }

    /// Which IP's block `addr` lies in, by the IPs' order.
    pub fn index_of(&self, addr: IpAddr) -> Option<usize> {
        let IpAddr::V4(a) = addr else {
            return None;
        };
        self.blocks.iter().position(|(net, _)| net.contains(&a))
    }

    /// The egress IP a lease at `addr` leaves from; `None` outside every block.
    pub fn ip_of(&self, addr: IpAddr) -> Option<Ipv4Addr> {
        self.index_of(addr).map(|i| self.blocks[i].1)
    }

    /// Counts a lease at `addr`.
    pub fn add(&mut self, addr: IpAddr) {
        if let Some(i) = self.index_of(addr) {
            self.leases[i] += 1;
        }
    }

    /// Stops counting a lease at `addr`.
    pub fn remove(&mut self, addr: IpAddr) {
        if let Some(i) = self.index_of(addr) {
            self.leases[i] = self.leases[i].saturating_sub(1);
        }
    }

    /// The blocks a new lease may be allocated in, best first: by fewest leases (spread),
    /// or those no lease holds (exclusive; refused when there are none).
    pub fn candidates(&self) -> Result<Vec<Ipv4Net>, Exhausted> {
        let mut order: Vec<usize> = (0..self.blocks.len()).collect();
        if self.assign == Assign::Exclusive {
            order.retain(|&i| self.leases[i] == 0);
            if order.is_empty() {
                return Err(Exhausted(self.blocks.iter().map(|b| b.1).collect()));
            }
        }
        order.sort_by_key(|&i| (self.leases[i], i));
        Ok(order.into_iter().map(|i| self.blocks[i].0).collect())
    }

    /// The blocks leases are allocated in, in the order of the IPs.
    pub fn blocks(&self) -> Vec<Ipv4Net> {
        self.blocks.iter().map(|(net, _)| *net).collect()
    }

    /// Each IP with its lease count, in the config's order.
    pub fn usage(&self) -> Vec<(Ipv4Addr, usize)> {
        self.blocks
            .iter()
            .zip(&self.leases)
            .map(|((_, ip), n)| (*ip, *n))
            .collect()
    }

    /// How many leases there can be at most, given `leasable` addresses in the blocks.
    pub fn capacity(&self, leasable: usize) -> usize {
        match self.assign {
            Assign::Spread => leasable,
            Assign::Exclusive => self.blocks.len().min(leasable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str], assign: Assign) -> EgressIps {
        EgressIps::new(list.iter().map(|s| s.parse().unwrap()).collect(), assign).unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const THREE: [&str; 3] = ["203.0.113.80", "203.0.113.81", "203.0.113.82"];

    #[test]
    fn three_ips_split_a_24_into_quarters_and_use_the_first_three() {
        let e = ips(&THREE, Assign::Spread);
        let blocks = e.blocks(net("100.96.0.0/24"));
        let want: Vec<(Ipv4Net, Ipv4Addr)> = [
            ("100.96.0.0/26", THREE[0]),
            ("100.96.0.64/26", THREE[1]),
            ("100.96.0.128/26", THREE[2]),
        ]
        .iter()
        .map(|(n, ip)| (net(n), ip.parse().unwrap()))
        .collect();
        assert_eq!(blocks, want);
        // One IP: the whole pool, as before IP sets.
        let one = EgressIps::single("203.0.113.77".parse().unwrap());
        assert_eq!(
            one.blocks(net("100.96.0.0/24")),
            vec![(net("100.96.0.0/24"), "203.0.113.77".parse().unwrap())]
        );
        let u = IpUsage::new(&e, net("100.96.0.0/24"));
        assert_eq!(
            u.ip_of(addr("100.96.0.70")),
            Some(THREE[1].parse().unwrap())
        );
        assert_eq!(u.ip_of(addr("100.96.0.200")), None, "the unused quarter");
        assert_eq!(u.ip_of(addr("100.97.0.1")), None);
    }

    #[test]
    fn each_ip_needs_a_29() {
        let e = ips(&THREE, Assign::Spread);
        assert!(e.fit(net("100.96.0.0/27")));
        assert!(!e.fit(net("100.96.0.0/28")));
        assert_eq!(EgressIps::widest_prefix_for(3), 27);
        assert_eq!(EgressIps::widest_prefix_for(1), 29);
        assert_eq!(EgressIps::widest_prefix_for(64), 23);
        assert!(EgressIps::single(THREE[0].parse().unwrap()).fit(net("100.96.0.0/29")));
    }

    #[test]
    fn spread_prefers_the_ip_with_fewest_leases() {
        let mut u = IpUsage::new(&ips(&THREE, Assign::Spread), net("100.96.0.0/24"));
        for _ in 0..30 {
            let best = u.candidates().unwrap()[0];
            u.add(IpAddr::V4(best.network()));
        }
        let counts: Vec<usize> = u.usage().iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, vec![10, 10, 10]);
        u.remove(addr("100.96.0.64"));
        assert_eq!(u.candidates().unwrap()[0], net("100.96.0.64/26"));
    }

    #[test]
    fn exclusive_refuses_when_every_ip_is_held() {
        let mut u = IpUsage::new(&ips(&THREE, Assign::Exclusive), net("100.96.0.0/24"));
        for _ in 0..3 {
            let c = u.candidates().unwrap();
            u.add(IpAddr::V4(c[0].network()));
        }
        let Err(Exhausted(held)) = u.candidates() else {
            panic!("a fourth lease was given an IP");
        };
        assert_eq!(held.len(), 3);
        u.remove(addr("100.96.0.130"));
        assert_eq!(u.candidates().unwrap(), vec![net("100.96.0.128/26")]);
        assert_eq!(u.capacity(186), 3);
    }
}
