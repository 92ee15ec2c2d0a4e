//! A link's generic segmentation offload (GSO), through the ethtool ioctl.
//!
//! gVisor's runsc hands large segments to the kernel with a virtio-net header ("host GSO")
//! when the link reports GSO on, leaving their TCP checksums for the kernel to complete. On
//! the TUN device behind `wireguard-go` they come out of the tunnel with bad checksums (the
//! SYN, never segmented, is fine; every later segment is not), so the exit node's conntrack
//! takes them for invalid and does not source-NAT them. With GSO off on the link, runsc
//! computes every checksum itself. See docs/plugin.md, "gVisor (runsc)".

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::LinkError;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GGSO: u32 = 0x23;
const ETHTOOL_SGSO: u32 = 0x24;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with its `ifr_data` member: 16 bytes of name, then the union (24 bytes).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _rest: [u8; 16],
}

fn failed(ifname: &str, what: &str, e: std::io::Error) -> LinkError {
    LinkError::Netlink {
        what: format!("{what} generic segmentation offload of {ifname}"),
        detail: e.to_string(),
        errno: e.raw_os_error(),
    }
}

/// Runs one ethtool value command on `ifname` (in the calling thread's namespace).
fn ethtool(ifname: &str, cmd: u32, data: u32, what: &str) -> Result<u32, LinkError> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(LinkError::NoSuchLink(ifname.to_string()));
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(LinkError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a socket just opened and owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _rest: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq whose data points at a live ethtool_value for the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req) };
    if rc < 0 {
        return Err(failed(ifname, what, std::io::Error::last_os_error()));
    }
    Ok(value.data)
}

/// Turns generic segmentation offload of `ifname` on or off.
pub fn set_gso(ifname: &str, on: bool) -> Result<(), LinkError> {
    ethtool(ifname, ETHTOOL_SGSO, u32::from(on), "setting").map(|_| ())
}

/// Whether generic segmentation offload of `ifname` is on.
pub fn gso(ifname: &str) -> Result<bool, LinkError> {
    ethtool(ifname, ETHTOOL_GGSO, 0, "reading").map(|v| v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_of_a_tun_device_turns_off_and_on() {
        // A network namespace of this thread's own; `ip`, forked from it, runs there too.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let out = std::process::Command::new("ip")
                .args(["tuntap", "add", "mode", "tun", "name", "gsot0"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            assert!(gso("gsot0").unwrap());
            set_gso("gsot0", false).unwrap();
            assert!(!gso("gsot0").unwrap());
            set_gso("gsot0", true).unwrap();
            assert!(gso("gsot0").unwrap());
            assert!(matches!(
                gso("nosuch0"),
                Err(LinkError::Netlink {
                    errno: Some(libc::ENODEV),
                    ..
                })
            ));
        })
        .join()
        .unwrap();
    }
}
