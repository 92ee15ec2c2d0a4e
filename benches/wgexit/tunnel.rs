//! Row 5: iperf3 to `isp` from a wgexit container, through a tunnel of the same WireGuard
//! implementation (`wireguard-go`) configured by hand with `wg-quick`, and over a plain
//! routed veth path (the ceiling), in the same run:
//!
//! ```text
//!  wgexit container ──wgexit tunnel──► exit ──► isp 198.18.0.10
//!  wgexit container of egress "other" (64 IPs, 1,000 policy rules) ──► exit ──► isp
//!  hand ns ──wg-quick tunnel (198.19.0.2 → 198.19.0.1:51830)──► exit (SNAT) ──► isp 203.0.113.1
//!  hand ns ──veth 198.19.0.2 → 198.19.0.1──► exit ──► isp 198.18.0.10          (plain)
//!  moved ns ◄─TUN─ wireguard-go in the host ns ──► exit (SNAT) ──► isp 203.0.113.1 (moved)
//! ```
//!
//! The last is made by hand too (`wireguard-go`, `wg set`, `ip link set … netns`), but with
//! wgexit's topology: the device made in the host namespace, where its UDP socket stays, and
//! its TUN moved into another namespace. Set against wg-quick (socket and TUN in one
//! namespace), it measures what the topology costs; set against wgexit, what wgexit's own
//! differences (its exit node's rules, its settings) cost.
//!
//! Each round runs every path once; the order rotates from round to round, so no path
//! always goes first (or right after the costliest one).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use wgexit::keys::Key;

use crate::cni::{invoke, REFERENCE_PLUGINS};
use crate::world::{sh, try_sh, World, EGRESS_IP};
use crate::{in_ns, Sizes};

const HAND_PORT: u16 = 51830;

#[derive(Debug, Serialize)]
pub struct TunnelResults {
    /// Mbit/s per round.
    pub wgexit: Vec<f64>,
    pub wg_quick: Vec<f64>,
    pub plain: Vec<f64>,
    /// Through egress "other": [`BIG_EGRESS_IPS`] egress IPs and [`BIG_POLICY_RULES`]
    /// deny rules, none of which matches the iperf3 traffic.
    pub big_egress: Vec<f64>,
    /// The hand-made tunnel with wgexit's topology.
    pub moved: Vec<f64>,
}

/// The hand-made tunnels' parts.
struct Hand {
    ns: String,
    exit_conf: String,
    hand_conf: String,
    exit_public: Key,
    /// The private key of the moved tunnel's device (a second peer of the exit's).
    moved_key: Key,
}

/// The hand-made tunnel with wgexit's topology: its `wireguard-go` and the namespace its
/// TUN was moved into.
struct Moved {
    ns: String,
    link: String,
    _wireguard_go: Server,
}

impl Drop for Moved {
    fn drop(&mut self) {
        // wireguard-go exits when its TUN goes away.
        let _ = try_sh(&["ip", "-n", &self.ns, "link", "del", &self.link]);
    }
}

/// The size of egress "other" in the bench world, for the policy row.
pub const BIG_EGRESS_IPS: usize = 64;
pub const BIG_POLICY_RULES: usize = 1000;

/// What egress "other" is given for the policy row: both (the row as specified), only the
/// IPs, only the rules, or neither (a control: the same egress as acme but for its name,
/// port and pool), to tell the costs apart: `--big both|ips|rules|none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Big {
    Both,
    Ips,
    Rules,
    None,
}

impl Big {
    pub fn parse(s: &str) -> Option<Big> {
        match s {
            "both" => Some(Big::Both),
            "ips" => Some(Big::Ips),
            "rules" => Some(Big::Rules),
            "none" => Some(Big::None),
            _ => None,
        }
    }
}

/// World settings that make egress "other" the big one: [`BIG_EGRESS_IPS`] IPs and
/// [`BIG_POLICY_RULES`] distinct deny rules (half CIDRs, half a port range of the iperf3
/// server's /24 that leaves its port out).
pub fn big_egress(settings: &mut crate::world::Settings, big: Big) {
    if big == Big::None {
        return;
    }
    if big != Big::Rules {
        // Each egress IP takes a /29 of the pool.
        settings.other_pool = Some("100.97.0.0/20".into());
        settings.other_ips = (0..BIG_EGRESS_IPS)
            .map(|i| format!("203.0.113.{}", 100 + i))
            .collect();
    }
    if big == Big::Ips {
        return;
    }
    let rules: Vec<String> = (0..BIG_POLICY_RULES)
        .map(|i| {
            if i % 2 == 0 {
                format!("\"198.18.{}.{}/32\"", 100 + i / 500, i / 2 % 250 + 1)
            } else {
                format!("\"198.18.0.0/24 tcp/{}\"", 6000 + i)
            }
        })
        .collect();
    settings.other_tail = format!("[egress.policy]\ndeny = [{}]\n", rules.join(", "));
}

