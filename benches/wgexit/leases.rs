//! Rows 3 and 4: the exit node's lease API under load, through the plugin's own client
//! ([`wgexit::client::Client`]), every lease on a new TLS connection as every CNI ADD
//! makes one; then lease latency and memory as the number of live peers grows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use wgexit::api::{Attachment, LeaseRequest};
use wgexit::client::Client;
use wgexit::keys::Key;

use crate::stats::{ms, Summary};
use crate::world::{World, API, TOKEN};
use crate::{in_ns, Sizes};

#[derive(Debug, Serialize)]
pub struct Burst {
    pub clients: usize,
    pub leases: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Summary,
    /// CPU time per lease (ms): the exit node's daemon, its wireguard-go, and the clients
    /// (this process: TLS handshakes, JSON). Where a lease's cost goes.
    pub cpu_ms_per_lease: CpuSplit,
    /// Leases per second of each round, when the burst was run in rounds.
    pub rounds_per_second: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct CpuSplit {
    pub wgexitd: f64,
    pub wireguard_go: f64,
    pub clients: f64,
}

/// User + system CPU time of a process (or of this one with `None`), ms.
pub fn cpu_ms(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let ticks = 100.0; // USER_HZ
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks * 1000.0)
        })
        .unwrap_or(0.0)
}

#[derive(Debug, Serialize)]
pub struct ScalePoint {
    /// Live peers when the samples were taken.
    pub peers: usize,
    /// Leases made one at a time at this size.
    pub latency: Summary,
    pub samples_ms: Vec<f64>,
    pub wgexitd_rss_kib: u64,
    pub wireguard_go_rss_kib: u64,
}

#[derive(Debug, Serialize)]
pub struct LeaseResults {
    pub throughput: Burst,
    pub throughput_samples_ms: Vec<f64>,
    pub scale: Vec<ScalePoint>,
    /// Memory of an exit node with no peers: (wgexitd, wireguard-go) KiB.
    pub idle_rss_kib: (u64, u64),
}

pub(crate) struct Target {
    pub servers: Vec<String>,
    pub ca: std::path::PathBuf,
}

impl Target {
    /// One lease the way the plugin's ADD makes it: a new client, so a new TLS connection.
    pub(crate) fn lease_once(&self, n: usize) -> Result<Duration, String> {
        let key = Key::generate_private().map_err(|e| e.to_string())?;
        let start = Instant::now();
        let client =
            Client::new(&self.servers, &self.ca, TOKEN.to_string()).map_err(|e| e.to_string())?;
        let req = LeaseRequest {
            public_key: key,
            attachment: Attachment {
                container_id: format!("bench-{n}"),
                ifname: "eth0".into(),
                host: "bench".into(),
                args: Default::default(),
            },
        };
        client.lease("acme", &req).map_err(|e| e.to_string())?;
        Ok(start.elapsed())
    }
}

