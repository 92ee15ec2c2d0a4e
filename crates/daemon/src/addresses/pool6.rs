//! Address allocation inside a private network's IPv6 prefix.
//!
//! The first [`RESERVED`] addresses of the prefix belong to the gateway (`<prefix>::1`, the
//! resolver at `<prefix>::3`, room for more). A member's address is derived from its public
//! key (SHA-256 of the key and the prefix, cut to the prefix's host bits), so the same key
//! gets the same address again after a release, a restart or on another gateway of a pool;
//! on the rare collision the next derivation is tried.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::Ipv6Net;
use sha2::{Digest, Sha256};

use wgexit::keys::Key;

/// Addresses `<prefix>::0` to `<prefix>::ff` are never leased.
pub const RESERVED: u128 = 0x100;

/// How many derivations are tried before the prefix counts as full.
const TRIES: u32 = 64;

#[derive(Debug, Clone)]
pub struct Pool6 {
    net: Ipv6Net,
    used: BTreeSet<u128>,
}

impl Pool6 {
    pub fn new(net: Ipv6Net) -> Pool6 {
        Pool6 {
            net,
            used: BTreeSet::new(),
        }
    }

    pub fn net(&self) -> Ipv6Net {
        self.net
    }

    fn host_mask(&self) -> u128 {
        u128::MAX
            .checked_shr(u32::from(self.net.prefix_len()))
            .unwrap_or(0)
    }

    /// How many addresses can be leased in all (saturating).
    pub fn capacity(&self) -> usize {
        usize::try_from(self.host_mask().saturating_sub(RESERVED - 1)).unwrap_or(usize::MAX)
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    /// Whether `addr` may be leased from this prefix at all.
    pub fn leasable(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V6(a) => {
                self.net.contains(&a) && (u128::from(a) & self.host_mask()) >= RESERVED
            }
            IpAddr::V4(_) => false,
        }
    }

    /// Records `addr` as taken (when loading stored leases). False if it cannot be leased
    /// or is taken already.
    pub fn mark_used(&mut self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V6(a) if self.leasable(addr) => self.used.insert(u128::from(a)),
            _ => false,
        }
    }

    pub fn release(&mut self, addr: IpAddr) {
        if let IpAddr::V6(a) = addr {
            self.used.remove(&u128::from(a));
        }
    }

    /// The address `key` is given (the same each time it is free), or `None` when no free
    /// address is found.
    pub fn allocate(&mut self, key: &Key) -> Option<Ipv6Addr> {
        let base = u128::from(self.net.network());
        for attempt in 0..TRIES {
            let host = derive(&self.net, key, attempt) & self.host_mask();
            if host < RESERVED {
                continue;
            }
            let addr = base | host;
            if self.used.insert(addr) {
                return Some(Ipv6Addr::from(addr));
            }
        }
        None
    }
}

fn derive(net: &Ipv6Net, key: &Key, attempt: u32) -> u128 {
    let mut h = Sha256::new();
    h.update(net.network().octets());
    h.update([net.prefix_len()]);
    h.update(key.0);
    h.update(attempt.to_be_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str) -> Pool6 {
        Pool6::new(s.parse().unwrap())
    }

    #[test]
    fn the_same_key_gets_the_same_address_in_the_prefix() {
        let mut p = pool("fdaa:0:1::/48");
        let a = p.allocate(&Key([1; 32])).unwrap();
        let b = p.allocate(&Key([2; 32])).unwrap();
        assert_ne!(a, b);
        assert!(p.net().contains(&a) && p.net().contains(&b));
        p.release(a.into());
        assert_eq!(p.allocate(&Key([1; 32])), Some(a));
        let mut other = pool("fdaa:0:1::/48");
        assert_eq!(other.allocate(&Key([2; 32])), Some(b));
    }

    #[test]
    fn gateway_and_resolver_addresses_are_never_leased() {
        let p = pool("fdaa:0:1::/48");
        for reserved in ["fdaa:0:1::", "fdaa:0:1::1", "fdaa:0:1::3", "fdaa:0:1::ff"] {
            assert!(!p.leasable(reserved.parse().unwrap()), "{reserved}");
        }
        assert!(p.leasable("fdaa:0:1::100".parse().unwrap()));
        assert!(!p.leasable("fdaa:0:2::100".parse().unwrap()));
        assert!(!p.leasable("100.96.0.2".parse().unwrap()));
    }

    #[test]
    fn a_small_prefix_fills_up_without_handing_out_twice() {
        // A /119 has 512 addresses, 256 of them reserved.
        let mut p = pool("fdaa::/119");
        assert_eq!(p.capacity(), 256);
        let mut seen = BTreeSet::new();
        for n in 0..=255u8 {
            let mut k = [0u8; 32];
            k[0] = n;
            k[1] = 7;
            if let Some(a) = p.allocate(&Key(k)) {
                assert!(seen.insert(a), "{a} twice");
                assert!(p.leasable(a.into()));
            }
        }
        assert_eq!(seen.len(), p.in_use());
        assert!(!p.mark_used((*seen.iter().next().unwrap()).into()));
    }
}
