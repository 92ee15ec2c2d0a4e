//! What a pool is doing, as etcd says: its members, who leads which egress, and how many
//! leases each egress holds. For `wgexitd status`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::epoch;
use super::etcd::Etcd;
use super::membership::MemberRecord;
use super::ClusterError;
use crate::config::ClusterConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    pub cluster: String,
    /// Members holding a live etcd lease, by node name.
    pub members: Vec<MemberRecord>,
    /// Group (named after its first egress) → leading node.
    pub leaders: BTreeMap<String, String>,
    /// Egress → leases in the shared store.
    pub leases: BTreeMap<String, usize>,
    /// What is wrong with the store's identity as this member remembers it, and what the
    /// operator must do ([`super::epoch`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_problem: Option<String>,
}

/// The signed records under `prefix` (relative keys, values checked and unwrapped).
async fn range(etcd: &Etcd, prefix: String) -> Result<Vec<(String, Vec<u8>)>, ClusterError> {
    Ok(etcd
        .verified_range("reading the pool's state", &prefix)
        .await?)
}

/// Reads the pool's status from etcd.
pub async fn read(etcd: &Etcd, cluster: &str) -> Result<ClusterStatus, ClusterError> {
    let members = range(etcd, etcd.members_prefix())
        .await?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect();
    let leaders = range(etcd, etcd.key("leaders/"))
        .await?
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let mut leases = BTreeMap::new();
    for (k, _) in range(etcd, etcd.leases_prefix()).await? {
        if let Some((egress, _)) = k.split_once('/') {
            *leases.entry(egress.to_string()).or_insert(0) += 1;
        }
    }
    Ok(ClusterStatus {
        cluster: cluster.to_string(),
        members,
        leaders,
        leases,
        identity_problem: None,
    })
}

/// [`read`] for a caller outside the daemon (e.g. `wgexitd status`): connects, reads,
/// and lets go.
pub async fn read_config(
    cluster: &ClusterConfig,
    state_dir: &Path,
) -> Result<ClusterStatus, ClusterError> {
    let etcd = Etcd::connect(cluster)?;
    let mut status = read(&etcd, &cluster.name).await?;
    if let Some(remembered) = epoch::remembered(state_dir, &cluster.name) {
        let stored = epoch::stored(&etcd).await?;
        status.identity_problem = epoch::problem(&etcd, &remembered, stored.as_deref());
    }
    Ok(status)
}
