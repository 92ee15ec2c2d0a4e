//! Links, addresses and routes in one network namespace, over one rtnetlink socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo as LinkInfoAttr};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteScope};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder};

use super::netns::{Netns, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink needs a tokio runtime (internal error)")]
    NoRuntime,
    #[error("link {0} does not exist")]
    NoSuchLink(String),
    #[error("{what}: {detail}")]
    Netlink {
        what: String,
        detail: String,
        /// The kernel's errno, when the kernel refused.
        errno: Option<i32>,
    },
}

impl LinkError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Netlink { errno, .. } => *errno,
            _ => None,
        }
    }
}

pub(crate) fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |e| LinkError::Netlink {
        what,
        errno: match &e {
            rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
            _ => None,
        },
        detail: match &e {
            rtnetlink::Error::NetlinkError(m) => match m.to_io() {
                io if io.raw_os_error().is_some() => io.to_string(),
                _ => e.to_string(),
            },
            _ => e.to_string(),
        },
    }
}

/// Whether a netlink error says "no such device / address / route".
pub(crate) fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if matches!(m.to_io().raw_os_error(), Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL)))
}

/// An rtnetlink handle bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    pub(crate) handle: Handle,
}

impl Netlink {
    /// A handle on the namespace the calling thread is in. Must run inside a tokio runtime.
    pub fn current() -> Result<Netlink, LinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| LinkError::NoRuntime)?;
        // Creating the connection registers its socket with the runtime's reactor.
        let _guard = runtime.enter();
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
        runtime.spawn(conn);
        Ok(Netlink { handle })
    }

    /// A handle on `netns`, usable from any thread afterwards.
    pub fn in_netns(netns: &Netns) -> Result<Netlink, LinkError> {
        netns.run(Netlink::current)?
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, LinkError> {
        Ok(self.link_info(name).await?.map(|info| info.index))
    }

    /// Creates a kernel WireGuard link named `name` (down).
    pub async fn add_wireguard(&self, name: &str) -> Result<(), LinkError> {
        self.handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
            .map_err(nl_err(format!("creating WireGuard link {name}")))
    }

    /// Creates a kernel WireGuard link named `name` (down) directly in `target`, in one
    /// message from this namespace. The kernel makes the device's UDP socket in the
    /// namespace the request came from (WireGuard's "creating namespace": this one), not
    /// in `target`, so the link needs no move to keep its socket here.
    pub async fn add_wireguard_in(&self, name: &str, target: &Netns) -> Result<(), LinkError> {
        self.handle
            .link()
            .add(
                LinkWireguard::new(name)
                    .setns_by_fd(target.raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err(format!(
                "creating WireGuard link {name} in {}",
                target.path().display()
            )))
    }

    async fn require_index(&self, name: &str) -> Result<u32, LinkError> {
        self.link_index(name)
            .await?
            .ok_or_else(|| LinkError::NoSuchLink(name.to_string()))
    }

    /// Moves link `name` into `target` and renames it to `new_name` there, in one step
    /// (so the new name never has to be free in this namespace).
    pub async fn move_to_netns(
        &self,
        name: &str,
        target: &Netns,
        new_name: &str,
    ) -> Result<(), LinkError> {
        let index = self.require_index(name).await?;
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(target.raw_fd())
            .name(new_name.to_string())
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl_err(format!(
                "moving link {name} into {} as {new_name}",
                target.path().display()
            )))
    }

    /// Sets the MTU and brings the link up.
    pub async fn set_up(&self, name: &str, mtu: Option<u32>) -> Result<(), LinkError> {
        let index = self.require_index(name).await?;
        let mut builder = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.handle
            .link()
            .set(builder.build())
            .execute()
            .await
            .map_err(nl_err(format!("bringing up link {name}")))
    }

    /// Adds (or replaces) `addr` on link `name`. An IPv6 address is usable at once, without
    /// duplicate address detection: WireGuard links do none anyway, and a floating egress
    /// IPv6 taken over from a failed leader must not be refused because the old holder
    /// still answers for a moment.
    pub async fn add_address(&self, name: &str, addr: IpNet) -> Result<(), LinkError> {
        let index = self.require_index(name).await?;
        let mut request = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .replace();
        if addr.addr().is_ipv6() {
            request.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        request
            .execute()
            .await
            .map_err(nl_err(format!("adding address {addr} to {name}")))
    }

    /// Removes `addr` from link `name`; true if it was there (a missing link or address is
    /// not an error).
    pub async fn delete_address(&self, name: &str, addr: IpNet) -> Result<bool, LinkError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr.addr())
            .set_prefix_length_filter(addr.prefix_len())
            .execute();
        let mut removed = false;
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(nl_err(format!("listing addresses of {name}")))?
        {
            match self.handle.address().del(msg).execute().await {
                Ok(()) => removed = true,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(nl_err(format!("removing address {addr} from {name}"))(e)),
            }
        }
        Ok(removed)
    }

    /// Adds a route to `dst` out of link `name` with no gateway (scope link).
    pub async fn add_route(&self, name: &str, dst: Ipv4Net) -> Result<(), LinkError> {
        let index = self.require_index(name).await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.replace_route(route, &format!("adding route {dst} via {name}"))
            .await
    }

    async fn replace_route(
        &self,
        route: rtnetlink::packet_route::route::RouteMessage,
        what: &str,
    ) -> Result<(), LinkError> {
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl_err(what))
    }

    /// Adds an IPv6 route to `dst` out of link `name` with no gateway.
    pub async fn add_route6(&self, name: &str, dst: Ipv6Net) -> Result<(), LinkError> {
        let index = self.require_index(name).await?;
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .output_interface(index)
            .build();
        self.replace_route(route, &format!("adding route {dst} via {name}"))
            .await
    }

    /// IPv6 routes (main table) whose output interface is link `name`.
    pub async fn routes6(&self, name: &str) -> Result<Vec<Ipv6Net>, LinkError> {
        let query = RouteMessageBuilder::<Ipv6Addr>::new().build();
        let routes = self.main_routes_via(name, query, "IPv6 routes").await?;
        Ok(routes
            .into_iter()
            .filter_map(|r| match r {
                IpNet::V6(n) => Some(n),
                IpNet::V4(_) => None,
            })
            .collect())
    }

    /// The routes of the main table that `query` lists whose output interface is `name`.
    async fn main_routes_via(
        &self,
        name: &str,
        query: rtnetlink::packet_route::route::RouteMessage,
        what: &str,
    ) -> Result<Vec<IpNet>, LinkError> {
        const MAIN_TABLE: u8 = 254;
        let index = self.require_index(name).await?;
        let mut out = Vec::new();
        let mut stream = self.handle.route().get(query).execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(nl_err(format!("listing {what} of {name}")))?
        {
            let mut dst = None;
            let mut oif = None;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                        dst = Some(IpAddr::V4(*a))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                        dst = Some(IpAddr::V6(*a))
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if oif != Some(index) || msg.header.table != MAIN_TABLE {
                continue;
            }
            let dst = dst.unwrap_or(match msg.header.address_family {
                AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            });
            if let Ok(net) = IpNet::new(dst, msg.header.destination_prefix_length) {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Deletes link `name`; true if it was there.
    pub async fn delete_link(&self, name: &str) -> Result<bool, LinkError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(nl_err(format!("deleting link {name}"))(e)),
        }
    }

    /// The link's state: whether it is up, its MTU and its kind.
    pub async fn link_info(&self, name: &str) -> Result<Option<LinkInfo>, LinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let msg = match links.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(nl_err(format!("looking up link {name}"))(e)),
        };
        let mut info = LinkInfo {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: 0,
            kind: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::Mtu(mtu) => info.mtu = mtu,
                LinkAttribute::LinkInfo(infos) => {
                    info.kind = infos.into_iter().find_map(|i| match i {
                        LinkInfoAttr::Kind(kind) => Some(kind),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        Ok(Some(info))
    }

    /// IPv4 addresses on link `name`.
    pub async fn addresses(&self, name: &str) -> Result<Vec<IpNet>, LinkError> {
        let index = self.require_index(name).await?;
        let mut out = Vec::new();
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(nl_err(format!("listing addresses of {name}")))?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    if let Ok(net) = IpNet::new(*ip, msg.header.prefix_len) {
                        out.push(net);
                    }
                }
            }
        }
        Ok(out)
    }

    /// IPv4 routes (main table) whose output interface is link `name`.
    pub async fn routes(&self, name: &str) -> Result<Vec<Ipv4Net>, LinkError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes = self.main_routes_via(name, query, "routes").await?;
        Ok(routes
            .into_iter()
            .filter_map(|r| match r {
                IpNet::V4(n) => Some(n),
                IpNet::V6(_) => None,
            })
            .collect())
    }
}

