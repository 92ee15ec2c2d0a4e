//! Restarts and crashes of `wgexitd`: leases come back from the store, the WireGuard device
//! and its sessions are left as they are, and containers keep working without a new ADD.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::world::{sh, World, EGRESS_IP, TOKEN};

/// Leases of egress acme: container id -> (public key, address).
fn leases_by_container(w: &World) -> HashMap<String, (String, String)> {
    w.leases("acme", TOKEN)
        .iter()
        .map(|l| {
            (
                l["attachment"]["container_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                (
                    l["public_key"].as_str().unwrap().to_string(),
                    l["address"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn kill_9_with_ten_live_containers_and_restart_drops_nothing() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let containers: Vec<_> = (0..10).map(|i| w.container(&format!("k{i}"))).collect();
    let mut addresses = HashMap::new();
    for c in &containers {
        let r = w.cni("ADD", c, &conf).ok();
        addresses.insert(
            c.id.clone(),
            r["ips"][0]["address"].as_str().unwrap().to_string(),
        );
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP);
    }
    let before = leases_by_container(&w);
    assert_eq!(before.len(), 10);
    let wg_go = w.exit_wireguard_go().expect("the exit's wireguard-go");
    let stats_before = w.exit_peer_stats();
    assert_eq!(stats_before.len(), 10);

    w.stop_daemon(Signal::SIGKILL);
    // The data path does not need the daemon: wireguard-go runs in its own process group
    // and survives the daemon's SIGKILL, and the containers still get out.
    assert!(process_alive(wg_go), "wireguard-go died with the daemon");
    assert_eq!(w.echo_from(&containers[0]).unwrap(), EGRESS_IP);

    let restarted = Instant::now();
    w.start_daemon();
    let deadline = restarted + Duration::from_secs(5);
    for c in &containers {
        loop {
            match w.echo_from(c) {
                Ok(ip) => {
                    assert_eq!(ip, EGRESS_IP);
                    break;
                }
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{} cannot reach the echo server 5 s after the restart: {e}",
                    c.id
                ),
            }
        }
    }

    // Same leases, same addresses, same device process; no peer was re-added (a re-added
    // peer starts over with no handshake and zero counters).
    assert_eq!(leases_by_container(&w), before);
    for (id, (_, address)) in &before {
        assert_eq!(format!("{address}/32"), addresses[id]);
    }
    assert_eq!(w.exit_wireguard_go(), Some(wg_go));
    let stats_after = w.exit_peer_stats();
    assert_eq!(
        stats_after.keys().collect::<HashSet<_>>(),
        stats_before.keys().collect::<HashSet<_>>()
    );
    for (key, (handshake, rx)) in &stats_before {
        let (h2, rx2) = stats_after[key];
        assert!(h2 >= *handshake && h2 > 0, "{key}: handshake reset");
        assert!(rx2 >= *rx, "{key}: counters reset");
    }

    // No lease is handed out twice: new containers get fresh addresses.
    let taken: HashSet<String> = before.values().map(|(_, a)| a.clone()).collect();
    let mut fresh = HashSet::new();
    for i in 0..3 {
        let c = w.container(&format!("n{i}"));
        let r = w.cni("ADD", &c, &conf).ok();
        let a = r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .to_string();
        assert!(!taken.contains(&a), "{a} handed out twice");
        assert!(fresh.insert(a));
        assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    }
    let all = w.leases("acme", TOKEN);
    let distinct: HashSet<_> = all.iter().map(|l| l["address"].clone()).collect();
    assert_eq!((all.len(), distinct.len()), (13, 13));
}

#[test]
fn restart_adds_missing_peers_removes_unleased_ones_and_leaves_the_rest() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let cs: Vec<_> = (0..3).map(|i| w.container(&format!("r{i}"))).collect();
    for c in &cs {
        w.cni("ADD", c, &conf).ok();
    }
    let leases = leases_by_container(&w);
    let lost = &leases[&cs[0].id].0;
    let stranger = wgexit::keys::Key::generate_private()
        .unwrap()
        .public()
        .to_base64();
    w.stop_daemon(Signal::SIGKILL);
    // While the daemon is down the device drifts: a leased peer goes, an unknown one comes.
    let wg = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", &w.exit, "wg", "set", &w.wg_interface];
        all.extend_from_slice(args);
        sh(&all);
    };
    wg(&["peer", lost, "remove"]);
    wg(&["peer", &stranger, "allowed-ips", "100.96.0.200/32"]);
    // Traffic goes on while the daemon is down.
    assert_eq!(w.echo_from(&cs[1]).unwrap(), EGRESS_IP);
    let untouched = w.exit_peer_stats();

    w.start_daemon();
    let peers: HashSet<String> = w.exit_peers().into_iter().collect();
    let leased: HashSet<String> = leases.values().map(|(k, _)| k.clone()).collect();
    assert_eq!(peers, leased, "{}", w.daemon_log());
    // The peers that were right kept their sessions.
    let after = w.exit_peer_stats();
    for c in &cs[1..] {
        let key = &leases[&c.id].0;
        let (h, rx) = untouched[key];
        assert!(h > 0 && after[key].0 >= h, "{key}: session reset");
        assert!(after[key].1 >= rx, "{key}: counters reset");
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP);
    }
    assert!(
        w.daemon_log().contains("peers_added: 1, peers_removed: 1"),
        "{}",
        w.daemon_log()
    );
}
