//! Row 5: iperf3 to `isp` from a wgexit container, through a tunnel of the same WireGuard
//! implementation (`wireguard-go`) configured by hand with `wg-quick`, and over a plain
//! routed veth path (the ceiling), in the same run:
//!
//! ```text
//!  wgexit container ──wgexit tunnel──► exit ──► isp 198.18.0.10
//!  hand ns ──wg-quick tunnel (198.19.0.2 → 198.19.0.1:51830)──► exit (SNAT) ──► isp 203.0.113.1
//!  hand ns ──veth 198.19.0.2 → 198.19.0.1──► exit ──► isp 198.18.0.10          (plain)
//! ```

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
/// Returns the two wg-quick config paths (to take them down).
fn hand_tunnel(world: &mut World) -> (String, String, String) {
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
    let table = format!("{}hand", world.id);
    let exit_conf = write_conf(
        world,
        &format!("{}x", world.id),
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {HAND_PORT}\nAddress = 100.98.0.1/24\n\
             PostUp = nft add table ip {table}; nft add chain ip {table} post '{{ type nat hook postrouting priority srcnat; }}'; nft add rule ip {table} post ip saddr 100.98.0.0/24 oifname isp0 snat to {EGRESS_IP}\n\
             PostDown = nft delete table ip {table}\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 100.98.0.2/32\n",
            exit_key.to_base64(),
            hand_key.public().to_base64()
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
    (hand, exit_conf, hand_conf)
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
    // A wgexit container.
    let c = world.container("iperf");
    let conf = world.net_conf("acme").to_string();
    let wgexit = std::path::PathBuf::from(env!("CARGO_BIN_EXE_wgexit"));
    in_ns(&world.host, || {
        invoke(&wgexit, REFERENCE_PLUGINS, "ADD", &c, &conf)
    })
    .expect("ADD");
    let (hand, exit_conf, hand_conf) = hand_tunnel(world);

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
    };
    for _ in 0..sizes.iperf_rounds {
        r.wgexit
            .push(iperf(&c.netns, "198.18.0.10", "5201", sizes.iperf_secs));
        r.wg_quick
            .push(iperf(&hand, "203.0.113.1", "5201", sizes.iperf_secs));
        r.plain
            .push(iperf(&hand, "198.18.0.10", "5201", sizes.iperf_secs));
        eprintln!(
            "  Mbit/s: wgexit {:.0}, wg-quick {:.0}, plain veth {:.0}",
            r.wgexit.last().unwrap_or(&0.0),
            r.wg_quick.last().unwrap_or(&0.0),
            r.plain.last().unwrap_or(&0.0)
        );
    }
    let _ = in_ns(&world.host, || {
        invoke(&wgexit, REFERENCE_PLUGINS, "DEL", &c, &conf)
    });
    let _ = wg_quick(&hand, "down", &hand_conf);
    let _ = wg_quick(&world.exit, "down", &exit_conf);
    drop(server);
    r
}
