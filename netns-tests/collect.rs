//! Idle-lease collection: a host that vanishes without DEL leaks no address, live containers
//! are kept by their keepalives, and plugin-side leftovers go with the next ADD.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::world::{sh, Settings, World, EGRESS_IP, SECOND_TOKEN, TOKEN};

fn short_timeouts() -> Settings {
    Settings {
        daemon_extra: "peer_timeout = 4\nfirst_handshake_timeout = 3\npersistent_keepalive = 1\ncollect_interval = 1\nmax_leases_per_owner = 5\n".into(),
        // Five leasable addresses: reuse shows at once. One token fills them (acme's two
        // tokens would each get a share of two by default).
        pool: Some("100.96.0.0/29".into()),
        ..Settings::default()
    }
}

/// Leases an address for `key` directly through the API, as no plugin: (status, body).
fn post_lease(w: &World, key: &wgexit::keys::Key) -> (u16, String) {
    let body = lease_body(key);
    w.api_with(
        "POST",
        "/v1/egress/acme/leases",
        Some(TOKEN),
        Some(&body),
        &[],
    )
}

fn lease_body(key: &wgexit::keys::Key) -> String {
    serde_json::json!({ "public_key": key.to_base64(), "attachment": { "container_id": "direct", "ifname": "eth0", "host": "nowhere" } }).to_string()
}

/// Leased addresses, checked to be distinct and to match the exit's peers one to one.
/// Collection may change both between the two reads; then they are read again.
fn consistent_addresses(w: &World) -> HashSet<String> {
    loop {
        let leases = w.leases("acme", TOKEN);
        let addresses: HashSet<String> = leases
            .iter()
            .map(|l| l["address"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            addresses.len(),
            leases.len(),
            "one address leased twice: {leases:?}"
        );
        let allowed = w.exit_wg_show("allowed-ips");
        if w.leases("acme", TOKEN) != leases {
            continue;
        }
        let mut peer_ips: Vec<String> = allowed
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|a| a.trim_end_matches("/32").to_string())
            .collect();
        peer_ips.sort();
        let mut want: Vec<String> = addresses.iter().cloned().collect();
        want.sort();
        assert_eq!(
            peer_ips,
            want,
            "device peers and leases differ: {}",
            w.daemon_log()
        );
        return addresses;
    }
}

/// The plugin's attachment records (one `.json` per attachment, beside its key and lock).
fn attachments(w: &World) -> HashSet<String> {
    w.state_files()
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .collect()
}

fn metric(w: &World, name: &str) -> u64 {
    let body = w.metrics();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

#[test]
fn a_vanished_host_is_collected_and_its_addresses_reused_while_live_ones_stay() {
    let mut w = World::with(short_timeouts());
    let mut conf = w.net_conf("acme");
    // Each ADD looks for attachments whose netns is gone (by default at most every 30 s).
    conf["staleSweepInterval"] = serde_json::json!(0);
    let live = w.container("live");
    let gone: Vec<_> = (0..3).map(|i| w.container(&format!("gone{i}"))).collect();
    w.cni("ADD", &live, &conf).ok();
    for c in &gone {
        w.cni("ADD", c, &conf).ok();
    }
    // A lease whose peer never shows up.
    let never = wgexit::keys::Key::generate_private().unwrap().public();
    let (code, body) = post_lease(&w, &never);
    assert_eq!(code, 200, "{body}");
    let held = consistent_addresses(&w);
    assert_eq!(held.len(), 5);
    // The pool is full now, for acme's other token too.
    let extra = wgexit::keys::Key::generate_private().unwrap().public();
    let (code, body) = w.api_with(
        "POST",
        "/v1/egress/acme/leases",
        Some(SECOND_TOKEN),
        Some(&lease_body(&extra)),
        &[],
    );
    assert_eq!(code, 503, "{body}");

    // The hosts of `gone` vanish without DEL: their namespaces go, and with the WireGuard
    // interface gone the host-side wireguard-go exits and leaves no socket.
    for c in &gone {
        sh(&["ip", "netns", "del", &c.netns]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in &gone {
        let name = c.host_ifname("eth0");
        while wgexit::wg::userspace::pid_of(&name).is_some() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go for {name} still running"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let sock = format!("/var/run/wireguard/{name}.sock");
        assert!(!std::path::Path::new(&sock).exists(), "{sock} left behind");
    }
    let live_address = {
        let leases = w.leases("acme", TOKEN);
        let l: Vec<&Value> = leases
            .iter()
            .filter(|l| l["attachment"]["container_id"] == live.id.as_str())
            .collect();
        l[0]["address"].as_str().unwrap().to_string()
    };

    // Collection, while leases come and go through the API: at no point is an address
    // leased twice or held by two peers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let churn = wgexit::keys::Key::generate_private().unwrap().public();
        let (code, _) = post_lease(&w, &churn);
        consistent_addresses(&w);
        if code == 200 {
            let path = format!("/v1/egress/acme/leases/{}", churn.to_base64_url());
            assert_eq!(w.api_raw("DELETE", &path, Some(TOKEN)).0, 204);
        }
        if w.leases("acme", TOKEN).len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not collected: {}",
            w.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What is left is the live container: its keepalives kept it past every timeout.
    assert_eq!(
        consistent_addresses(&w),
        HashSet::from([live_address.clone()])
    );
    assert_eq!(
        metric(&w, "wgexit_leases_collected_total{egress=\"acme\"}"),
        4
    );
    assert_eq!(w.echo_from(&live).unwrap(), EGRESS_IP);
    let log = w.daemon_log();
    assert!(log.contains("no handshake within 3 s"), "{log}");
    assert!(log.contains("no handshake or traffic for 4 s"), "{log}");

    // The collected addresses are leased again: the pool (5) fills with 4 new containers.
    let stale = attachments(&w);
    assert_eq!(stale.len(), 4, "{stale:?}");
    let mut reused = HashSet::new();
    for i in 0..4 {
        let c = w.container(&format!("new{i}"));
        let r = w.cni("ADD", &c, &conf).ok();
        reused.insert(
            r["ips"][0]["address"]
                .as_str()
                .unwrap()
                .trim_end_matches("/32")
                .to_string(),
        );
        assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    }
    let mut was_held = held.clone();
    was_held.remove(&live_address);
    assert_eq!(reused, was_held);
    assert_eq!(consistent_addresses(&w).len(), 5);
    // The first of those ADDs cleaned up the vanished containers' state on this host.
    let files: HashSet<String> = w.state_files().into_iter().collect();
    for c in &gone {
        assert!(!files.iter().any(|f| f.starts_with(&c.id)), "{files:?}");
    }
    assert_eq!(attachments(&w).len(), 5, "{files:?}");
}
