//! The exit node loses its WireGuard device (a reboot, `ip link del`) or its `wireguard-go`
//! stalls: idle containers come back within seconds with the same addresses, because the
//! exit node starts the handshakes itself, and no lease is collected for it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::world::{sh, Container, Settings, World, EGRESS_IP, TOKEN};

/// Collection and reconcile every second, a short first-handshake timeout; containers keep
/// the default keepalive (25 s), so between requests they are idle and never rekey on
/// their own within a test.
fn quick_exit_node() -> Settings {
    Settings {
        daemon_extra: "first_handshake_timeout = 4\ncollect_interval = 1\nreconcile_interval = 1\n"
            .into(),
        ..Settings::default()
    }
}

const FIRST_HANDSHAKE: Duration = Duration::from_secs(4);
const COLLECT_INTERVAL: Duration = Duration::from_secs(1);

/// Ten containers added and seen leaving from the egress IP; their addresses by container.
fn ten_containers(w: &mut World) -> (Vec<Container>, HashMap<String, String>) {
    let conf = w.net_conf("acme");
    let cs: Vec<_> = (0..10).map(|i| w.container(&format!("v{i}"))).collect();
    for c in &cs {
        w.cni("ADD", c, &conf).ok();
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP);
    }
    // The exit node notes each peer's endpoint when it looks at its peers (every
    // collection); give it two rounds.
    std::thread::sleep(2 * COLLECT_INTERVAL + Duration::from_millis(500));
    (cs, addresses(w))
}

fn addresses(w: &World) -> HashMap<String, String> {
    w.leases("acme", TOKEN)
        .iter()
        .map(|l| {
            (
                l["attachment"]["container_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                l["address"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every container reaches the echo server from the egress IP before `deadline`.
fn all_reach_the_echo_server_by(w: &World, cs: &[Container], deadline: Instant) {
    for c in cs {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match w.echo_from_within(c, left.max(Duration::from_millis(200))) {
                Ok(ip) => {
                    assert_eq!(ip, EGRESS_IP);
                    break;
                }
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{} cannot reach the echo server in time: {e}\n{}",
                    c.id,
                    w.daemon_log()
                ),
            }
        }
    }
}

/// After the device was made anew: same leases, and none collected once
/// `first_handshake_timeout` plus a collection interval have passed.
fn nothing_collected(w: &World, before: &HashMap<String, String>) {
    std::thread::sleep(FIRST_HANDSHAKE + COLLECT_INTERVAL + Duration::from_millis(500));
    assert_eq!(&addresses(w), before, "{}", w.daemon_log());
    assert!(
        !w.daemon_log().contains("idle lease collected"),
        "{}",
        w.daemon_log()
    );
}

#[test]
fn a_rebooted_exit_node_brings_ten_idle_containers_back_within_five_seconds() {
    let mut w = World::with(quick_exit_node());
    let (cs, before) = ten_containers(&mut w);

    // The "reboot": the device goes, and the daemon dies without a word.
    sh(&["ip", "-n", &w.exit, "link", "del", &w.wg_interface]);
    w.stop_daemon(Signal::SIGKILL);
    let restarted = Instant::now();
    w.start_daemon();
    all_reach_the_echo_server_by(&w, &cs, restarted + Duration::from_secs(5));
    nothing_collected(&w, &before);
}

#[test]
fn a_device_deleted_under_a_running_exit_node_is_back_within_five_seconds() {
    let mut w = World::with(quick_exit_node());
    let (cs, before) = ten_containers(&mut w);

    let deleted = Instant::now();
    sh(&["ip", "-n", &w.exit, "link", "del", &w.wg_interface]);
    all_reach_the_echo_server_by(&w, &cs, deleted + Duration::from_secs(5));
    assert!(
        w.daemon_log().contains("created_device: true"),
        "{}",
        w.daemon_log()
    );
    nothing_collected(&w, &before);
}

#[test]
fn a_stalled_wireguard_go_is_waited_for_not_replaced() {
    let mut w = World::with(quick_exit_node());
    let conf = w.net_conf("acme");
    let cs: Vec<_> = (0..2).map(|i| w.container(&format!("s{i}"))).collect();
    for c in &cs {
        w.cni("ADD", c, &conf).ok();
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP);
    }
    let wg_go = w.exit_wireguard_go().expect("the exit's wireguard-go");
    let sessions = w.exit_peer_stats();

    // Longer than the reconcile interval and any probe timeout.
    let pid = nix::unistd::Pid::from_raw(wg_go as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();

    for c in &cs {
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP);
    }
    // The same process, and every peer kept its session and counters.
    assert_eq!(w.exit_wireguard_go(), Some(wg_go), "{}", w.daemon_log());
    let after = w.exit_peer_stats();
    for (key, (handshake, rx)) in &sessions {
        let (h2, rx2) = after[key];
        assert!(h2 >= *handshake && *handshake > 0, "{key}: session reset");
        assert!(rx2 >= *rx, "{key}: counters reset");
    }
    assert!(
        !w.daemon_log().contains("had drifted"),
        "{}",
        w.daemon_log()
    );
}