/// `count` leases from `clients` concurrent clients in the host namespace.
fn burst(world: &World, t: &Target, count: usize, clients: usize) -> (Burst, Vec<f64>) {
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(count));
    let errors = Mutex::new(Vec::new());
    let wg_pid = wgexit::wg::userspace::pid_of(&world.wg_interface);
    let cpu_before = [cpu_ms(world.daemon_pid()), cpu_ms(wg_pid), cpu_ms(None)];
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..clients.min(count.max(1)) {
            s.spawn(|| {
                in_ns(&world.host, || {
                    let mut mine = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count {
                            break;
                        }
                        match t.lease_once(n) {
                            Ok(d) => mine.push(ms(d)),
                            Err(e) => errors.lock().unwrap().push(e),
                        }
                    }
                    samples.lock().unwrap().extend(mine);
                })
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    let cpu_after = [cpu_ms(world.daemon_pid()), cpu_ms(wg_pid), cpu_ms(None)];
    let samples = samples.into_inner().unwrap();
    let errors = errors.into_inner().unwrap();
    let per = |i: usize| (cpu_after[i] - cpu_before[i]) / samples.len().max(1) as f64;
    (
        Burst {
            clients,
            leases: samples.len(),
            errors: errors.len(),
            first_error: errors.first().cloned(),
            seconds,
            per_second: samples.len() as f64 / seconds,
            latency: Summary::of(&samples),
            cpu_ms_per_lease: CpuSplit {
                wgexitd: per(0),
                wireguard_go: per(1),
                clients: per(2),
            },
            rounds_per_second: vec![samples.len() as f64 / seconds],
        },
        samples,
    )
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn memory(world: &World) -> (u64, u64) {
    (
        rss_kib(world.daemon_pid()),
        rss_kib(wgexit::wg::userspace::pid_of(&world.wg_interface)),
    )
}

fn point(world: &World, t: &Target, peers_before: usize, samples: usize) -> ScalePoint {
    let (b, v) = burst(world, t, samples, 1);
    assert_eq!(b.errors, 0, "lease failed: {:?}", b.first_error);
    let (d, g) = memory(world);
    ScalePoint {
        peers: peers_before + samples,
        latency: b.latency,
        samples_ms: v,
        wgexitd_rss_kib: d,
        wireguard_go_rss_kib: g,
    }
}

/// Row 3's burst in [`Sizes::lease_rounds`] rounds (so it states its spread), as one.
fn rounds(world: &World, t: &Target, sizes: &Sizes) -> (Burst, Vec<f64>) {
    let n = sizes.lease_rounds.max(1);
    let mut all: Option<(Burst, Vec<f64>)> = None;
    for r in 0..n {
        let count = sizes.throughput_leases / n + usize::from(r < sizes.throughput_leases % n);
        let (b, v) = burst(world, t, count, sizes.concurrency);
        all = Some(match all {
            None => (b, v),
            Some((mut a, mut samples)) => {
                let weight = |x: f64, m: usize| x * m as f64;
                let leases = a.leases + b.leases;
                let cpu = |x: f64, y: f64| {
                    (weight(x, a.leases) + weight(y, b.leases)) / leases.max(1) as f64
                };
                a.cpu_ms_per_lease = CpuSplit {
                    wgexitd: cpu(a.cpu_ms_per_lease.wgexitd, b.cpu_ms_per_lease.wgexitd),
                    wireguard_go: cpu(
                        a.cpu_ms_per_lease.wireguard_go,
                        b.cpu_ms_per_lease.wireguard_go,
                    ),
                    clients: cpu(a.cpu_ms_per_lease.clients, b.cpu_ms_per_lease.clients),
                };
                a.leases = leases;
                a.errors += b.errors;
                a.first_error = a.first_error.or(b.first_error);
                a.seconds += b.seconds;
                a.per_second = a.leases as f64 / a.seconds;
                a.rounds_per_second.extend(b.rounds_per_second);
                samples.extend(v);
                a.latency = Summary::of(&samples);
                (a, samples)
            }
        });
    }
    all.unwrap_or_else(|| burst(world, t, 0, sizes.concurrency))
}

/// Row 3's burst, recorded by `perf` when asked.
fn throughput_burst(world: &World, t: &Target, sizes: &Sizes) -> (Burst, Vec<f64>) {
    let recording = sizes
        .perf
        .as_ref()
        .and_then(|out| crate::perf::record(world, out));
    let (throughput, throughput_samples) = rounds(world, t, sizes);
    drop(recording);
    eprintln!(
        "  {} leases in {:.1} s: {:.0}/s, p99 {:.1} ms, {} errors",
        throughput.leases,
        throughput.seconds,
        throughput.per_second,
        throughput.latency.p99,
        throughput.errors
    );
    (throughput, throughput_samples)
}

pub fn run(world: &World, sizes: &Sizes) -> LeaseResults {
    let t = Target {
        servers: vec![format!("https://{API}")],
        ca: world.ca_file(),
    };
    let mut live = world.leases("acme", TOKEN).len();
    let idle = memory(world);
    // The first peers, one at a time: what "adding the first peer" costs.
    let mut scale = vec![point(world, &t, live, sizes.first_peers)];
    live += sizes.first_peers;

    // Fill to each size and take samples there; the throughput burst runs once, after
    // the first size.
    let mut throughput = None;
    for (i, &target) in sizes.scale_points.iter().enumerate() {
        let fill = target.saturating_sub(live + sizes.scale_samples);
        if fill > 0 {
            let (b, _) = burst(world, &t, fill, sizes.concurrency);
            assert_eq!(b.errors, 0, "filling to {target}: {:?}", b.first_error);
            live += b.leases;
        }
        let p = point(world, &t, live, sizes.scale_samples);
        live = p.peers;
        eprintln!(
            "  {} peers: lease median {:.1} ms, wgexitd {} MiB, wireguard-go {} MiB",
            p.peers,
            p.latency.median,
            p.wgexitd_rss_kib / 1024,
            p.wireguard_go_rss_kib / 1024
        );
        scale.push(p);
        if i == 0 {
            let (b, samples) = throughput_burst(world, &t, sizes);
            live += b.leases;
            throughput = Some((b, samples));
        }
    }
    let (throughput, throughput_samples) =
        throughput.unwrap_or_else(|| throughput_burst(world, &t, sizes));
    LeaseResults {
        throughput,
        throughput_samples_ms: throughput_samples,
        scale,
        idle_rss_kib: idle,
    }
}
