//! Row 9: flow attribution. What the recorder sustains (flows per second offered through
//! the exit node's SNAT, with every event recorded: nothing counted lost in
//! `wgexit_attribution_lost_total` nor `wgexit_attribution_kernel_overflows_total`), what a
//! million flows take on disk and how fast the store alone writes them, and what the
//! recorder costs: the tunnel (iperf3) and the lease API with `attribution_days = 0`
//! against the default, alternating, in the same run.
//!
//! The offered flows are UDP datagrams, one per flow, each to another port of the isp's
//! address, sent from an address of the egress's pool on the exit node itself (what the
//! tunnel would deliver; the tunnel's own limit is row 5's): the same SNAT rule, the same
//! conntrack events. Their conntrack timeout is lowered to 2 s in the exit namespace so
//! their ends are recorded during the run too.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use wgexitd::attribution::store::{Change, FlowStore, Mapping};
use wgexitd::attribution::{LeaseInfo, Proto};

use crate::leases::Target;
use crate::world::{sh, try_sh, World, API};
use crate::{in_ns, Sizes};

/// The generator's source: an address of the bench egress's pool, on the exit node.
const SOURCE: &str = "100.96.255.250";

#[derive(Debug, Serialize)]
pub struct Step {
    /// Flows offered per second, and how many.
    pub offered_per_second: f64,
    pub flows: usize,
    /// Events recorded during the step and until the recorder caught up.
    pub recorded: u64,
    pub lost: u64,
    pub kernel_overflows: u64,
}

#[derive(Debug, Serialize)]
pub struct AttributionResults {
    pub steps: Vec<Step>,
    /// The highest offered rate of flows with none lost (flow events: twice that).
    pub sustained_flows_per_second: f64,
    /// The store alone: flows (start and end) written per second, and bytes on disk per
    /// million flows once the day's file is compacted.
    pub store_flows_per_second: f64,
    pub store_bytes_per_million_flows: f64,
    pub store_flows: usize,
    /// Mbit/s per round, recorder on and off.
    pub tunnel_on: Vec<f64>,
    pub tunnel_off: Vec<f64>,
    /// Leases per second per round, recorder on and off.
    pub leases_on: Vec<f64>,
    pub leases_off: Vec<f64>,
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A counter's value in Prometheus text (summed over its labels).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn counters(world: &World) -> [u64; 3] {
    let m = world.metrics();
    [
        counter(&m, "wgexit_attribution_recorded_total"),
        counter(&m, "wgexit_attribution_lost_total"),
        counter(&m, "wgexit_attribution_kernel_overflows_total"),
    ]
}

/// Sends one datagram per flow at `rate` for `secs` from the pool address: distinct
/// flows, as source port × destination port.
fn offer(world: &World, rate: f64, secs: f64) -> usize {
    let flows = (rate * secs) as usize;
    in_ns(&world.exit, || {
        let sockets: Vec<UdpSocket> = (0..16)
            .map(|_| UdpSocket::bind(format!("{SOURCE}:0")).expect("bind the pool address"))
            .collect();
        let start = Instant::now();
        for n in 0..flows {
            let port = 1024 + (n / sockets.len()) % 60_000;
            let to = SocketAddr::from(([198, 18, 0, 10], port as u16));
            let _ = sockets[n % sockets.len()].send_to(b"x", to);
            // Paced: ahead of the schedule, wait.
            let due = Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                if wait > Duration::from_millis(1) {
                    std::thread::sleep(wait);
                }
            }
        }
    });
    flows
}