impl TunnelResults {
    pub fn median(v: &[f64]) -> f64 {
        crate::stats::Summary::of(v).median
    }
}

/// Runs `iperf3 -c target -p port` in `ns`; the receiver's Mbit/s.
pub fn iperf(ns: &str, target: &str, port: &str, secs: u32) -> f64 {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "iperf3",
        "-c",
        target,
        "-p",
        port,
        "-t",
        &secs.to_string(),
        "-J",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 gave no result: {out}"))
        / 1e6
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_conf(world: &World, name: &str, text: &str) -> String {
    let path = world.path(&format!("{name}.conf"));
    std::fs::write(&path, text).expect("write wg-quick config");
    path.display().to_string()
}

fn wg_quick(ns: &str, action: &str, conf: &str) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, "wg-quick", action, conf])
        .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
        .output()
        .expect("run wg-quick")
}

/// The hand-made tunnel: a namespace with a veth to the exit, `wg-quick` on both ends.
fn hand_tunnel(world: &mut World) -> Hand {
    let hand = world.container("hand").netns;
    sh(&[
        "ip",
        "link",
        "add",
        "hand0",
        "netns",
        &world.exit,
        "type",
        "veth",
        "peer",
        "name",
        "up0",
        "netns",
        &hand,
    ]);
    sh(&[
        "ip",
        "-n",
        &world.exit,
        "addr",
        "add",
        "198.19.0.1/24",
        "dev",
        "hand0",
    ]);
    sh(&["ip", "-n", &world.exit, "link", "set", "hand0", "up"]);
    sh(&[
        "ip",
        "-n",
        &hand,
        "addr",
        "add",
        "198.19.0.2/24",
        "dev",
        "up0",
    ]);
    sh(&["ip", "-n", &hand, "link", "set", "up0", "up"]);
    sh(&[
        "ip",
        "-n",
        &hand,
        "route",
        "add",
        "default",
        "via",
        "198.19.0.1",
    ]);
    // The plain path's way back.
    sh(&[
        "ip",
        "-n",
        &world.isp,
        "route",
        "add",
        "198.19.0.0/24",
        "via",
        EGRESS_IP,
    ]);

    let exit_key = Key::generate_private().expect("key");
    let hand_key = Key::generate_private().expect("key");
    let moved_key = Key::generate_private().expect("key");
    let table = format!("{}hand", world.id);
    let exit_conf = write_conf(
        world,
        &format!("{}x", world.id),
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {HAND_PORT}\nAddress = 100.98.0.1/24\n\
             PostUp = nft add table ip {table}; nft add chain ip {table} post '{{ type nat hook postrouting priority srcnat; }}'; nft add rule ip {table} post ip saddr 100.98.0.0/24 oifname isp0 snat to {EGRESS_IP}\n\
             PostDown = nft delete table ip {table}\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 100.98.0.2/32\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 100.98.0.3/32\n",
            exit_key.to_base64(),
            hand_key.public().to_base64(),
            moved_key.public().to_base64()
        ),
    );
    let hand_conf = write_conf(
        world,
        &format!("{}h", world.id),
        &format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.98.0.2/32\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 198.19.0.1:{HAND_PORT}\nAllowedIPs = 203.0.113.1/32\nPersistentKeepalive = 25\n",
            hand_key.to_base64(),
            exit_key.public().to_base64()
        ),
    );
    for (ns, conf) in [(&world.exit, &exit_conf), (&hand, &hand_conf)] {
        let out = wg_quick(ns, "up", conf);
        assert!(
            out.status.success(),
            "wg-quick up {conf}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Hand {
        ns: hand,
        exit_conf,
        hand_conf,
        exit_public: exit_key.public(),
        moved_key,
    }
}

