//! Flow attribution: which lease held an egress IP and port at a given time.
//!
//! conntrack reports every flow it creates and destroys, with its NAT tuple
//! ([`reader`] runs `conntrack -E`, [`event`] reads its lines). The flows whose original
//! source lies in an egress's overlay pool and whose source was rewritten are the ones an
//! egress source-NATs; each is resolved, when it starts, to the lease holding that overlay
//! address ([`directory`]) and written to a store of one file per day ([`store`]), kept
//! `attribution_days` ([`recorder`] batches and writes). `wgexitd who` and `wgexitd flows`
//! read it through the control socket ([`query`]); in a pool the other members are asked
//! through etcd ([`pool`]). Nothing of a payload is ever seen: conntrack's events carry
//! addresses, ports, protocol and byte counts only.

pub mod command;
pub mod directory;
pub mod event;
pub mod pool;
pub mod priority;
pub mod query;
pub mod reader;
pub mod recorder;
pub mod store;
pub mod time;

use std::net::IpAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;

use serde::{Deserialize, Serialize};

pub use event::Proto;

use crate::leases::service::LeaseService;

#[derive(Debug, thiserror::Error)]
pub enum AttributionError {
    #[error("attribution store {path}: {detail}")]
    Store { path: String, detail: String },
    #[error("cannot run `conntrack -E` (Debian package `conntrack`, conntrack-tools), which records flows for attribution: {0}; install it, or set attribution_days = 0 to record nothing")]
    Reader(String),
    #[error("{0}")]
    Time(String),
    #[error("asking the pool: {0}")]
    Pool(String),
}

/// The lease a flow came from, as it was when the flow started.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub egress: String,
    pub container_id: String,
    pub host: String,
    /// The owner of the token that made the lease: `@name` for a named token, else a
    /// digest of the token.
    pub owner: String,
    /// The container's overlay address the flow came from.
    pub overlay: IpAddr,
}

/// One source-NATed flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub egress_ip: IpAddr,
    /// The source port after NAT (ICMP: the echo identifier).
    pub egress_port: u16,
    pub proto: Proto,
    pub destination: IpAddr,
    pub destination_port: u16,
    /// When the flow started, RFC 3339; absent when its start was not seen (the recorder
    /// was not running, or the event was lost).
    pub first: Option<String>,
    /// When conntrack let the mapping go, RFC 3339; absent while the flow is open.
    pub last: Option<String>,
    /// Bytes from the container and to it (conntrack accounting), once the flow ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// The lease; absent when no lease held the overlay address when the flow started.
    pub lease: Option<LeaseInfo>,
    /// The pool member that forwarded it (in a pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// What the daemon keeps of the recorder: the [`query::Attribution`] the control socket
/// asks (none when `attribution_days` is 0), and the tasks to stop at shutdown.
pub type Running = (Option<Arc<query::Attribution>>, Vec<JoinHandle<()>>);

/// Starts the recorder (and, in a pool, answering the other members' questions) for the
/// daemon.
pub fn start(service: &Arc<LeaseService>) -> Result<Running, AttributionError> {
    let config = &service.config;
    let directory: Arc<dyn directory::LeaseDirectory> = service.clone();
    let Some((recorder, mut tasks)) = recorder::start(config, directory, &service.metrics)? else {
        return Ok((None, Vec::new()));
    };
    let pool = match &config.cluster {
        Some(c) => Some(pool::PoolAsker::connect(c)?),
        None => None,
    };
    let attribution = Arc::new(query::Attribution {
        store: recorder.store,
        node: config.cluster.as_ref().map(|c| c.node.clone()),
        pool,
    });
    if attribution.pool.is_some() {
        tasks.push(tokio::spawn(pool::answer_loop(attribution.clone())));
    }
    Ok((Some(attribution), tasks))
}

#[cfg(test)]
mod tests {
    use crate::config::tests::VALID;
    use crate::config::Config;

    #[test]
    fn records_are_kept_30_days_unless_the_config_says_otherwise() {
        let parse = |text: &str| Config::parse(std::path::Path::new("t.toml"), text).unwrap();
        assert_eq!(parse(VALID).attribution_days, 30);
        assert_eq!(
            parse(&format!("attribution_days = 7\n{VALID}")).attribution_days,
            7
        );
        assert_eq!(
            parse(&format!("attribution_days = 0\n{VALID}")).attribution_days,
            0
        );
    }
}
