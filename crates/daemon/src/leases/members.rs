//! The private networks' members, as operations of the one [`LeaseService`]: containers
//! (leased by the plugin, collected when idle) and peers (laptops, joined by `wgexit peer
//! create`, never collected). Their leases live in the one registry beside the egresses'
//! (under [`Space::store_key`]), so they share its store, its group commit and its lock; each
//! change is programmed on the network's device before it is answered and then published
//! to the network's resolver.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::registry::{Holder, LeaseError, Registry};
use super::service::remote::retried;
use super::service::{LeaseService, ServiceError};
use crate::config::NetworkConfig;
use crate::dataplane::devices::{peer_of, Changes};
use crate::dataplane::{Dataplane, DataplaneError, SpaceDevice, SpacesDataplane};
use crate::dns::counts::DnsCounts;
use crate::dns::directory::{Directory, Published};
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::space::Space;
use wgexit::api::{
    Attachment, Lease, Member, MemberGrant, MemberInfo, MemberKind, MemberList, MemberRequest,
    NetworkInfo, PeerRequest,
};
use wgexit::keys::Key;

/// What only a private network's members can be refused (see [`ServiceError`] for the rest).
#[derive(Debug, thiserror::Error)]
pub enum MemberRefusal {
    #[error("network {network}: a peer named {name:?} exists already; pick another name or remove it first")]
    PeerNameTaken { network: String, name: String },
    #[error("network {network}: no {kind} with public key {key}")]
    NotFound {
        network: String,
        kind: &'static str,
        key: Key,
    },
}

pub(super) fn kind_name(kind: MemberKind) -> &'static str {
    match kind {
        MemberKind::Container => "member",
        MemberKind::Peer => "peer",
    }
}

/// A lease as the API shows a member.
pub fn member_of(network: &str, lease: &Lease) -> Member {
    let info = lease.member.as_deref().cloned().unwrap_or(MemberInfo {
        network: network.to_string(),
        kind: MemberKind::Container,
        app: String::new(),
        region: String::new(),
        name: String::new(),
    });
    Member {
        network: network.to_string(),
        kind: info.kind,
        public_key: lease.public_key,
        address: lease.address,
        created_at: lease.created_at,
        app: info.app,
        region: info.region,
        name: info.name,
        attachment: lease.attachment.clone(),
    }
}

/// Whether a network's lease is a container's or a peer's (a laptop's).
pub fn kind_of(lease: &Lease) -> MemberKind {
    lease
        .member
        .as_ref()
        .map(|m| m.kind)
        .unwrap_or(MemberKind::Container)
}

/// What joining asks for, whatever the kind of member.
struct Join {
    public_key: Key,
    attachment: Attachment,
    info: MemberInfo,
}

/// The private networks' part of the lease service: their WireGuard identities and the
/// directories their resolvers read, and what the resolvers count.
pub struct Members {
    identities: Identities,
    directories: HashMap<String, Published>,
    dns_counts: HashMap<String, Arc<DnsCounts>>,
}

impl Members {
    /// For `networks`, with their identities.
    /// `metrics`: where the resolvers count their queries.
    pub fn new(networks: &[NetworkConfig], identities: Identities, metrics: &Metrics) -> Members {
        let directories = networks
            .iter()
            .map(|n| (n.name.clone(), Published::default()))
            .collect();
        let dns_counts = networks
            .iter()
            .map(|n| (n.name.clone(), Arc::new(metrics.dns_counts(&n.name))))
            .collect();
        Members {
            identities,
            directories,
            dns_counts,
        }
    }
}

impl<D: SpacesDataplane> LeaseService<D> {
    /// Rebuilds `space`'s directory from the registry (called with it locked); nothing for
    /// an egress.
    pub(super) fn publish(&self, registry: &Registry, space: &Space) {
        let Space::Network(network) = space else {
            return;
        };
        let Some(published) = self.members.directories.get(network) else {
            return;
        };
        let directory = match registry.egress(space) {
            Ok(e) => Directory::from_leases(e.leases().map(|l| &l.lease)),
            Err(_) => Directory::default(),
        };
        published.publish(directory);
    }

    /// Where `network`'s resolver counts its answers, refusals and forwards.
    pub fn dns_counts(&self, network: &str) -> Arc<DnsCounts> {
        self.members
            .dns_counts
            .get(network)
            .cloned()
            .unwrap_or_default()
    }
}

/// The networks' operations of the one lease service: the same registry (under
/// [`Space::Network`]), dataplane, store and durable removal as the egresses'.
impl LeaseService {
    pub fn networks(&self) -> &[NetworkConfig] {
        &self.config.network
    }

    /// The directory `network`'s resolver reads.
    pub fn directory(&self, network: &str) -> Published {
        self.members
            .directories
            .get(network)
            .cloned()
            .unwrap_or_default()
    }

    fn network_public_key(&self, network: &str) -> Result<Key, ServiceError> {
        self.members
            .identities
            .public(network)
            .ok_or_else(|| LeaseError::Unknown(Space::Network(network.to_string())).into())
    }

    /// Publishes every network's directory (at start).
    pub async fn publish_all(&self) {
        let registry = self.registry().lock().await;
        for n in &self.config.network {
            self.publish(&registry, &n.space());
        }
    }

