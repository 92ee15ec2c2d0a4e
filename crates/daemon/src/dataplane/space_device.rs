//! What the dataplane needs of a space's WireGuard device, whatever its kind: an egress's
//! device holds its overlay gateway addresses, a private network's the gateway's and the
//! resolver's; everything else (identity, port, peers, MTU, up) is made the same way.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{EgressConfig, NetworkConfig};
use crate::space::Space;

/// One kind of space, as its WireGuard device sees it.
pub trait SpaceDevice: Send + Sync {
    /// The space, for errors and logs.
    fn space(&self) -> Space;
    /// The device's name.
    fn wg_interface(&self) -> &str;
    /// The UDP port it listens on.
    fn listen_port(&self) -> u16;
    fn mtu(&self) -> u32;
    /// The addresses the device holds, each with the prefix that routes the space's
    /// members to it.
    fn device_addresses(&self) -> Vec<IpNet>;
}

/// What every kind's config holds under the same names: its device's name, port and MTU.
macro_rules! device_settings {
    () => {
        fn wg_interface(&self) -> &str {
            &self.wg_interface
        }

        fn listen_port(&self) -> u16 {
            self.listen_port
        }

        fn mtu(&self) -> u32 {
            self.mtu
        }
    };
}

impl SpaceDevice for EgressConfig {
    fn space(&self) -> Space {
        Space::Egress(self.name.clone())
    }

    device_settings!();

    /// The overlay gateway in the IPv4 pool, and in the IPv6 pool with `ip6`.
    fn device_addresses(&self) -> Vec<IpNet> {
        let v4 = Ipv4Net::new(self.overlay_ip(), self.pool.prefix_len()).map(IpNet::V4);
        let v6 = self
            .v6
            .as_ref()
            .map(|v6| Ipv6Net::new(v6.gateway(), v6.pool.prefix_len()).map(IpNet::V6));
        v4.into_iter().chain(v6.into_iter().flatten()).collect()
    }
}

impl SpaceDevice for NetworkConfig {
    fn space(&self) -> Space {
        Space::Network(self.name.clone())
    }

    device_settings!();

    /// `<prefix>::1` with the prefix (its route) and the resolver's `<prefix>::3/128`.
    fn device_addresses(&self) -> Vec<IpNet> {
        let gateway = Ipv6Net::new(self.gateway(), self.prefix.prefix_len()).map(IpNet::V6);
        let resolver = Ipv6Net::new(self.dns(), 128).map(IpNet::V6);
        gateway.into_iter().chain(resolver).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::egress6::EgressV6;
    use crate::config::network::tests::network;
    use crate::config::tests::egress;

    #[test]
    fn each_kind_holds_its_gateway_addresses() {
        let mut e = egress("acme", "100.96.0.0/24");
        let v4: IpNet = "100.96.0.1/24".parse().unwrap();
        assert_eq!(e.device_addresses(), vec![v4]);
        e.v6 = Some(EgressV6 {
            ips: vec!["2001:db8:77::77".parse().unwrap()],
            pool: "fd77:0:1::/64".parse().unwrap(),
        });
        let v6: IpNet = "fd77:0:1::1/64".parse().unwrap();
        assert_eq!(e.device_addresses(), vec![v4, v6]);
        let n = network("acme", "fdaa:0:1::/48", "wgn-acme");
        let want: Vec<IpNet> = ["fdaa:0:1::1/48", "fdaa:0:1::3/128"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(n.device_addresses(), want);
        assert_eq!(n.space().to_string(), "network acme");
        assert_eq!(e.space().to_string(), "egress acme");
    }
}
