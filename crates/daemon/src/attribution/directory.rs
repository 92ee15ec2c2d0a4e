//! What the recorder needs to know of the rest of the daemon: which overlay pools belong
//! to which egress, and which lease holds an overlay address now.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::LeaseInfo;
use crate::config::EgressConfig;
use crate::dataplane::SpacesDataplane;
use crate::leases::service::LeaseService;

/// An egress's overlay pools: flows from them that are source-NATed are recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPools {
    pub name: String,
    pub pools: Vec<IpNet>,
}

/// The egresses' pools, from the config.
pub fn egress_pools(egresses: &[EgressConfig]) -> Vec<EgressPools> {
    egresses
        .iter()
        .map(|e| {
            let mut pools = vec![IpNet::V4(e.pool)];
            if let Some(v6) = &e.v6 {
                pools.push(IpNet::V6(v6.pool));
            }
            EgressPools {
                name: e.name.clone(),
                pools,
            }
        })
        .collect()
}

/// Whether `source` lies in one of the egresses' pools.
pub fn in_pools(egresses: &[EgressPools], source: IpAddr) -> bool {
    egresses
        .iter()
        .any(|e| e.pools.iter().any(|p| p.contains(&source)))
}

/// Lease lookup by overlay address.
#[async_trait::async_trait]
pub trait LeaseDirectory: Send + Sync {
    /// The leases holding each of `addresses` now (those no lease holds are left out).
    async fn holders(&self, addresses: &HashSet<IpAddr>) -> HashMap<IpAddr, LeaseInfo>;
}

#[async_trait::async_trait]
impl<D: SpacesDataplane> LeaseDirectory for LeaseService<D> {
    async fn holders(&self, addresses: &HashSet<IpAddr>) -> HashMap<IpAddr, LeaseInfo> {
        let mut found = HashMap::new();
        if addresses.is_empty() {
            return found;
        }
        let registry = self.registry().lock().await;
        // One pass over the leases per batch of flows, not one per flow.
        for (egress, leases) in registry.egresses() {
            for stored in leases.leases() {
                let l = &stored.lease;
                let v6 = l.address6.map(IpAddr::V6);
                for overlay in std::iter::once(l.address).chain(v6) {
                    if addresses.contains(&overlay) {
                        found.insert(
                            overlay,
                            LeaseInfo {
                                egress: egress.to_string(),
                                container_id: l.attachment.container_id.clone(),
                                host: l.attachment.host.clone(),
                                owner: stored.owner.clone(),
                                overlay,
                            },
                        );
                    }
                }
            }
        }
        found
    }
}
