//! The recorder: the reader's events, in batches, resolved to their leases and written
//! to the store; old days deleted as days pass.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::directory::{egress_pools, LeaseDirectory};
use super::event::{CtEvent, Kind};
use super::priority;
use super::reader::{self, Counters};
use super::store::{Change, FlowStore, Mapping};
use super::time::{day, now};
use super::AttributionError;
use crate::config::Config;
use crate::metrics::Metrics;

/// Events waiting for the store; past this, new ones are counted lost.
pub const QUEUE: usize = 262_144;
/// Most events written in one transaction per day file.
pub const MAX_BATCH: usize = 8192;

/// The running recorder's store (for queries) and counters.
pub struct Recorder {
    pub store: Arc<FlowStore>,
    pub counters: Arc<Counters>,
}

/// The recorder and its tasks.
pub type Started = (Recorder, Vec<JoinHandle<()>>);

/// Opens the store and starts the reader and the writer; `None` when `attribution_days`
/// is 0.
pub fn start(
    config: &Config,
    directory: Arc<dyn LeaseDirectory>,
    metrics: &Metrics,
) -> Result<Option<Started>, AttributionError> {
    if config.attribution_days == 0 {
        return Ok(None);
    }
    let dir = config.state_dir.join("attribution");
    let store = Arc::new(FlowStore::open(&dir, config.attribution_days, day(now()))?);
    let counters = Arc::new(Counters::default());
    counters.register(metrics);
    reader::enable_accounting();
    let child = reader::spawn_conntrack()?;
    let (tx, rx) = mpsc::channel(QUEUE);
    // Below the lease API and the tunnel: threads of their own, lowered (see [`priority`]).
    let lowered = |e: std::io::Error| AttributionError::Reader(e.to_string());
    let tasks = vec![
        priority::spawn_lowered(
            "flow-reader",
            reader::run(child, egress_pools(&config.egress), tx, counters.clone()),
        )
        .map_err(lowered)?,
        priority::spawn_lowered(
            "flow-writer",
            write_loop(rx, store.clone(), directory, counters.clone()),
        )
        .map_err(lowered)?,
    ];
    Ok(Some((Recorder { store, counters }, tasks)))
}

/// Takes what the queue holds (at least one event, at most [`MAX_BATCH`]) and writes it.
pub async fn write_loop(
    mut rx: mpsc::Receiver<CtEvent>,
    store: Arc<FlowStore>,
    directory: Arc<dyn LeaseDirectory>,
    counters: Arc<Counters>,
) {
    let mut today = day(now());
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let changes = changes(&batch, directory.as_ref()).await;
        batch.clear();
        let n = changes.len() as u64;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.apply(&changes)).await {
            Ok(Ok(_)) => {
                counters.recorded.inc_by(n);
            }
            Ok(Err(e)) => {
                counters.lose("store", n);
                tracing::error!(error = %e, "flow records not written");
            }
            Err(e) => {
                counters.lose("store", n);
                tracing::error!(error = %e, "flow writer failed");
            }
        }
        if day(now()) != today {
            today = day(now());
            let s = store.clone();
            let pruned = move || {
                s.compact_before(today)?;
                s.prune(today)
            };
            match tokio::task::spawn_blocking(pruned).await {
                Ok(Ok(gone)) if !gone.is_empty() => {
                    tracing::info!(days = gone.len(), "old flow records deleted")
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot compact or delete old flow records")
                }
                _ => {}
            }
        }
    }
}

/// The store's changes for `events`, each flow's lease looked up by its overlay source
/// (once for the whole batch).
pub async fn changes(events: &[CtEvent], directory: &dyn LeaseDirectory) -> Vec<Change> {
    let sources: HashSet<_> = events.iter().map(|e| e.original.src).collect();
    let holders = directory.holders(&sources).await;
    events
        .iter()
        .map(|e| {
            let mapping = Mapping {
                ip: e.reply.dst,
                port: e.reply.dport,
                proto: e.proto,
            };
            let destination = (e.original.dst, e.original.dport);
            let lease = holders.get(&e.original.src).cloned();
            match e.kind {
                Kind::New => Change::Open {
                    mapping,
                    first: e.at,
                    id: e.id,
                    destination,
                    lease,
                },
                Kind::Destroy => Change::Close {
                    mapping,
                    last: e.at,
                    id: e.id,
                    destination,
                    bytes: (e.original.bytes, e.reply.bytes),
                    lease,
                },
            }
        })
        .collect()
}