/// Offers growing rates until one loses events; returns every step.
fn sustained(world: &World, sizes: &Sizes) -> Vec<Step> {
    sh(&[
        "ip",
        "-n",
        &world.exit,
        "addr",
        "add",
        &format!("{SOURCE}/32"),
        "dev",
        "lo",
    ]);
    let udp_timeout = "net.netfilter.nf_conntrack_udp_timeout=2";
    sh(&[
        "ip",
        "netns",
        "exec",
        &world.exit,
        "sysctl",
        "-q",
        "-w",
        udp_timeout,
    ]);
    let (rates, secs): (&[f64], f64) = if sizes.scale_samples < 10 {
        (&[500.0, 2_000.0], 0.5)
    } else {
        (
            &[1_000.0, 2_500.0, 5_000.0, 10_000.0, 20_000.0, 40_000.0],
            4.0,
        )
    };
    let mut steps = Vec::new();
    for &rate in rates {
        let before = counters(world);
        let flows = offer(world, rate, secs);
        // Caught up: the starts at least, then quiet for half a second.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = counters(world);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = counters(world);
            let quiet = now[0] == last[0];
            last = now;
            if (quiet && now[0] - before[0] >= flows as u64) || Instant::now() > deadline {
                break;
            }
        }
        let step = Step {
            offered_per_second: rate,
            flows,
            recorded: last[0] - before[0],
            lost: last[1] - before[1],
            kernel_overflows: last[2] - before[2],
        };
        eprintln!("  {rate:.0} flows/s offered: {step:?}");
        let clean = step.lost == 0 && step.kernel_overflows == 0;
        steps.push(step);
        if !clean {
            break;
        }
    }
    let _ = try_sh(&[
        "ip",
        "-n",
        &world.exit,
        "addr",
        "del",
        &format!("{SOURCE}/32"),
        "dev",
        "lo",
    ]);
    steps
}

