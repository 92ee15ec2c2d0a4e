//! Row 8: pools of exit nodes, in the pool world of `netns-tests/pool_world.rs` (two
//! members, a 3-member etcd cluster): the failover gap a container sees when the leader
//! dies (`kill -9` with its WireGuard device, cut off its segments, as the namespace test
//! does), over several kills, the killed member coming back as a standby each time;
//! whether each kill keeps the container's open connections (`netns-tests/open_flows.rs`:
//! TCP on which only the server writes, TCP on which the container writes, UDP on which
//! only the server sends); and lease throughput on the pool (etcd store) against one exit
//! node (embedded store), with row 3's load generator at the same size.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::in_ns;
use crate::leases::Target;
use crate::open_flows::{Kept, OpenFlows, SERVER};
use crate::pool_world::{echo_once, Pool, Probe, EGRESS_IP};
use crate::stats::{ms, Summary};
use crate::world::{World, API};
use crate::{failover_trace, steps};

#[derive(Debug, Serialize)]
pub struct PoolResults {
    /// Longest time between two answered probes (one every 100 ms) per kill, ms.
    pub failover_gaps_ms: Vec<f64>,
    pub failover_gap: Summary,
    /// Kills that kept every open connection of the container (see the module's doc).
    pub connections_kept: usize,
    /// The most UDP datagrams lost in one kill's pause (nothing resends them).
    pub datagrams_lost_max: usize,
    /// Why a kill did not keep them, for each that did not.
    pub connections_lost: Vec<String>,
    /// Leases per second: (pool with the etcd store, one exit node with the embedded store).
    pub pool_leases_per_second: f64,
    pub embedded_leases_per_second: f64,
    pub leases: usize,
    pub clients: usize,
    pub lease_errors: usize,
    pub first_error: Option<String>,
}

/// `count` leases from `clients` concurrent clients in namespace `ns`: leases per second,
/// errors and the first one.
pub(crate) fn burst(
    ns: &str,
    t: &Target,
    count: usize,
    clients: usize,
) -> (f64, usize, Option<String>) {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..clients.min(count.max(1)) {
            s.spawn(|| {
                in_ns(ns, || loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    match t.lease_once(n) {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().unwrap().push(e),
                    }
                })
            });
        }
    });
    let per_second = done.into_inner() as f64 / start.elapsed().as_secs_f64();
    let errors = errors.into_inner().unwrap();
    (per_second, errors.len(), errors.first().cloned())
}

/// What a leader logs when it gives its addresses up for want of an acknowledged pulse.
const LET_GO: &str = "no pulse acknowledged by etcd in time";

fn let_go(log: &str) -> usize {
    log.matches(LET_GO).count()
}

/// One kill: its probe gap, whether it kept the open connections, the new leader.
struct Failover {
    gap: Duration,
    kept: Result<Kept, String>,
    next: usize,
}

