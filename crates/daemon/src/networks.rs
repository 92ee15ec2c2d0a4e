//! The private networks' part of the daemon: their start (devices, rules, resolvers), their
//! reconcile and collection loops, and their teardown.

use std::sync::Arc;
use std::time::Duration;

use hickory_server::ServerFuture;

use crate::config::Config;
use crate::dataplane::network::{NetworkDataplane, NetworkPlaneError};
use crate::dns::server::{self, DnsError, Resolver};
use crate::identity::{Identities, IdentityError};
use crate::leases::collect::Activity;
use crate::leases::members::NetworkService;
use crate::leases::service::LeaseService;

#[derive(Debug, thiserror::Error)]
pub enum NetworksError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Dataplane(#[from] NetworkPlaneError),
    #[error(transparent)]
    Dns(#[from] DnsError),
}

/// The running resolvers; they serve until dropped.
pub type Resolvers = Vec<ServerFuture<Resolver>>;

/// Identities → devices (matching the store) → directories → resolvers on the addresses the
/// devices now hold. Their rules and forwarding are in place already (the host's firewall
/// holds every space's).
pub async fn start(
    leases: &Arc<LeaseService>,
) -> Result<(Arc<NetworkService>, Resolvers), NetworksError> {
    let config = &leases.config;
    let identities = Identities::load_or_create_networks(&config.state_dir, &config.network)?;
    let dataplane = NetworkDataplane::open(config.backend)?;
    let networks = Arc::new(NetworkService::new(leases.clone(), dataplane, identities));
    for (network, changes) in networks.reconcile().await? {
        tracing::info!(%network, ?changes, "network WireGuard device reconciled");
    }
    networks.publish_all().await;
    let mut resolvers = Vec::new();
    for n in networks.networks() {
        resolvers.push(server::start(n, networks.directory(&n.name)).await?);
        tracing::info!(network = %n.name, dns = %n.dns(), "resolver ready");
    }
    Ok((networks, resolvers))
}

/// Every `reconcile_interval`: repairs network devices that drifted from the store.
pub async fn reconcile_loop(networks: Arc<NetworkService>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match networks.reconcile().await {
            Ok(changes) => {
                for (network, c) in changes {
                    if c != Default::default() {
                        tracing::warn!(%network, changes = ?c, "network WireGuard device had drifted; repaired");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "network reconcile failed"),
        }
    }
}

/// Every `collect_interval`: releases the containers that have gone away (never peers).
pub async fn collect_loop(networks: Arc<NetworkService>, every: Duration) {
    let mut activity = Activity::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (lease, why) in networks.collect(&mut activity).await {
            tracing::info!(
                network = ?lease.member.as_ref().map(|m| &m.network), address = %lease.address,
                public_key = %lease.public_key, container_id = %lease.attachment.container_id,
                "idle network member collected: {why}"
            );
        }
    }
}

/// Removes every network's device.
pub async fn teardown(config: &Config) -> Result<(), NetworksError> {
    NetworkDataplane::open(config.backend)?
        .teardown(&config.network)
        .await?;
    Ok(())
}
