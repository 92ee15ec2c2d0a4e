//! What a pool's leader holds for one space, whatever its kind: an egress's egress IPs on
//! its uplink and its endpoint's address, a private network's endpoint's address. The
//! election, the floating addresses, the takeover and the hooks see a space only through
//! this, so an egress and a network are led by one mechanism.

use std::net::{IpAddr, SocketAddr};

use crate::config::{Config, EgressConfig, NetworkConfig};
use crate::space::Space;
use wgexit::net::IfName;

/// One space a leader holds.
#[derive(Debug, Clone)]
pub enum Led {
    Egress(EgressConfig),
    Network(NetworkConfig),
}

impl Led {
    /// Every egress and network of `config`, egresses first.
    pub fn all(config: &Config) -> Vec<Led> {
        let egresses = config.egress.iter().cloned().map(Led::Egress);
        egresses
            .chain(config.network.iter().cloned().map(Led::Network))
            .collect()
    }

    pub fn space(&self) -> Space {
        match self {
            Led::Egress(e) => Space::Egress(e.name.clone()),
            Led::Network(n) => Space::Network(n.name.clone()),
        }
    }

    /// Where its members' tunnels end.
    pub fn endpoint(&self) -> SocketAddr {
        match self {
            Led::Egress(e) => e.endpoint,
            Led::Network(n) => n.endpoint,
        }
    }

    /// Where the endpoint's address floats (`float = "address"`).
    pub fn endpoint_interface(&self) -> Option<&IfName> {
        match self {
            Led::Egress(e) => e.endpoint_interface.as_ref(),
            Led::Network(n) => n.endpoint_interface.as_ref(),
        }
    }

    pub fn listen_port(&self) -> u16 {
        match self {
            Led::Egress(e) => e.listen_port,
            Led::Network(n) => n.listen_port,
        }
    }

    /// The egress IPs (IPv4 then IPv6) and the interface they go on; none for a network.
    pub fn egress_ips(&self) -> Vec<(&IfName, IpAddr)> {
        let Led::Egress(e) = self else {
            return Vec::new();
        };
        let v4 = e.ips().iter().map(|ip| IpAddr::V4(*ip));
        let v6 = e.v6.iter().flat_map(|v6| &v6.ips).map(|ip| IpAddr::V6(*ip));
        v4.chain(v6).map(|ip| (&e.interface, ip)).collect()
    }

    /// Every address the leader holds for it: the egress IPs, then the endpoint's when it
    /// floats.
    pub fn addresses(&self) -> Vec<(&IfName, IpAddr)> {
        let mut out = self.egress_ips();
        if let Some(ifname) = self.endpoint_interface() {
            out.push((ifname, self.endpoint().ip()));
        }
        out
    }

    /// Whether the two hold an address in common, so one member must hold both.
    pub fn shares_an_address(&self, other: &Led) -> bool {
        let ips = |l: &Led| -> Vec<IpAddr> {
            let mut ips: Vec<IpAddr> = l.egress_ips().into_iter().map(|(_, ip)| ip).collect();
            ips.push(l.endpoint().ip());
            ips
        };
        let theirs = ips(other);
        ips(self).iter().any(|ip| theirs.contains(ip))
    }

    /// The egress, for what only an egress has (its connections' NAT state).
    pub fn egress(&self) -> Option<&EgressConfig> {
        match self {
            Led::Egress(e) => Some(e),
            Led::Network(_) => None,
        }
    }
}