    /// A container joins `network` (idempotent per public key).
    pub async fn lease_member(
        &self,
        network: &str,
        owner: &str,
        req: MemberRequest,
    ) -> Result<MemberGrant, ServiceError> {
        let info = MemberInfo {
            network: network.to_string(),
            kind: MemberKind::Container,
            app: req.app,
            region: req.region,
            name: String::new(),
        };
        let join = Join {
            public_key: req.public_key,
            attachment: req.attachment,
            info,
        };
        retried(|| self.join(network, owner, &join)).await
    }

    /// A peer (laptop) joins `network` under a name no other peer of it has.
    pub async fn add_peer(
        &self,
        network: &str,
        owner: &str,
        req: PeerRequest,
    ) -> Result<MemberGrant, ServiceError> {
        let info = MemberInfo {
            network: network.to_string(),
            kind: MemberKind::Peer,
            app: String::new(),
            region: String::new(),
            name: req.name,
        };
        let join = Join {
            public_key: req.public_key,
            attachment: Attachment::default(),
            info,
        };
        retried(|| self.join(network, owner, &join)).await
    }

    fn check_peer_name(
        &self,
        registry: &Registry,
        network: &str,
        join: &Join,
    ) -> Result<(), ServiceError> {
        if join.info.kind != MemberKind::Peer {
            return Ok(());
        }
        let taken = registry
            .egress(&Space::Network(network.to_string()))?
            .leases()
            .filter(|l| l.lease.public_key != join.public_key)
            .filter_map(|l| l.lease.member.as_ref())
            .any(|m| m.kind == MemberKind::Peer && m.name.eq_ignore_ascii_case(&join.info.name));
        if taken {
            return Err(MemberRefusal::PeerNameTaken {
                network: network.to_string(),
                name: join.info.name.clone(),
            }
            .into());
        }
        Ok(())
    }

    async fn join(
        &self,
        network: &str,
        owner: &str,
        join: &Join,
    ) -> Result<MemberGrant, ServiceError> {
        let cfg = self.network_config(network)?;
        let server_public_key = self.network_public_key(network)?;
        let scope = Space::Network(network.to_string());
        let mut registry = self.registry().lock().await;
        self.check_peer_name(&registry, network, join)?;
        let holder = Holder {
            public_key: &join.public_key,
            attachment: &join.attachment,
            owner,
        };
        let (stored, new, durable) = registry.lease_for(
            &scope,
            holder,
            Some(join.info.clone()),
            self.config.max_leases_per_owner.per_network_owner(),
        )?;
        if let Err(e) = self
            .dataplane()
            .add_peer(cfg, &peer_of(&stored.lease))
            .await
        {
            if new {
                let _ = registry.release(&scope, &join.public_key, None);
            }
            return Err(e.into());
        }
        self.publish(&registry, &scope);
        drop(registry);
        if let Err(e) = durable.durable().await {
            if new {
                self.undo_new_lease(cfg, &stored, &e).await;
            }
            return Err(e.into());
        }
        Ok(self.grant(cfg, &stored.lease, server_public_key))
    }

    fn grant(&self, cfg: &NetworkConfig, lease: &Lease, server_public_key: Key) -> MemberGrant {
        MemberGrant {
            member: member_of(&cfg.name, lease),
            address: IpNet::from(lease.address),
            prefix: IpNet::V6(cfg.prefix),
            server_public_key,
            endpoint: cfg.endpoint,
            gateway: IpAddr::V6(cfg.gateway()),
            dns: IpAddr::V6(cfg.dns()),
            persistent_keepalive: self.config.persistent_keepalive,
        }
    }

    pub async fn list_members(
        &self,
        network: &str,
        kind: MemberKind,
    ) -> Result<MemberList, ServiceError> {
        self.network_config(network)?;
        let registry = self.registry().lock().await;
        let mut members: Vec<Member> = registry
            .egress(&Space::Network(network.to_string()))?
            .leases()
            .filter(|l| kind_of(&l.lease) == kind)
            .map(|l| member_of(network, &l.lease))
            .collect();
        members.sort_by_key(|m| m.address);
        Ok(MemberList { members })
    }

    pub async fn network_info(&self, network: &str) -> Result<NetworkInfo, ServiceError> {
        let cfg = self.network_config(network)?;
        let registry = self.registry().lock().await;
        let leases = registry.egress(&Space::Network(network.to_string()))?;
        let peers = leases
            .leases()
            .filter(|l| kind_of(&l.lease) == MemberKind::Peer)
            .count();
        Ok(NetworkInfo {
            name: cfg.name.clone(),
            prefix: IpNet::V6(cfg.prefix),
            endpoint: cfg.endpoint,
            server_public_key: self.network_public_key(network)?,
            gateway: IpAddr::V6(cfg.gateway()),
            dns: IpAddr::V6(cfg.dns()),
            members: leases.len() - peers,
            peers,
        })
    }

    /// Makes every network's device match the store; says what changed, or why a network
    /// was skipped this time.
    pub async fn reconcile_networks(&self) -> Vec<(String, Result<Changes, DataplaneError>)> {
        let mut out = Vec::new();
        for cfg in &self.config.network {
            let Some(identity) = self.members.identities.private(&cfg.name) else {
                continue;
            };
            let changes = self.reconcile_space(cfg, identity).await;
            out.push((cfg.name.clone(), changes));
        }
        out
    }
}