/// Kills the leader with a probe and open connections running from container `netns`;
/// returns once the killed member is back as a standby.
fn one_failover(p: &mut Pool, leader: usize, netns: &Path) -> Failover {
    let isp = PathBuf::from(format!("/var/run/netns/{}", p.isp));
    let server: IpAddr = SERVER.parse().unwrap();
    let next = 1 - leader;
    let let_go_before = let_go(&p.log(next));
    let flows = OpenFlows::open(&isp, server, &[netns]);
    let probe = Probe::start(netns);
    // Also long enough for the leader to have copied the flows' state (every 200 ms).
    std::thread::sleep(Duration::from_millis(500));
    let kill = failover_trace::Kill::now();
    p.kill_member(leader);
    let killed = Instant::now();
    p.wait_holds(next, Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while echo_once(netns, Duration::from_secs(1)).is_err() {
        assert!(Instant::now() < deadline, "no answer after the failover");
    }
    std::thread::sleep(Duration::from_millis(500));
    let answers: Vec<Instant> = probe.stop_timed().into_iter().map(|(at, _)| at).collect();
    let gap = answers
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(Duration::MAX);
    // Every flow carries ten more lines or datagrams on the new leader, or fails.
    flows.wait_flowing(10, Duration::from_secs(10));
    let kept = flows.close(&[EGRESS_IP]).map_err(|e| {
        let log = p.log(next);
        match let_go(&log) - let_go_before {
            0 => e,
            n => {
                format!("{e} (meanwhile the new leader let its addresses go {n} time(s): {LET_GO})")
            }
        }
    });
    if steps::enabled() {
        failover_trace::print(&kill, killed, &answers, &p.log(next));
    }
    p.revive_member(leader);
    // Back as a standby with every peer, before the next kill.
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.peers(leader).len() < p.peers(next).len() {
        assert!(Instant::now() < deadline, "the revived member lacks peers");
        std::thread::sleep(Duration::from_millis(50));
    }
    Failover { gap, kept, next }
}

pub fn run(world: &World, kills: usize, leases: usize, clients: usize) -> PoolResults {
    let mut p = Pool::new();
    let mut leader = p.wait_leader(Duration::from_secs(10));
    let conf = p.net_conf();
    let c = p.container("bench");
    p.cni(0, "ADD", &c, &conf).ok();
    p.wait_endpoints_published(1, Duration::from_secs(5));
    let (mut gaps, mut kept, mut lost, mut datagrams_lost_max) = (Vec::new(), 0, Vec::new(), 0);
    for k in 0..kills {
        let f = one_failover(&mut p, leader, &c.netns_path);
        let flows = match &f.kept {
            Ok(k) => format!(
                "connections kept ({} of {} datagrams lost in the pause)",
                k.datagrams_lost, k.datagrams_sent
            ),
            Err(e) => format!("connections NOT kept: {e}"),
        };
        eprintln!(
            "  kill {}: member {leader} -> {}, gap {:?}, {flows}",
            k + 1,
            f.next,
            f.gap
        );
        gaps.push(ms(f.gap));
        match f.kept {
            Ok(k) => {
                kept += 1;
                datagrams_lost_max = datagrams_lost_max.max(k.datagrams_lost);
            }
            Err(e) => lost.push(format!("kill {}: {e}", k + 1)),
        }
        leader = f.next;
    }
    let pool = Target {
        servers: p
            .members
            .iter()
            .map(|m| format!("https://{}:7443", m.ip))
            .collect(),
        ca: p.ca_file(),
    };
    let (pool_rate, errors, first_error) = burst(&p.hosts[0], &pool, leases, clients);
    drop(p);
    let single = Target {
        servers: vec![format!("https://{API}")],
        ca: world.ca_file(),
    };
    let (embedded_rate, e2, f2) = burst(&world.host, &single, leases, clients);
    eprintln!(
        "  leases/s: pool (etcd) {pool_rate:.0}, one exit node (embedded) {embedded_rate:.0}"
    );
    PoolResults {
        failover_gap: Summary::of(&gaps),
        failover_gaps_ms: gaps,
        connections_kept: kept,
        datagrams_lost_max,
        connections_lost: lost,
        pool_leases_per_second: pool_rate,
        embedded_leases_per_second: embedded_rate,
        leases,
        clients,
        lease_errors: errors + e2,
        first_error: first_error.or(f2),
    }
}

/// The table's rows: (metric, wgexit, comparison, ratio, target).
pub fn rows(r: &PoolResults) -> Vec<[String; 5]> {
    let g = &r.failover_gap;
    vec![
        [
            format!(
                "pool failover gap median / max (ms), {} kill(s) of the leader",
                g.n
            ),
            format!("{:.0} / {:.0}", g.median, g.max),
            "Tailscale subnet router up to ~15000 (published; exit nodes: no failover)".into(),
            "—".into(),
            format!(
                "max ≤ 1000: {}",
                if g.n > 0 && g.max <= 1000.0 {
                    "yes"
                } else {
                    "NO"
                }
            ),
        ],
        [
            "open connections kept through a kill".into(),
            format!(
                "{}/{} (TCP server-writes, TCP client-writes, UDP)",
                r.connections_kept, g.n
            ),
            "Cilium egress gateway, Tailscale: every connection broken (#39245, #16162)".into(),
            "—".into(),
            format!(
                "{}/{}: {}",
                g.n,
                g.n,
                if g.n > 0 && r.connections_kept == g.n {
                    "yes"
                } else {
                    "NO"
                }
            ),
        ],
        [
            format!(
                "leases/s on the pool (etcd), {} leases, {} clients, {} errors",
                r.leases, r.clients, r.lease_errors
            ),
            format!("{:.0}", r.pool_leases_per_second),
            format!(
                "one exit node (embedded) {:.0}",
                r.embedded_leases_per_second
            ),
            format!(
                "{:.2}x",
                r.pool_leases_per_second / r.embedded_leases_per_second
            ),
            String::new(),
        ],
    ]
}
