//! Runs `conntrack -E` (conntrack-tools) in the daemon's network namespace and hands the
//! events of source-NATed flows from the egresses' pools to the recorder.
//!
//! Off the packet path: the kernel sends conntrack's events to a netlink socket without
//! waiting for anyone (unreliable delivery), so a reader that falls behind loses events
//! (conntrack prints "We have hit ENOBUFS!", counted here) but never slows forwarding.
//! Between the reader and the store is a bounded queue; what does not fit is counted too.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::directory::{in_pools, EgressPools};
use super::event::{parse, CtEvent};
use super::AttributionError;
use crate::metrics::Metrics;

/// conntrack's netlink receive buffer: room for a burst of about 40,000 events.
const SOCKET_BUFFER: &str = "16777216";

/// Why events were not recorded.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LostLabels {
    /// `queue`: the recorder's queue was full; `store`: writing them failed.
    pub cause: String,
}

/// What the recorder counts for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Flow events written to the store.
    pub recorded: Counter,
    /// Events read but not written, by cause.
    pub lost: Family<LostLabels, Counter>,
    /// Times the kernel could not deliver events to the reader (ENOBUFS): each time, an
    /// unknown number of events was lost.
    pub kernel_overflows: Counter,
}

impl Counters {
    pub fn register(self: &Arc<Self>, metrics: &Metrics) {
        metrics.register(
            "wgexit_attribution_recorded",
            "Flow events (start or end of a source-NATed flow) written to the attribution store.",
            self.recorded.clone(),
        );
        metrics.register(
            "wgexit_attribution_lost",
            "Flow events read from conntrack but not recorded, by cause (queue: the recorder fell behind; store: writing failed).",
            self.lost.clone(),
        );
        metrics.register(
            "wgexit_attribution_kernel_overflows",
            "Times conntrack's event socket overflowed (ENOBUFS): events were lost before the reader saw them.",
            self.kernel_overflows.clone(),
        );
    }

    pub fn lose(&self, cause: &str, n: u64) {
        self.lost
            .get_or_create(&LostLabels {
                cause: cause.into(),
            })
            .inc_by(n);
    }
}

/// Starts `conntrack -E` for new and destroyed source-NATed flows (`--src-nat`: the API's
/// and the members' own connections are never printed, nor parsed here), with timestamps
/// and ids, `SCHED_BATCH` at nice [`super::priority::NICE`]. It dies with the daemon,
/// even one killed outright.
pub fn spawn_conntrack() -> Result<Child, AttributionError> {
    let mut command = Command::new("conntrack");
    command
        .args(["-E", "-e", "NEW,DESTROY", "--src-nat", "-o", "timestamp,id"])
        .args(["-b", SOCKET_BUFFER])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (prctl(2), sched_setscheduler(2), setpriority(2)).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Below forwarding and the API, as the recorder's threads.
            super::priority::lower(0)
        });
    }
    command
        .spawn()
        .map_err(|e| AttributionError::Reader(e.to_string()))
}

/// Turns accounting on in this namespace, so ended flows carry their byte counts.
pub fn enable_accounting() {
    let path = "/proc/sys/net/netfilter/nf_conntrack_acct";
    if let Err(e) = std::fs::write(path, "1") {
        tracing::warn!(error = %e, "cannot turn on conntrack accounting ({path}); flows are recorded without byte counts");
    }
}

/// Reads `child` until it exits, then starts another (after a second), for ever.
pub async fn run(
    mut child: Child,
    egresses: Vec<EgressPools>,
    queue: mpsc::Sender<CtEvent>,
    counters: Arc<Counters>,
) {
    loop {
        let status = read(&mut child, &egresses, &queue, &counters).await;
        tracing::error!(
            ?status,
            "conntrack -E stopped; flows are not recorded until it runs again"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        child = match spawn_conntrack() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot restart the flow reader");
                continue;
            }
        };
    }
}

async fn read(
    child: &mut Child,
    egresses: &[EgressPools],
    queue: &mpsc::Sender<CtEvent>,
    counters: &Arc<Counters>,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(watch_stderr(stderr, counters.clone()));
    }
    let Some(stdout) = child.stdout.take() else {
        return child.wait().await;
    };
    let mut lines = BufReader::with_capacity(1 << 20, stdout).lines();
    while let Some(line) = lines.next_line().await? {
        let Some(event) = parse(&line) else { continue };
        if !event.source_natted() || !in_pools(egresses, event.original.src) {
            continue;
        }
        if queue.try_send(event).is_err() {
            counters.lose("queue", 1);
        }
    }
    child.wait().await
}

/// Counts conntrack's ENOBUFS warnings and logs whatever else it says.
async fn watch_stderr(stderr: tokio::process::ChildStderr, counters: Arc<Counters>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("ENOBUFS") {
            counters.kernel_overflows.inc();
            tracing::warn!("conntrack's event socket overflowed: some flows were not recorded (counted in wgexit_attribution_kernel_overflows)");
        } else if !line.contains("flow events have been shown") && !line.trim().is_empty() {
            tracing::debug!(conntrack = %line, "flow reader");
        }
    }
}
