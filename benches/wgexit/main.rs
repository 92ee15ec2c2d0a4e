//! `cargo bench --bench wgexit` (what `scripts/bench` runs): wgexit measured side by side with
//! the best alternatives on this machine, in one run, inside the namespace test world of
//! `netns-tests/world.rs`. Needs root. Rows:
//!
//! 1. CNI ADD / DEL latency, wgexit (userspace backend) against `ptp` + `host-local`;
//! 2. the container's first request after ADD (share that succeed on the first try, latency);
//! 3. lease throughput of one exit node with 64 concurrent clients, a new TLS connection each;
//! 4. lease latency and memory at growing numbers of live peers;
//! 5. tunnel throughput (iperf3) against the same WireGuard configured by hand with `wg-quick`,
//!    and against a plain routed veth path;
//! 6. private networks: member-to-member throughput against the egress tunnel, and the
//!    resolver's answers per second and p99 against `dnsmasq` on the same path (`dnsperf`),
//!    for `web.internal` and for a forwarded name;
//! 7. CNI ADD with the kernel backend against `ptp`, inside the VM test's VM (these machines
//!    have no WireGuard module);
//! 8. pools: the failover gap when the leader dies (median, max over kills), the kills that
//!    kept open connections, and leases/s on the pool (etcd store) against one exit node
//!    (embedded store);
//! 9. flow attribution: flows/s recorded without loss, the store's size per million flows,
//!    and the tunnel and lease rows with the recorder on against off.
//!
//! `-- --smoke` runs every row but 7 at a tiny size (seconds) so CI keeps this code
//! working; it writes nothing under `bench/results/`. `--only 7` runs row 7 in any mode.
//! `--trace` prints where wgexit's ADD goes, step by step, after rows 1-2 (and in row 7's
//! VM, on its console: `target/vm/bench-console.log`), and in row 8 each failover step by
//! step, in milliseconds from the kill.

#[path = "../../netns-tests/open_flows.rs"]
mod open_flows;
#[path = "../../netns-tests/pool_world.rs"]
mod pool_world;
#[path = "../../netns-tests/world.rs"]
mod world;

mod attribution;
mod cni;
mod failover_trace;
mod leases;
mod networks;
mod perf;
mod pool;
mod report;
mod resolvers;
mod stats;
mod steps;
mod tunnel;
mod vm;

use std::path::PathBuf;
use std::time::Instant;

use world::World;

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub containers: usize,
    pub first_peers: usize,
    pub throughput_leases: usize,
    pub concurrency: usize,
    pub scale_points: Vec<usize>,
    pub scale_samples: usize,
    pub iperf_secs: u32,
    pub iperf_rounds: usize,
    /// Seconds of `dnsperf` per resolver, name and round in row 6.
    pub dns_secs: u32,
    /// Row 8: leader kills, and leases on the pool and on one exit node.
    pub pool_kills: usize,
    pub pool_leases: usize,
    /// Where to write a `perf record` of wgexitd during the throughput burst (and, with
    /// `.internal` and `.forwarded` appended, during row 6's first round), if anywhere.
    pub perf: Option<PathBuf>,
    /// Rounds the lease burst of row 3 is cut into, so the row states its spread.
    pub lease_rounds: usize,
    /// Containers of each plugin in row 7 (in the VM, where everything is slower).
    pub vm_containers: usize,
    /// What the big egress of row 5 gets (`--big`).
    pub big: tunnel::Big,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            containers: 60,
            first_peers: 100,
            throughput_leases: 6400,
            concurrency: 64,
            scale_points: vec![1_000, 10_000, 60_000],
            scale_samples: 100,
            iperf_secs: 5,
            iperf_rounds: 3,
            dns_secs: 5,
            pool_kills: 10,
            pool_leases: 400,
            perf: None,
            lease_rounds: 3,
            vm_containers: 20,
            big: tunnel::Big::Both,
        }
    }

    fn smoke() -> Sizes {
        Sizes {
            containers: 2,
            first_peers: 5,
            throughput_leases: 64,
            concurrency: 8,
            scale_points: vec![100],
            scale_samples: 5,
            iperf_secs: 1,
            iperf_rounds: 1,
            dns_secs: 1,
            pool_kills: 1,
            pool_leases: 50,
            perf: None,
            lease_rounds: 1,
            vm_containers: 2,
            big: tunnel::Big::Both,
        }
    }
}

