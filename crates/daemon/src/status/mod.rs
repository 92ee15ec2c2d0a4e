//! `wgexitd status`: what each egress is doing. The running daemon answers on its control
//! socket in `state_dir` ([`crate::control`]; the lease store is the daemon's alone
//! while it runs) and the command prints a summary ([`render`]) or the JSON. The
//! [`snapshot`] is also what `/metrics` reads its gauges from. In a pool, [`pool`] adds its
//! members, leaders and lease counts from etcd.

pub mod pool;
pub mod render;
pub mod snapshot;

pub use snapshot::{StatusReport, AGE_BUCKETS, NEVER};

use std::path::Path;

use crate::config::ClusterConfig;
use crate::control::{self, ControlError};

/// Asks the daemon whose `state_dir` this is and prints its status: JSON when `json`, else
/// the summary; with each lease's row when `peers`; with the pool's members, leaders and
/// lease counts (under `pool`) when `cluster` is given.
pub async fn print(
    state_dir: &Path,
    cluster: Option<&ClusterConfig>,
    json: bool,
    peers: bool,
) -> Result<(), ControlError> {
    let report = control::status(state_dir, peers).await?;
    let pool = match cluster {
        Some(c) => Some(pool::fetch(c, state_dir).await),
        None => None,
    };
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