/// What [`Netlink::link_info`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub up: bool,
    pub mtu: u32,
    /// `wireguard`, `tun` (wireguard-go), `veth`, ...; `None` for kinds without link info.
    pub kind: Option<InfoKind>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;

    /// A network namespace of this test's own with a veth pair up; removed when dropped.
    struct Scratch(String);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[tokio::test]
    async fn an_ipv6_address_is_usable_at_once_without_duplicate_address_detection() {
        let ns = Scratch(format!("wxlink{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        let veth = ["link", "add", "a0", "type", "veth", "peer", "name", "b0"];
        ip(&[&["-n", ns.0.as_str()][..], &veth[..]].concat());
        for dev in ["a0", "b0"] {
            ip(&["-n", &ns.0, "link", "set", dev, "up"]);
        }
        let netns = Netns::open(Path::new(&format!("/var/run/netns/{}", ns.0))).unwrap();
        let nl = Netlink::in_netns(&netns).unwrap();
        nl.add_address("a0", "2001:db8:5::1/64".parse().unwrap())
            .await
            .unwrap();
        let listed = ip(&["-n", &ns.0, "-6", "-j", "addr", "show", "dev", "a0"]);
        let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
        let info = v[0]["addr_info"].as_array().unwrap();
        let ours = info
            .iter()
            .find(|a| a["local"] == "2001:db8:5::1")
            .unwrap_or_else(|| panic!("{listed}"));
        assert!(ours.get("tentative").is_none(), "{ours}");
        assert_eq!(ours["nodad"], true, "{ours}");
    }
}