/// The overlay pool of the benchmark's egress: room for the 60k-peer row.
pub const BENCH_POOL: &str = "100.96.0.0/16";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut sizes = if smoke { Sizes::smoke() } else { Sizes::full() };
    let mut out: Option<PathBuf> = None;
    let mut only: Option<String> = None;
    let mut print_json = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = it.next().map(PathBuf::from),
            "--only" => only = it.next().cloned(),
            "--containers" => sizes.containers = num(it.next()),
            "--leases" => sizes.throughput_leases = num(it.next()),
            "--scale" => {
                sizes.scale_points = it
                    .next()
                    .map(|s| s.split(',').map(|n| num(Some(&n.to_string()))).collect())
                    .unwrap_or_default()
            }
            "--iperf-secs" => sizes.iperf_secs = num(it.next()) as u32,
            "--perf" => sizes.perf = it.next().map(PathBuf::from),
            "--vm-containers" => sizes.vm_containers = num(it.next()),
            "--print-json" => print_json = true,
            "--trace" => steps::enable(),
            "--big" => {
                sizes.big = it
                    .next()
                    .and_then(|s| tunnel::Big::parse(s))
                    .unwrap_or_else(|| {
                        eprintln!("--big takes both, ips, rules or none");
                        std::process::exit(2)
                    })
            }
            _ => {} // cargo bench passes --bench
        }
    }
    let out = out.unwrap_or_else(|| {
        if smoke {
            std::env::temp_dir().join(format!("wgexit-bench-smoke-{}", std::process::id()))
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/results")
        }
    });
    let wants = |row: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|r| r == row))
    };

    let machine = report::Machine::probe();
    eprintln!(
        "wgexit bench ({}) on {}",
        if smoke { "smoke" } else { "full" },
        machine.line()
    );
    let started = Instant::now();
    let mut results = report::Results::new(machine, smoke, sizes.clone());
    // First, before this run's world exists: the VM has the machine to itself.
    let explicitly = |row: &str| {
        only.as_deref()
            .is_some_and(|o| o.split(',').any(|r| r == row))
    };
    if wants("7") && (!smoke || explicitly("7")) {
        eprintln!(
            "[7] kernel CNI ADD in a VM: {} containers each, wgexit and ptp",
            sizes.vm_containers
        );
        results.vm = Some(vm::run(sizes.vm_containers));
    }
    let mut settings = world::Settings {
        pool: Some(BENCH_POOL.to_string()),
        // Row 4 holds 60k leases with one token, beyond the default per-token quota (an equal
        // share of acme's /16 among its two tokens); no more than the largest pool holds.
        daemon_extra: "max_leases_per_owner = 65533".to_string(),
        ..Default::default()
    };
    if wants("5") {
        tunnel::big_egress(&mut settings, sizes.big);
    }
    let mut world = World::with(settings);
    let echo = cni::start_echo(&world);

    if wants("1") || wants("2") {
        eprintln!(
            "[1,2] CNI ADD/DEL: {} containers each, wgexit and ptp",
            sizes.containers
        );
        results.cni = Some(cni::run(&mut world, &echo, sizes.containers));
        steps::print();
    }
    if wants("5") {
        eprintln!(
            "[5] tunnel throughput: iperf3 {} s x {} rounds",
            sizes.iperf_secs, sizes.iperf_rounds
        );
        results.tunnel = Some(tunnel::run(&mut world, &sizes));
    }
    if wants("6") {
        eprintln!(
            "[6] private networks: iperf3 {} s x {} rounds, dnsperf {} s per resolver and name",
            sizes.iperf_secs, sizes.iperf_rounds, sizes.dns_secs
        );
        results.networks = Some(networks::run(&mut world, &sizes));
    }
    // Before rows 3 and 4, so the exit node compared with the pool carries few peers.
    if wants("8") {
        eprintln!(
            "[8] pool: {} leader kills, {} leases on the pool and on one exit node",
            sizes.pool_kills, sizes.pool_leases
        );
        results.pool = Some(pool::run(
            &world,
            sizes.pool_kills,
            sizes.pool_leases,
            sizes.concurrency,
        ));
    }
    // Before rows 3 and 4 too: the on/off comparison restarts the daemon, cheaper with few
    // peers.
    if wants("9") {
        eprintln!(
            "[9] attribution: flows recorded per second, store size, recorder on against off"
        );
        results.attribution = Some(attribution::run(&mut world, &sizes));
    }
    // After the tunnel row, so the tunnel is measured on an exit node that is not carrying
    // 60k peers.
    if wants("3") || wants("4") {
        eprintln!(
            "[3,4] leases: throughput with {} clients, then scale",
            sizes.concurrency
        );
        results.leases = Some(leases::run(&world, &sizes));
    }
    results.seconds = started.elapsed().as_secs_f64();
    drop(world);

    let table = results.table();
    println!("{table}");
    if print_json {
        // For row 7: the VM's host reads this line off the guest's console.
        match serde_json::to_string(&results) {
            Ok(json) => println!("{}{json}", vm::MARKER),
            Err(e) => eprintln!("cannot encode the results: {e}"),
        }
    }
    if let Err(e) = results.write(&out) {
        eprintln!("cannot write results to {}: {e}", out.display());
        std::process::exit(1);
    }
    eprintln!("results in {} ({:.0} s)", out.display(), results.seconds);
    if smoke {
        let _ = std::fs::remove_dir_all(&out);
    }
}

fn num(s: Option<&String>) -> usize {
    s.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        eprintln!("expected a number after an option");
        std::process::exit(2)
    })
}

/// Runs `f` on a new thread inside network namespace `ns` (a name under /var/run/netns).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = PathBuf::from(format!("/var/run/netns/{ns}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            let netns = wgexit::net::Netns::open(&path).expect("open netns");
            netns.run(f).expect("enter netns")
        })
        .join()
        .expect("thread in netns")
    })
}
