//! Telling a segment that an address moved here: a gratuitous ARP request for IPv4 (sender
//! and target both the address, broadcast) and an unsolicited neighbour advertisement for
//! IPv6 (to all nodes, override flag set). Neighbours replace the old holder's MAC at once
//! instead of waiting for their caches to go stale. Raw sockets of the current network
//! namespace; no external program needed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn socket(domain: libc::c_int, kind: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The index and MAC address of `ifname` in the current namespace.
fn link(fd: &OwnedFd, ifname: &str) -> io::Result<(libc::c_int, [u8; 6])> {
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming the interface; the ioctls fill its union.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) })?;
    let index = unsafe { req.ifr_ifru.ifru_ifindex };
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })?;
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(data.iter()) {
        *d = *s as u8;
    }
    Ok((index, mac))
}

/// The Ethernet frame of a gratuitous ARP request for `ip` from `mac`.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

fn garp(ifname: &str, ip: Ipv4Addr) -> io::Result<()> {
    let fd = socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        i32::from(ETH_P_ARP.to_be()),
    )?;
    let (index, mac) = link(&fd, ifname)?;
    let frame = garp_frame(mac, ip);
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = index;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `frame` and `to` are valid for the lengths given.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) as libc::c_int
    })?;
    Ok(())
}

/// The ICMPv6 body of an unsolicited neighbour advertisement for `ip` at `mac` (the
/// kernel fills in the checksum of a raw ICMPv6 socket).
pub fn na_message(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(&[136, 0, 0, 0]); // type NA, code, checksum
    m.extend_from_slice(&[0x20, 0, 0, 0]); // override, not solicited, not router
    m.extend_from_slice(&ip.octets());
    m.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    m.extend_from_slice(&mac);
    m
}

fn unsolicited_na(ifname: &str, ip: Ipv6Addr) -> io::Result<()> {
    let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
    let (index, mac) = link(&fd, ifname)?;
    let hops: libc::c_int = 255;
    for opt in [libc::IPV6_MULTICAST_HOPS, libc::IPV6_UNICAST_HOPS] {
        // SAFETY: `hops` is a valid c_int for these options.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                opt,
                (&hops as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        })?;
    }
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    from.sin6_family = libc::AF_INET6 as u16;
    from.sin6_addr.s6_addr = ip.octets();
    // SAFETY: `from` is a valid sockaddr_in6. Sent from the address itself.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&from as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        )
    })?;
    let body = na_message(mac, ip);
    let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    to.sin6_family = libc::AF_INET6 as u16;
    to.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    to.sin6_scope_id = index as u32;
    // SAFETY: `body` and `to` are valid for the lengths given.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            body.as_ptr().cast(),
            body.len(),
            0,
            (&to as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ) as libc::c_int
    })?;
    Ok(())
}

/// Announces that `ip` is now on `ifname`.
pub fn announce(ifname: &str, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(a) => garp(ifname, a),
        IpAddr::V6(a) => unsolicited_na(ifname, a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_announcing_layout() {
        let mac = [2, 0, 0, 0, 0, 9];
        let f = garp_frame(mac, Ipv4Addr::new(203, 0, 113, 77));
        assert_eq!(f.len(), 42);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "a request");
        assert_eq!(&f[28..32], &[203, 0, 113, 77], "sender address");
        assert_eq!(&f[38..42], &[203, 0, 113, 77], "target address");
        let na = na_message(mac, "2001:db8::77".parse().unwrap());
        assert_eq!(na.len(), 32);
        assert_eq!(na[0], 136);
        assert_eq!(na[4] & 0x20, 0x20, "override");
        assert_eq!(&na[26..32], &mac);
    }
}