/// The hand-made tunnel with wgexit's topology (see the module's doc), as 100.98.0.3.
fn moved_tunnel(world: &mut World, hand: &Hand) -> Moved {
    let ns = world.container("moved").netns;
    let link = format!("{}m", world.id);
    let wireguard_go = Server(
        Command::new("ip")
            .args(["netns", "exec", &world.host, "wireguard-go", "-f", &link])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wireguard-go"),
    );
    let socket = wgexit::wg::uapi::socket_path(&link);
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "wireguard-go {link} made no UAPI socket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let key_file = world.path("moved.key");
    std::fs::write(&key_file, hand.moved_key.to_base64()).expect("write key");
    let key_file = key_file.display().to_string();
    let exit_public = hand.exit_public.to_base64();
    let endpoint = format!("198.51.100.2:{HAND_PORT}");
    sh(&[
        "ip",
        "netns",
        "exec",
        &world.host,
        "wg",
        "set",
        &link,
        "private-key",
        &key_file,
        "peer",
        &exit_public,
        "endpoint",
        &endpoint,
        "allowed-ips",
        "203.0.113.1/32",
        "persistent-keepalive",
        "25",
    ]);
    sh(&["ip", "-n", &world.host, "link", "set", &link, "netns", &ns]);
    let moved = Moved {
        ns,
        link,
        _wireguard_go: wireguard_go,
    };
    let (ns, link) = (&moved.ns, &moved.link);
    sh(&["ip", "-n", ns, "addr", "add", "100.98.0.3/32", "dev", link]);
    sh(&["ip", "-n", ns, "link", "set", link, "mtu", "1420", "up"]);
    sh(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "203.0.113.1/32",
        "dev",
        link,
    ]);
    moved
}

pub fn run(world: &mut World, sizes: &Sizes) -> TunnelResults {
    let server = Server(
        Command::new("ip")
            .args(["netns", "exec", &world.isp, "iperf3", "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 -s"),
    );
    // A wgexit container on each egress.
    let c = world.container("iperf");
    let big = world.container("iperfbig");
    let conf = world.net_conf("acme").to_string();
    let big_conf = world.net_conf("other").to_string();
    let wgexit = std::path::PathBuf::from(crate::world::bin("wgexit"));
    for (c, conf) in [(&c, &conf), (&big, &big_conf)] {
        in_ns(&world.host, || {
            invoke(&wgexit, REFERENCE_PLUGINS, "ADD", c, conf)
        })
        .expect("ADD");
    }
    let hand_made = hand_tunnel(world);
    let moved = moved_tunnel(world, &hand_made);
    let hand = hand_made.ns.clone();

    // Wait for the iperf3 server (its listening socket: a probe connection would count as a
    // failed test run on its side).
    let start = Instant::now();
    let listening = || {
        try_sh(&[
            "ip",
            "netns",
            "exec",
            &world.isp,
            "ss",
            "-Htln",
            "sport = :5201",
        ])
        .stdout
        .starts_with(b"LISTEN")
    };
    while !listening() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "iperf3 -s in {} is not listening on port 5201 after 30 s",
            world.isp
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut r = TunnelResults {
        wgexit: vec![],
        wg_quick: vec![],
        plain: vec![],
        big_egress: vec![],
        moved: vec![],
    };
    let secs = sizes.iperf_secs;
    for round in 0..sizes.iperf_rounds {
        let mut got = [0.0; 5];
        for k in 0..got.len() {
            let path = (round + k) % got.len();
            got[path] = match path {
                0 => iperf(&c.netns, "198.18.0.10", "5201", secs),
                1 => iperf(&big.netns, "198.18.0.10", "5201", secs),
                2 => iperf(&hand, "203.0.113.1", "5201", secs),
                3 => iperf(&moved.ns, "203.0.113.1", "5201", secs),
                _ => iperf(&hand, "198.18.0.10", "5201", secs),
            };
        }
        let [w, b, q, m, p] = got;
        eprintln!(
            "  Mbit/s: wgexit {w:.0}, wgexit 64 IPs + 1000 rules {b:.0}, wg-quick {q:.0}, by hand with wgexit's topology {m:.0}, plain veth {p:.0}"
        );
        r.moved.push(m);
        r.wgexit.push(w);
        r.big_egress.push(b);
        r.wg_quick.push(q);
        r.plain.push(p);
    }
    for (c, conf) in [(&c, &conf), (&big, &big_conf)] {
        let _ = in_ns(&world.host, || {
            invoke(&wgexit, REFERENCE_PLUGINS, "DEL", c, conf)
        });
    }
    drop(moved);
    let _ = wg_quick(&hand, "down", &hand_made.hand_conf);
    let _ = wg_quick(&world.exit, "down", &hand_made.exit_conf);
    drop(server);
    r
}
