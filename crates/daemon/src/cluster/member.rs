//! A pool member's start: what it reads from etcd before serving (leases, identities, the
//! CA), and the loops it runs while serving (its membership, one election per group of
//! spaces, the lease watch, endpoint publishing).

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::agreement::{self, SharedSettings};
use super::conntrack_sync::ConntrackSync;
use super::election::{groups, Election, Leading};
use super::etcd::Etcd;
use super::floating::Floating;
use super::follow::follow;
use super::led::Led;
use super::membership::{MemberRecord, Membership, Standing};
use super::pulse::Timing;
use super::takeover::Takeover;
use super::{epoch, shared, ClusterError};
use crate::cluster::lease_store::EtcdStore;
use crate::config::{ClusterConfig, Config};
use crate::dataplane::HostDataplane;
use crate::identity::Identities;
use crate::leases::registry::Registry;
use crate::leases::service::LeaseService;
use crate::space::Space;

/// A member connected to its pool, not serving yet.
pub struct Pool {
    cluster: ClusterConfig,
    etcd: Arc<Etcd>,
    store: Arc<EtcdStore>,
    revision: i64,
    leading: Leading,
    /// The pool's identity this member serves.
    epoch: String,
}

/// What [`open`] reads from etcd.
pub struct Opened {
    pub registry: Registry,
    /// The egresses' identities, then the networks'.
    pub identities: (Identities, Identities),
    pub pool: Pool,
}

/// Connects to etcd and reads the pool's leases, identities and CA (making those that do
/// not exist yet). Needs etcd's quorum.
pub async fn open(config: &Config, cluster: &ClusterConfig) -> Result<Opened, ClusterError> {
    let etcd = Arc::new(Etcd::connect(cluster)?);
    let store = Arc::new(EtcdStore::new(etcd.clone()));
    // Before anything is read or made: a store that lost the pool is not served.
    let epoch = epoch::establish(&etcd, &config.state_dir, &cluster.name).await?;
    let (leases, revision) = store.load_at().await?;
    let (mut registry, misfits) =
        Registry::from_leases(&config.egress, &config.network, store.clone(), leases);
    registry.spread(&cluster.node);
    for m in misfits {
        tracing::warn!(
            space = %Space::from_store_key(&m.lease.egress), address = %m.lease.address, public_key = %m.lease.public_key,
            "a lease in etcd does not fit this member's config (are the members' egresses and networks the same?); not served here"
        );
    }
    let spaces = |kind: &dyn Fn(&Led) -> bool| -> Vec<Space> {
        Led::all(config)
            .iter()
            .filter(|l| kind(l))
            .map(Led::space)
            .collect()
    };
    let identities = (
        shared::identities(&etcd, &spaces(&|l| l.egress().is_some())).await?,
        shared::identities(&etcd, &spaces(&|l| l.egress().is_none())).await?,
    );
    if config.api.tls_files.is_none() {
        shared::ca(&etcd, &config.state_dir).await?;
    }
    Ok(Opened {
        registry,
        identities,
        pool: Pool {
            cluster: cluster.clone(),
            etcd,
            store,
            revision,
            leading: Leading::default(),
            epoch,
        },
    })
}

impl Pool {
    /// Which egresses this member leads, as it changes.
    pub fn leading(&self) -> Leading {
        self.leading.clone()
    }

    /// The pool's store, for the lease registry.
    pub fn store(&self) -> Arc<EtcdStore> {
        self.store.clone()
    }

    /// Starts the member's loops; they run until aborted.
    pub fn spawn(
        self,
        service: Arc<LeaseService<HostDataplane>>,
    ) -> Result<Vec<JoinHandle<()>>, ClusterError> {
        let (tx, rx) = watch::channel(Standing::Lost);
        let settings = SharedSettings::of(&Led::all(&service.config));
        let (agrees_tx, agrees) = watch::channel(false);
        let membership = Membership {
            settings: settings.clone(),
            etcd: self.etcd.clone(),
            ttl: self.cluster.leader_ttl,
            record: MemberRecord {
                node: self.cluster.node.clone(),
                api: service.config.api.listen.to_string(),
            },
        };
        let conntrack = Arc::new(ConntrackSync {
            etcd: self.etcd.clone(),
        });
        let takeover = Arc::new(Takeover {
            etcd: self.etcd.clone(),
            service: service.clone(),
            floating: Floating::new(self.cluster.float.clone(), &self.cluster.node)?,
            conntrack: conntrack.clone(),
        });
        let election = Arc::new(Election {
            etcd: self.etcd.clone(),
            node: self.cluster.node.clone(),
            ttl: self.cluster.leader_ttl,
            timing: Timing::new(self.cluster.takeover_after),
            takeover: takeover.clone(),
            leading: self.leading.clone(),
            agrees,
            epoch: self.epoch.clone(),
        });
        let mut tasks = vec![
            tokio::spawn(membership.run(tx)),
            tokio::spawn(agreement::run(
                self.etcd.clone(),
                self.cluster.node.clone(),
                settings,
                agrees_tx,
            )),
            tokio::spawn(follow(
                self.etcd.clone(),
                self.store.clone(),
                service,
                self.revision + 1,
                self.epoch.clone(),
            )),
            tokio::spawn(takeover.publish_endpoints(self.leading.clone())),
            tokio::spawn(conntrack.publish(
                election.takeover.service.config.egress.clone(),
                self.leading.clone(),
            )),
        ];
        for group in groups(Led::all(&election.takeover.service.config)) {
            tasks.push(tokio::spawn(election.clone().run(group, rx.clone())));
        }
        Ok(tasks)
    }
}
