//! Row 6: private networks, in the same run as the rest.
//!
//! * Throughput (iperf3) from one network member to another through the gateway, against a
//!   wgexit egress container to `isp` (the egress tunnel of row 5), same rounds.
//! * `AAAA web.internal` answers per second and latency from wgexitd's resolver (asked by a
//!   member, through its tunnel), against Debian's `dnsmasq` answering the same name from a
//!   hosts file on the exit namespace (asked from the host namespace over a plain veth: no
//!   tunnel, so dnsmasq's numbers are an upper bound for it). Same load generator: a few
//!   clients, each sending its next query when the last is answered.
//!
//! ```text
//!  member a ──wgexit──► gateway (exit ns) ──wgexit──► member b (iperf3 -s)
//!  member a ──wgexit──► resolver fdaa:0:b::3        host ns ──veth──► dnsmasq 198.51.100.2:53
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use serde::Serialize;
use serde_json::json;

use crate::cni::{invoke, REFERENCE_PLUGINS};
use crate::stats::Summary;
use crate::tunnel::{iperf, TunnelResults};
use crate::world::{sh, try_sh, World, API};
use crate::{in_ns, Sizes};

const PREFIX: &str = "fdaa:0:b::/48";
const RESOLVER: &str = "[fdaa:0:b::3]:53";
const DNSMASQ: &str = "198.51.100.2:53";
const TOKEN: &str = "bench-net-token-0123456789abcdef";
const CLIENTS: usize = 4;
const IPERF_PORT: &str = "5202";

#[derive(Debug, Default, Serialize)]
pub struct DnsLoad {
    pub queries: usize,
    pub answered: usize,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Serialize)]
pub struct NetworkResults {
    /// Mbit/s per round.
    pub member_to_member: Vec<f64>,
    pub egress: Vec<f64>,
    pub resolver: DnsLoad,
    pub dnsmasq: DnsLoad,
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
         listen_port = 51840\nendpoint = \"198.51.100.2:51840\"\ntoken_file = \"{}\"\n",
        world.id,
        tokens.display()
    );
    let config = std::fs::read_to_string(world.daemon_config()).expect("config");
    std::fs::write(world.daemon_config(), format!("{config}{table}")).expect("config");
    world.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    world.start_daemon();
}

fn member_conf(world: &World) -> String {
    json!({
        "cniVersion": "1.0.0", "name": "bench-net", "type": "wgexit",
        "servers": [format!("https://{API}")], "network": "bench", "app": "web",
        "tokenFile": world.path("bench-net.token"), "caFile": world.ca_file(),
        "backend": world.backend, "routes": "none", "dataDir": world.data_dir(),
    })
    .to_string()
}

fn query(id: u16) -> Vec<u8> {
    let mut m = Message::new();
    let name = Name::from_ascii("web.internal.").expect("name");
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name, RecordType::AAAA));
    m.to_vec().expect("query")
}

/// One client: `n` queries to `server`, one at a time; the latencies of the answered ones.
fn client(server: SocketAddr, n: usize, first_id: u16) -> Vec<Duration> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("address");
    let socket = UdpSocket::bind(local).expect("bind");
    socket.connect(server).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = first_id.wrapping_add(i as u16);
        let start = Instant::now();
        if socket.send(&query(id)).is_err() {
            continue;
        }
        while let Ok(len) = socket.recv(&mut buf) {
            match Message::from_vec(&buf[..len]) {
                Ok(m) if m.id() == id => {
                    if !m.answers().is_empty() {
                        out.push(start.elapsed());
                    }
                    break;
                }
                _ => continue, // a late answer to an earlier query
            }
        }
    }
    out
}

/// `queries` spread over [`CLIENTS`] clients in namespace `ns`.
fn load(ns: &str, server: &str, queries: usize) -> DnsLoad {
    let server: SocketAddr = server.parse().expect("server");
    let per = queries.div_ceil(CLIENTS);
    let start = Instant::now();
    let latencies: Vec<Duration> = in_ns(ns, || {
        std::thread::scope(|s| {
            let clients: Vec<_> = (0..CLIENTS)
                .map(|c| s.spawn(move || client(server, per, (c * per) as u16)))
                .collect();
            clients
                .into_iter()
                .flat_map(|c| c.join().expect("client"))
                .collect()
        })
    });
    let secs = start.elapsed().as_secs_f64();
    let us: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let summary = Summary::of(&us);
    DnsLoad {
        queries: per * CLIENTS,
        answered: us.len(),
        per_second: us.len() as f64 / secs,
        p50_us: summary.median,
        p99_us: summary.p99,
    }
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
    let (a, b, e) = (
        world.container("neta"),
        world.container("netb"),
        world.container("nete"),
    );
    let (conf, egress) = (member_conf(world), world.net_conf("acme").to_string());
    let add = |c, conf: &str| {
        in_ns(&world.host, || {
            invoke(&wgexit, REFERENCE_PLUGINS, "ADD", c, conf)
        })
    };
    add(&a, &conf).expect("ADD a");
    add(&b, &conf).expect("ADD b");
    add(&e, &egress).expect("ADD egress container");
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
    let hosts = world.path("bench-hosts");
    std::fs::write(&hosts, format!("{b_ip} web.internal\n")).expect("hosts file");
    let _dnsmasq = Killed(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &world.exit,
                "dnsmasq",
                "--keep-in-foreground",
            ])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--user=root",
            ])
            .args([
                "--bind-interfaces",
                "--listen-address=198.51.100.2",
                "--local-ttl=5",
            ])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!(
                "--pid-file={}",
                world.path("bench-dnsmasq.pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian dnsmasq-base)"),
    );
    wait_listening(&world.exit, "sport = :53");

    let mut r = NetworkResults {
        member_to_member: vec![],
        egress: vec![],
        resolver: DnsLoad::default(),
        dnsmasq: DnsLoad::default(),
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
    r.resolver = load(&a.netns, RESOLVER, sizes.dns_queries);
    r.dnsmasq = load(&world.host, DNSMASQ, sizes.dns_queries);
    eprintln!(
        "  DNS answers/s: wgexitd {:.0} (p99 {:.0} µs), dnsmasq {:.0} (p99 {:.0} µs)",
        r.resolver.per_second, r.resolver.p99_us, r.dnsmasq.per_second, r.dnsmasq.p99_us
    );
    for (c, conf) in [(&a, &conf), (&b, &conf), (&e, &egress)] {
        let _ = in_ns(&world.host, || {
            invoke(&wgexit, REFERENCE_PLUGINS, "DEL", c, conf)
        });
    }
    r
}
