//! ADD's leases: the egress lease from the exit node and the network lease from the gateway,
//! asked for at the same time (and while the link is made), each recorded in the state as
//! soon as it is granted so that an undo releases whichever was granted.

use ipnet::IpNet;
use tokio::task::JoinHandle;

use crate::cni::client_error;
use crate::cni::config::Routes;
use crate::cni::error::{CniError, Code};
use crate::cni::member;
use crate::cni::state::{AttachmentState, StateDir};
use wgexit::api::{LeaseGrant, LeaseRequest, MemberGrant, MemberRequest};
use wgexit::client::{Client, ClientError};
use wgexit::wg::PeerConfig;

/// What to ask for: `(egress, request)` and `(network, request)`, each when configured.
pub struct Requests {
    pub egress: Option<(String, LeaseRequest)>,
    pub member: Option<(String, MemberRequest)>,
}

/// What was granted.
pub struct Grants {
    pub egress: Option<LeaseGrant>,
    pub member: Option<MemberGrant>,
}

type Pending<T> = Option<JoinHandle<Result<(String, T), ClientError>>>;

/// Both requests under way.
pub struct Leasing {
    egress: Pending<LeaseGrant>,
    member: Pending<MemberGrant>,
}

type Answered<T> = Option<Result<(String, T), ClientError>>;

/// The answer of a request that was made, `None` for one that was not.
async fn joined<T>(handle: Pending<T>) -> Result<Answered<T>, CniError> {
    match handle {
        None => Ok(None),
        Some(h) => h
            .await
            .map(Some)
            .map_err(|e| CniError::new(Code::Io, "leasing an address").with_details(e.to_string())),
    }
}

impl Leasing {
    /// Sends both requests, each on its own blocking thread.
    pub fn start(client: &Client, requests: Requests) -> Leasing {
        let egress = requests.egress.map(|(egress, req)| {
            let client = client.clone();
            tokio::task::spawn_blocking(move || client.lease(&egress, &req))
        });
        let member = requests.member.map(|(network, req)| {
            let client = client.clone();
            tokio::task::spawn_blocking(move || client.lease_member(&network, &req))
        });
        Leasing { egress, member }
    }

    /// Waits for both answers and records every granted lease in `state` (saved), then
    /// reports the first refusal. The outer error: the state could not be saved.
    pub async fn finish(
        self,
        state: &mut AttachmentState,
        dir: &StateDir,
    ) -> Result<Result<Grants, CniError>, CniError> {
        let (egress, member) = tokio::join!(joined(self.egress), joined(self.member));
        let (egress, member) = (egress?, member?);
        if let Some(Ok((server, grant))) = &egress {
            state.server = Some(server.clone());
            state.address = Some(grant.address);
            state.address6 = grant.address6;
            state.exit_public_key = Some(grant.server_public_key);
            state.endpoint = Some(grant.endpoint);
        }
        if let (Some(Ok((server, grant))), Some(m)) = (&member, state.member.as_mut()) {
            m.granted(server, grant);
        }
        dir.save(state)?;
        let egress = egress
            .transpose()
            .map_err(|e| client_error("leasing an address", &e))?;
        let member = member
            .transpose()
            .map_err(|e| client_error("joining the network", &e));
        Ok(member.map(|member| Grants {
            egress: egress.map(|(_, g)| g),
            member: member.map(|(_, g)| g),
        }))
    }
}

impl Grants {
    /// The exit node (the routes' destinations) and the gateway (the network's prefix).
    pub fn peers(&self, routes: Routes) -> Vec<PeerConfig> {
        let mut peers = Vec::new();
        if let Some(g) = &self.egress {
            peers.push(PeerConfig {
                public_key: g.server_public_key,
                endpoint: Some(g.endpoint),
                allowed_ips: egress_routes(g, routes),
                persistent_keepalive: Some(g.persistent_keepalive),
            });
        }
        if let Some(g) = &self.member {
            peers.push(member::gateway_peer(g));
        }
        peers
    }

    /// The egress lease's addresses (IPv4, and IPv6 on an egress with `ip6`), then the
    /// network's.
    pub fn addresses(&self) -> Vec<IpNet> {
        let egress = self
            .egress
            .iter()
            .flat_map(|g| [Some(g.address), g.address6]);
        let member = self.member.as_ref().map(|g| g.address);
        egress.flatten().chain(member).collect()
    }

    /// The routes into the link: the egress's (per `routes`), then the network's prefix.
    pub fn routes(&self, routes: Routes) -> Vec<IpNet> {
        let egress = self.egress.iter().flat_map(|g| egress_routes(g, routes));
        let member = self.member.iter().map(|g| g.prefix);
        egress.chain(member).collect()
    }
}

/// What goes to the exit node: the IPv4 `routes`, and their IPv6 twins when the lease has
/// an IPv6 (an IPv4-only egress gets exactly what it always got).
fn egress_routes(grant: &LeaseGrant, routes: Routes) -> Vec<IpNet> {
    let v4 = routes.destinations().into_iter().map(IpNet::V4);
    let v6 = grant
        .address6
        .iter()
        .flat_map(|_| routes.destinations6().into_iter().map(IpNet::V6));
    v4.chain(v6).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgexit::api::Lease;
    use wgexit::keys::Key;

    fn grant(address6: Option<&str>) -> LeaseGrant {
        LeaseGrant {
            lease: Lease {
                egress: "acme".into(),
                public_key: Key([1; 32]),
                address: "100.96.0.2".parse().unwrap(),
                address6: address6.map(|a| a.parse().unwrap()),
                created_at: 0,
                attachment: Default::default(),
                member: None,
            },
            address: "100.96.0.2/32".parse().unwrap(),
            server_public_key: Key([2; 32]),
            endpoint: "198.51.100.2:51820".parse().unwrap(),
            gateway: "100.96.0.1".parse().unwrap(),
            egress_ip: "203.0.113.77".parse().unwrap(),
            persistent_keepalive: 25,
            address6: address6.map(|a| format!("{a}/128").parse().unwrap()),
            gateway6: address6.map(|_| "fd77:0:1::1".parse().unwrap()),
            egress_ip6: address6.map(|_| "2001:db8:77::77".parse().unwrap()),
        }
    }

    fn grants(address6: Option<&str>) -> Grants {
        Grants {
            egress: Some(grant(address6)),
            member: None,
        }
    }

    fn strings(nets: Vec<IpNet>) -> Vec<String> {
        nets.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn an_ipv6_lease_adds_its_address_and_the_ipv6_routes() {
        let g = grants(Some("fd77:0:1::1234"));
        assert_eq!(
            strings(g.addresses()),
            ["100.96.0.2/32", "fd77:0:1::1234/128"]
        );
        assert_eq!(strings(g.routes(Routes::Default)), ["0.0.0.0/0", "::/0"]);
        assert_eq!(
            strings(g.routes(Routes::Split)),
            ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]
        );
        let peers = g.peers(Routes::Default);
        assert_eq!(strings(peers[0].allowed_ips.clone()), ["0.0.0.0/0", "::/0"]);
    }

    #[test]
    fn an_ipv4_only_lease_is_as_before_on_the_wire_and_on_the_link() {
        let g = grants(None);
        assert_eq!(strings(g.addresses()), ["100.96.0.2/32"]);
        assert_eq!(strings(g.routes(Routes::Default)), ["0.0.0.0/0"]);
        let json = serde_json::to_string(&grant(None)).unwrap();
        for absent in ["address6", "gateway6", "egress_ip6"] {
            assert!(!json.contains(absent), "{json}");
        }
    }
}
