//! Tenant isolation: two egresses of two tenants (two tokens) on one exit node, a
//! dual-stack container each. Tenant A's container cannot reach B's container (overlay
//! IPv4 or IPv6), cannot reach B's WireGuard endpoint (or anything else of the exit node)
//! through its tunnel, and cannot leave from B's IPs: a forged source of B's overlay range
//! goes nowhere, and A's traffic reaches the echo servers only from A's egress IPs.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::world::{
    sh, Container, Settings, World, EGRESS_IP, EGRESS_IP6, OTHER_IP, OTHER_IP6, OTHER_POOL6,
};

/// A TCP listener on port 9000 (both families) in a container, recording who connected.
struct Listener {
    seen: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl Listener {
    /// Listening when it returns.
    fn start(c: &Container) -> Listener {
        let ns = std::fs::File::open(&c.netns_path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = TcpListener::bind("[::]:9000").unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        seen2.lock().unwrap().push(peer);
                        let _ = s.read(&mut [0u8; 64]);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Listener { seen, stop }
    }

    fn seen(&self) -> Vec<SocketAddr> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` on a thread inside `c`'s network namespace.
fn in_container<T: Send + 'static>(c: &Container, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(&c.netns_path).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// `c`'s overlay addresses from its ADD result: (IPv4, IPv6), without prefix lengths.
fn overlay(result: &Value) -> (String, String) {
    let ip = |i: usize| {
        let a = result["ips"][i]["address"].as_str().unwrap();
        a.split('/').next().unwrap().to_string()
    };
    (ip(0), ip(1))
}

fn url(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("http://[{addr}]:{port}/")
    } else {
        format!("http://{addr}:{port}/")
    }
}

/// The refusals counted for `egress` (its named counter).
pub(crate) fn refused(w: &World, egress: &str) -> u64 {
    let listed = sh(&[
        "ip",
        "netns",
        "exec",
        &w.exit,
        "nft",
        "list",
        "counter",
        "inet",
        "wgexitd",
        &format!("refused_{egress}"),
    ]);
    let rest = &listed[listed.find("packets ").unwrap() + "packets ".len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn isolation_tenants_reach_neither_each_other_nor_each_others_endpoint_nor_ips() {
    let mut w = World::with(Settings {
        dual_stack: true,
        ..Settings::default()
    });
    let a = w.container("ta");
    let b = w.container("tb");
    let ra = w.cni("ADD", &a, &w.net_conf("acme")).ok();
    let rb = w.cni("ADD", &b, &w.net_conf("other")).ok();
    let (b4, b6) = overlay(&rb);

    // Each tenant leaves from its own IPs only, in both families.
    assert_eq!(w.echo_from(&a).unwrap(), EGRESS_IP, "{}", w.daemon_log());
    assert_eq!(w.echo6_from(&a).unwrap(), EGRESS_IP6);
    assert_eq!(w.echo_from(&b).unwrap(), OTHER_IP);
    assert_eq!(w.echo6_from(&b).unwrap(), OTHER_IP6);

    // B's container listens; A cannot reach it over either family (the exit node drops
    // tunnel-to-tunnel traffic), and B sees nobody.
    let listener = Listener::start(&b);
    let dropped = w.nft_counter("acme: no other forwarding in");
    for addr in [&b4, &b6] {
        let tried = w.fetch_from(&a, &url(addr, 9000), Duration::from_secs(2));
        assert!(tried.is_err(), "A reached B's {addr}: {tried:?}");
    }
    assert!(listener.seen().is_empty(), "{:?}", listener.seen());
    assert!(w.nft_counter("acme: no other forwarding in") >= dropped + 2);
    // Nor is A's own overlay reachable from B.
    let (a4, _) = overlay(&ra);
    assert!(w
        .fetch_from(&b, &url(&a4, 9000), Duration::from_secs(1))
        .is_err());

    endpoint_is_refused_fast(&w, &a);
    forged_sources_go_nowhere(&a);
    // And after all that, A still leaves from A's IPs only.
    assert_eq!(w.echo_from(&a).unwrap(), EGRESS_IP);
    assert_eq!(w.echo6_from(&a).unwrap(), EGRESS_IP6);

    held_elsewhere_is_refused_too(&w, &a);
}

/// In a pool another member may hold B's egress IP, so packets to it leave by the uplink
/// instead of reaching this exit node: here it moves to the isp, where a server answers
/// (the exit node itself reaches it). A's tunnel is still refused at once, because the
/// config names it.
fn held_elsewhere_is_refused_too(w: &World, a: &Container) {
    sh(&[
        "ip",
        "-n",
        &w.exit,
        "addr",
        "del",
        &format!("{OTHER_IP}/24"),
        "dev",
        "isp0",
    ]);
    sh(&[
        "ip",
        "-n",
        &w.isp,
        "addr",
        "add",
        &format!("{OTHER_IP}/32"),
        "dev",
        "lo",
    ]);
    w.start_echo("203.0.113.78:8080");
    let from_exit = sh(&[
        "ip",
        "netns",
        "exec",
        &w.exit,
        "curl",
        "-s",
        "-m",
        "3",
        "http://203.0.113.78:8080/",
    ]);
    assert_eq!(from_exit.trim(), EGRESS_IP);
    let before = refused(w, "acme");
    let start = Instant::now();
    let err = w
        .fetch_from(a, "http://203.0.113.78:8080/", Duration::from_secs(3))
        .unwrap_err();
    assert!(err.contains("exit Some(7)"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(refused(w, "acme") > before);
}

/// B's WireGuard endpoint (198.51.100.2:51821) and B's egress IPs are the exit node's own
/// addresses: from A's tunnel they are refused at once (TCP reset, ICMP administratively
/// prohibited for UDP) and counted for A's egress.
fn endpoint_is_refused_fast(w: &World, a: &Container) {
    let before = refused(w, "acme");
    let targets = [
        "198.51.100.2:51821".to_string(),
        format!("{OTHER_IP}:80"),
        format!("[{OTHER_IP6}]:80"),
    ];
    for target in &targets {
        let start = Instant::now();
        let err = w
            .fetch_from(a, &format!("http://{target}/"), Duration::from_secs(3))
            .unwrap_err();
        assert!(err.contains("exit Some(7)"), "{target}: {err}");
        assert!(start.elapsed() < Duration::from_secs(2), "{target}: slow");
    }
    let udp = in_container(a, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("198.51.100.2:51821").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // A WireGuard handshake initiation is 148 bytes starting with type 1.
        let mut initiation = [0u8; 148];
        initiation[0] = 1;
        s.send(&initiation).unwrap();
        s.recv(&mut [0u8; 64]).map_err(|e| e.kind())
    });
    assert!(
        matches!(
            udp,
            Err(ErrorKind::HostUnreachable | ErrorKind::ConnectionRefused)
        ),
        "UDP to B's endpoint: {udp:?}"
    );
    assert!(refused(w, "acme") >= before + 4, "{}", refused(w, "acme"));
}

/// A's container with an address of B's overlay ranges on its link, sending from it: the
/// exit node lets nothing of it out (no echo answers), so A cannot borrow B's egress IPs.
fn forged_sources_go_nowhere(a: &Container) {
    let forged4 = "100.97.0.200";
    let forged6 = OTHER_POOL6.replace("::/64", "::beef");
    for (addr, len) in [(forged4, "32"), (forged6.as_str(), "128")] {
        let with_len = format!("{addr}/{len}");
        let mut add = vec![
            "ip", "-n", &a.netns, "addr", "add", &with_len, "dev", "eth0",
        ];
        if len == "128" {
            add.push("nodad");
        }
        sh(&add);
    }
    for (addr, echo) in [
        (forged4, "http://198.18.0.10:8080/"),
        (forged6.as_str(), "http://[2001:db8:ec::10]:8080/"),
    ] {
        let out = crate::world::try_sh(&[
            "ip",
            "netns",
            "exec",
            &a.netns,
            "curl",
            "-s",
            "-m",
            "2",
            "--interface",
            addr,
            echo,
        ]);
        assert!(
            !out.status.success(),
            "a forged source {addr} got out: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for with_len in [format!("{forged4}/32"), format!("{forged6}/128")] {
        sh(&[
            "ip", "-n", &a.netns, "addr", "del", &with_len, "dev", "eth0",
        ]);
    }
}