/// Writes `flows` flows (a start and an end each, a thousand leases) to a fresh store
/// in batches as the recorder does: flows per second and bytes per million flows.
fn store_alone(world: &World, flows: usize) -> (f64, f64) {
    let dir = world.path("attribution-bench");
    let t0 = 20_000u64 * 86_400_000_000;
    let store = FlowStore::open(&dir, 30, 20_000).expect("open a flow store");
    let lease = |n: usize| LeaseInfo {
        egress: "acme".into(),
        container_id: format!("{n:064x}"),
        host: "host-1".into(),
        owner: "@ci".into(),
        overlay: std::net::IpAddr::from([100, 96, (n / 256) as u8, (n % 256) as u8]),
    };
    let start = Instant::now();
    let batch = 4096;
    for chunk in (0..flows).collect::<Vec<_>>().chunks(batch) {
        let mut changes = Vec::with_capacity(chunk.len() * 2);
        for &n in chunk {
            let mapping = Mapping {
                ip: std::net::IpAddr::from([203, 0, 113, 77]),
                port: (1024 + n % 60_000) as u16,
                proto: Proto::Tcp,
            };
            let destination = (std::net::IpAddr::from([198, 18, (n % 250) as u8, 10]), 443);
            changes.push(Change::Open {
                mapping,
                first: t0 + n as u64 * 100,
                id: n as u32,
                destination,
                lease: Some(lease(n % 1000)),
            });
            changes.push(Change::Close {
                mapping,
                last: t0 + n as u64 * 100 + 50,
                id: n as u32,
                destination,
                bytes: (Some(1000), Some(100_000)),
                lease: None,
            });
        }
        store.apply(&changes).expect("write flows");
    }
    let rate = flows as f64 / start.elapsed().as_secs_f64();
    let written = store.disk_bytes() as f64 * 1e6 / flows as f64;
    // As the recorder leaves a day's file once the day is over.
    store.compact_before(20_001).expect("compact");
    let bytes = store.disk_bytes() as f64 * 1e6 / flows as f64;
    eprintln!(
        "  store: {:.0} MB per million flows as written, {:.0} MB compacted",
        written / 1e6,
        bytes / 1e6
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    (rate, bytes)
}

/// Restarts the exit node's daemon with the recorder on or off.
fn recorder(world: &mut World, on: bool, original: &str) {
    let config = if on {
        original.to_string()
    } else {
        format!("attribution_days = 0\n{original}")
    };
    std::fs::write(world.daemon_config(), config).expect("write the config");
    world.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    world.start_daemon();
    // Off is off: no per-packet accounting either (the recorder turns it on).
    let acct = format!("net.netfilter.nf_conntrack_acct={}", u8::from(on));
    sh(&[
        "ip",
        "netns",
        "exec",
        &world.exit,
        "sysctl",
        "-q",
        "-w",
        &acct,
    ]);
}

/// The tunnel and the lease API with the recorder off and on, alternating.
fn on_against_off(world: &mut World, sizes: &Sizes, r: &mut AttributionResults) {
    let server = Server(
        Command::new("ip")
            .args(["netns", "exec", &world.isp, "iperf3", "-s", "-p", "5209"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 -s"),
    );
    let c = world.container("attr");
    let conf = world.net_conf("acme");
    world.cni("ADD", &c, &conf).ok();
    let start = Instant::now();
    while !String::from_utf8_lossy(
        &try_sh(&[
            "ip",
            "netns",
            "exec",
            &world.isp,
            "ss",
            "-Htln",
            "sport = :5209",
        ])
        .stdout,
    )
    .starts_with("LISTEN")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "iperf3 -s not listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let original = std::fs::read_to_string(world.daemon_config()).expect("read the config");
    let target = Target {
        servers: vec![format!("https://{API}")],
        ca: world.ca_file(),
    };
    let leases = (sizes.throughput_leases / 4).max(16);
    for round in 0..sizes.iperf_rounds {
        // Alternate which goes first.
        for on in [round % 2 == 0, round % 2 != 0] {
            recorder(world, on, &original);
            let mbit = crate::tunnel::iperf(&c.netns, "198.18.0.10", "5209", sizes.iperf_secs);
            let (rate, errors, first) =
                crate::pool::burst(&world.host, &target, leases, sizes.concurrency);
            assert_eq!(errors, 0, "leases with the recorder {on}: {first:?}");
            let (t, l) = if on {
                (&mut r.tunnel_on, &mut r.leases_on)
            } else {
                (&mut r.tunnel_off, &mut r.leases_off)
            };
            t.push(mbit);
            l.push(rate);
            eprintln!(
                "  recorder {}: tunnel {mbit:.0} Mbit/s, {rate:.0} leases/s",
                if on { "on" } else { "off" }
            );
        }
    }
    recorder(world, true, &original);
    world.cni("DEL", &c, &conf).ok_empty();
    drop(server);
}

pub fn run(world: &mut World, sizes: &Sizes) -> AttributionResults {
    let steps = sustained(world, sizes);
    let sustained_flows_per_second = steps
        .iter()
        .filter(|s| s.lost == 0 && s.kernel_overflows == 0 && s.recorded >= s.flows as u64)
        .map(|s| s.offered_per_second)
        .fold(0.0, f64::max);
    let store_flows = if sizes.scale_samples < 10 {
        20_000
    } else {
        1_000_000
    };
    let (store_rate, bytes) = store_alone(world, store_flows);
    eprintln!(
        "  store alone: {store_rate:.0} flows/s, {:.0} MB per million flows",
        bytes / 1e6
    );
    let mut r = AttributionResults {
        steps,
        sustained_flows_per_second,
        store_flows_per_second: store_rate,
        store_bytes_per_million_flows: bytes,
        store_flows,
        tunnel_on: vec![],
        tunnel_off: vec![],
        leases_on: vec![],
        leases_off: vec![],
    };
    on_against_off(world, sizes, &mut r);
    r
}

fn median(v: &[f64]) -> f64 {
    crate::stats::Summary::of(v).median
}

/// The table's rows: (metric, wgexit, comparison, ratio, target).
pub fn rows(r: &AttributionResults) -> Vec<[String; 5]> {
    let cost = |on: &[f64], off: &[f64]| {
        let (a, b) = (median(on), median(off));
        let ratio = a / b.max(1e-9);
        let met = if ratio >= 0.95 { "met" } else { "NOT met" };
        [
            format!("{a:.0}"),
            format!("recorder off {b:.0}"),
            format!("{ratio:.2}x"),
            format!("≥ 0.95x: {met}"),
        ]
    };
    let [t_on, t_off, t_ratio, t_target] = cost(&r.tunnel_on, &r.tunnel_off);
    let [l_on, l_off, l_ratio, l_target] = cost(&r.leases_on, &r.leases_off);
    vec![
        [
            "attribution: flows/s recorded without loss (UDP, start and end each)".into(),
            format!("{:.0}", r.sustained_flows_per_second),
            format!(
                "highest offered: {:.0}",
                r.steps.last().map_or(0.0, |s| s.offered_per_second)
            ),
            String::new(),
            String::new(),
        ],
        [
            format!(
                "attribution store alone: flows/s, MB per million flows ({} flows)",
                r.store_flows
            ),
            format!(
                "{:.0}, {:.0} MB",
                r.store_flows_per_second,
                r.store_bytes_per_million_flows / 1e6
            ),
            String::new(),
            String::new(),
            String::new(),
        ],
        [
            "tunnel Mbit/s, recorder on (median)".into(),
            t_on,
            t_off,
            t_ratio,
            t_target,
        ],
        [
            "leases/s, recorder on (median)".into(),
            l_on,
            l_off,
            l_ratio,
            l_target,
        ],
    ]
}
