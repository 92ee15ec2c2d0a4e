//! Row 6: private networks, in the same run as the rest.
//!
//! * Throughput (iperf3) from one network member to another through the gateway, against a
//!   wgexit egress container to `isp` (the egress tunnel of row 5), same rounds.
//! * The network's resolver against Debian's `dnsmasq` on the same path, under `dnsperf`
//!   ([`crate::resolvers`]).
//!
//! ```text
//!  member a ──wgexit──► gateway (exit ns) ──wgexit──► member b (iperf3 -s)
//! ```

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::cni::{invoke, REFERENCE_PLUGINS};
use crate::resolvers::{Askers, ResolverResults, UPSTREAM};
use crate::tunnel::{iperf, TunnelResults};
use crate::world::{sh, try_sh, World, API};
use crate::{in_ns, Sizes};

const PREFIX: &str = "fdaa:0:b::/48";
const RESOLVER: &str = "fdaa:0:b::3";
const TOKEN: &str = "bench-net-token-0123456789abcdef";
const IPERF_PORT: &str = "5202";

#[derive(Debug, Serialize)]
pub struct NetworkResults {
    /// Mbit/s per round.
    pub member_to_member: Vec<f64>,
    pub egress: Vec<f64>,
    pub resolvers: ResolverResults,
}

impl NetworkResults {
    pub fn median(v: &[f64]) -> f64 {
        TunnelResults::median(v)
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Adds network `bench` to the world's daemon (restarted with it).
fn add_network(world: &mut World) {
    let tokens = world.path("bench-net.tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).expect("token file");
    std::fs::write(world.path("bench-net.token"), format!("{TOKEN}\n")).expect("token file");
    let table = format!(
        "\n[[network]]\nname = \"bench\"\nprefix = \"{PREFIX}\"\nwg_interface = \"{}n\"\n\
         listen_port = 51840\nendpoint = \"198.51.100.2:51840\"\ntoken_file = \"{}\"\n\
         dns_upstream = [\"{UPSTREAM}:53\"]\n",
        world.id,
        tokens.display()
    );
    let config = std::fs::read_to_string(world.daemon_config()).expect("config");
    std::fs::write(world.daemon_config(), format!("{config}{table}")).expect("config");
    world.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    world.start_daemon();
}

/// A member of app `app`.
fn member_conf(world: &World, app: &str) -> String {
    json!({
        "cniVersion": "1.0.0", "name": "bench-net", "type": "wgexit",
        "servers": [format!("https://{API}")], "network": "bench", "app": app,
        "tokenFile": world.path("bench-net.token"), "caFile": world.ca_file(),
        "backend": world.backend, "routes": "none", "dataDir": world.data_dir(),
    })
    .to_string()
}

fn wait_listening(ns: &str, filter: &str) {
    let start = Instant::now();
    while !try_sh(&["ip", "netns", "exec", ns, "ss", "-Hln", filter])
        .stdout
        .starts_with(b"UNCONN")
        && !try_sh(&["ip", "netns", "exec", ns, "ss", "-Htln", filter])
            .stdout
            .starts_with(b"LISTEN")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{filter} in {ns}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The global IPv6 address of `eth0` in `ns`: the member's /128.
fn address6(ns: &str) -> String {
    let out = sh(&[
        "ip", "-j", "-n", ns, "-6", "addr", "show", "dev", "eth0", "scope", "global",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    v[0]["addr_info"][0]["local"]
        .as_str()
        .expect("an IPv6 address")
        .to_string()
}

pub fn run(world: &mut World, sizes: &Sizes) -> NetworkResults {
    add_network(world);
    let wgexit = std::path::PathBuf::from(crate::world::bin("wgexit"));
    let (a, b, e, q) = (
        world.container("neta"),
        world.container("netb"),
        world.container("nete"),
        world.container("netq"),
    );
    // b is `web.internal`; the others ask.
    let (web, conf) = (member_conf(world, "web"), member_conf(world, "client"));
    let egress = world.net_conf("acme").to_string();
    let add = |c, conf: &str| {
        in_ns(&world.host, || {
            invoke(&wgexit, REFERENCE_PLUGINS, "ADD", c, conf)
        })
    };
    add(&a, &conf).expect("ADD a");
    add(&b, &web).expect("ADD b");
    add(&e, &egress).expect("ADD egress container");
    add(&q, &conf).expect("ADD q");
    let b_ip = address6(&b.netns);

    let servers = [
        (&b.netns, format!("sport = :{IPERF_PORT}")),
        (&world.isp, format!("sport = :{IPERF_PORT}")),
    ];
    let _iperf: Vec<Killed> = servers
        .iter()
        .map(|(ns, _)| {
            Killed(
                Command::new("ip")
                    .args(["netns", "exec", ns, "iperf3", "-s", "-p", IPERF_PORT])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("iperf3 -s"),
            )
        })
        .collect();
    for (ns, filter) in &servers {
        wait_listening(ns, filter);
    }
    let mut r = NetworkResults {
        member_to_member: vec![],
        egress: vec![],
        resolvers: ResolverResults::default(),
    };
    for _ in 0..sizes.iperf_rounds {
        r.member_to_member
            .push(iperf(&a.netns, &b_ip, IPERF_PORT, sizes.iperf_secs));
        r.egress
            .push(iperf(&e.netns, "198.18.0.10", IPERF_PORT, sizes.iperf_secs));
        eprintln!(
            "  Mbit/s: member to member {:.0}, egress {:.0}",
            r.member_to_member.last().unwrap_or(&0.0),
            r.egress.last().unwrap_or(&0.0)
        );
    }
    let (a_ip, q_ip) = (address6(&a.netns), address6(&q.netns));
    let askers = Askers {
        resolver: RESOLVER,
        member_ns: &a.netns,
        member: &a_ip,
        inside: &q_ip,
        web: &b_ip,
    };
    let perf = sizes.perf.as_deref();
    r.resolvers = crate::resolvers::run(world, &askers, sizes.dns_secs, sizes.iperf_rounds, perf);
    for (c, conf) in [(&a, &conf), (&b, &web), (&e, &egress), (&q, &conf)] {
        let _ = in_ns(&world.host, || {
            invoke(&wgexit, REFERENCE_PLUGINS, "DEL", c, conf)
        });
    }
    r
}
