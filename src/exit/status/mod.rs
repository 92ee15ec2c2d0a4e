//! `wgexitd status`: what each egress is doing. The running daemon answers on a unix socket
//! in `state_dir` ([`server`]; the lease store is the daemon's alone while it runs), the
//! command asks it ([`client`]) and prints a summary ([`render`]) or the JSON. The
//! [`snapshot`] is also what `/metrics` reads its gauges from.

pub mod client;
pub mod render;
pub mod server;
pub mod snapshot;

pub use client::StatusError;
pub use snapshot::{StatusReport, AGE_BUCKETS, NEVER};

use std::path::Path;

/// Asks the daemon whose `state_dir` this is and prints its status: JSON when `json`, else
/// the summary; with each lease's row when `peers`.
pub fn print(state_dir: &Path, json: bool, peers: bool) -> Result<(), StatusError> {
    let report = client::fetch(state_dir, peers)?;
    if json {
        // A report always serializes.
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", render::render(&report));
    }
    Ok(())
}
