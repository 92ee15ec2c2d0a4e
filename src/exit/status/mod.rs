//! `wgexitd status`: what each egress is doing. The running daemon answers on a unix socket
//! in `state_dir` ([`server`]; the lease store is the daemon's alone while it runs), the
//! command asks it ([`client`]) and prints a summary ([`render`]) or the JSON. The
//! [`snapshot`] is also what `/metrics` reads its gauges from. In a pool, [`pool`] adds its
//! members, leaders and lease counts from etcd.

pub mod client;
pub mod pool;
pub mod render;
pub mod server;
pub mod snapshot;

pub use client::StatusError;
pub use snapshot::{StatusReport, AGE_BUCKETS, NEVER};

use std::path::Path;

use crate::exit::config::ClusterConfig;

/// Asks the daemon whose `state_dir` this is and prints its status: JSON when `json`, else
/// the summary; with each lease's row when `peers`; with the pool's members, leaders and
/// lease counts (under `pool`) when `cluster` is given.
pub fn print(
    state_dir: &Path,
    cluster: Option<&ClusterConfig>,
    json: bool,
    peers: bool,
) -> Result<(), StatusError> {
    let report = client::fetch(state_dir, peers)?;
    let pool = cluster.map(pool::fetch);
    if json {
        // A report always serializes.
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        if let (Some(p), Some(obj)) = (&pool, value.as_object_mut()) {
            obj.insert("pool".into(), serde_json::to_value(p).unwrap_or_default());
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        print!("{}", render::render(&report));
        if let Some(p) = &pool {
            print!("{}", pool::render(p));
        }
    }
    Ok(())
}
