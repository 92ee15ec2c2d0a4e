//! The main job: containers reach the internet from the exit node's static IP.

use serde_json::Value;

use crate::world::{sh, try_sh, World, EGRESS_IP, HOST_IP, TOKEN};

fn ip_json(ns: &str, what: &[&str]) -> Value {
    let mut args = vec!["ip", "-n", ns, "-j"];
    args.extend_from_slice(what);
    serde_json::from_str(&sh(&args)).unwrap()
}

#[test]
fn two_containers_leave_through_the_egress_ip_and_del_removes_everything() {
    let mut w = World::new();
    let conf = w.net_conf("acme");

    // Without a tunnel the host cannot reach the echo server at all.
    let no_route = try_sh(&[
        "ip",
        "netns",
        "exec",
        &w.host,
        "ip",
        "route",
        "get",
        "198.18.0.10",
    ]);
    assert!(
        !no_route.status.success(),
        "host namespace must have no route to isp"
    );

    let c1 = w.container("c1");
    let c2 = w.container("c2");
    let r1 = w.cni("ADD", &c1, &conf).ok();
    let r2 = w.cni("ADD", &c2, &conf).ok();

    for (c, r) in [(&c1, &r1), (&c2, &r2)] {
        // The first request after ADD already works, and leaves from the egress IP.
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP, "{}", w.daemon_log());
        assert_ne!(w.echo_from(c).unwrap(), HOST_IP);

        // The result matches what is configured in the namespace.
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][0]["name"], "eth0");
        assert_eq!(
            r["interfaces"][0]["sandbox"],
            c.netns_path.display().to_string()
        );
        assert_eq!(r["ips"][0]["interface"], 0);
        let address = r["ips"][0]["address"].as_str().unwrap();
        let addrs = ip_json(&c.netns, &["addr", "show", "dev", "eth0"]);
        let info = &addrs[0]["addr_info"][0];
        assert_eq!(
            format!("{}/{}", info["local"].as_str().unwrap(), info["prefixlen"]),
            address
        );
        assert_eq!(addrs[0]["mtu"], 1420);
        let routes = ip_json(&c.netns, &["route", "show", "dev", "eth0"]);
        let dsts: Vec<&str> = routes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["dst"].as_str())
            .collect();
        assert_eq!(dsts, vec!["default"]);
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    }
    assert_ne!(r1["ips"][0]["address"], r2["ips"][0]["address"]);

    // The exit node holds both leases and peers.
    assert_eq!(w.leases("acme", TOKEN).len(), 2);
    assert_eq!(w.exit_peers().len(), 2);

    // DEL: interface, peer, lease and state gone.
    w.cni("DEL", &c1, &conf).ok_empty();
    assert_eq!(w.links(&c1.netns), vec!["lo"]);
    assert_eq!(w.exit_peers().len(), 1);
    let leases = w.leases("acme", TOKEN);
    assert_eq!(leases.len(), 1);
    assert_eq!(
        leases[0]["address"].as_str().unwrap(),
        r2["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
    );
    // c2 still works.
    assert_eq!(w.echo_from(&c2).unwrap(), EGRESS_IP);

    // A second DEL, and a DEL for a container never added, succeed.
    w.cni("DEL", &c1, &conf).ok_empty();
    let stranger = w.container("never-added");
    w.cni("DEL", &stranger, &conf).ok_empty();

    w.cni("DEL", &c2, &conf).ok_empty();
    assert!(w.exit_peers().is_empty());
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    assert_eq!(w.links(&w.host), vec!["lo", "up0"]);
    assert!(!std::path::Path::new(&format!(
        "/var/run/wireguard/{}.sock",
        c1.host_ifname("eth0")
    ))
    .exists());
}

#[test]
fn del_succeeds_when_the_netns_is_gone() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("gone");
    w.cni("ADD", &c, &conf).ok();
    sh(&["ip", "netns", "del", &c.netns]);
    w.cni("DEL", &c, &conf).ok_empty();
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty());
    // Without CNI_NETNS at all, too.
    let c2 = w.container("nonetns");
    w.cni("ADD", &c2, &conf).ok();
    w.cni_raw("DEL", &c2.id, None, "eth0", conf.to_string().as_bytes())
        .ok_empty();
    assert!(w.leases("acme", TOKEN).is_empty());
}

/// `wg set` on container `c`'s device, as a process with CAP_NET_ADMIN in it could: the
/// kernel's device is in the container; wireguard-go's is reached through its UAPI socket,
/// named after the host-side link.
fn wg_set_in_container(c: &crate::world::Container, args: &[&str]) {
    let host_name = c.host_ifname("eth0");
    let mut all: Vec<&str> = if crate::world::backend() == "kernel" {
        vec!["ip", "netns", "exec", &c.netns, "wg", "set", "eth0"]
    } else {
        vec!["wg", "set", &host_name]
    };
    all.extend_from_slice(args);
    sh(&all);
}

#[test]
fn check_reports_a_device_changed_from_inside_the_container() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let with_prev = |r: &serde_json::Value| {
        let mut c = conf.clone();
        c["prevResult"] = r.clone();
        c
    };
    let stranger = wgexit::keys::Key::generate_private()
        .unwrap()
        .public()
        .to_base64();
    // A peer added.
    let c = w.container("chk1");
    let r = w.cni("ADD", &c, &conf).ok();
    w.cni("CHECK", &c, &with_prev(&r)).ok_empty();
    wg_set_in_container(&c, &["peer", &stranger, "allowed-ips", "198.18.9.9/32"]);
    let (code, msg) = w.cni("CHECK", &c, &with_prev(&r)).err();
    assert_eq!(code, 107, "{msg}");
    assert!(msg.contains("peers ADD did not set"), "{msg}");
    // The listen port changed, and a fwmark set.
    let c = w.container("chk2");
    let r = w.cni("ADD", &c, &conf).ok();
    wg_set_in_container(&c, &["listen-port", "40123"]);
    let (code, msg) = w.cni("CHECK", &c, &with_prev(&r)).err();
    assert_eq!(code, 107, "{msg}");
    assert!(msg.contains("listens on UDP port 40123"), "{msg}");
    let c = w.container("chk3");
    let r = w.cni("ADD", &c, &conf).ok();
    wg_set_in_container(&c, &["fwmark", "0x77"]);
    let (code, msg) = w.cni("CHECK", &c, &with_prev(&r)).err();
    assert_eq!(code, 107, "{msg}");
    assert!(msg.contains("fwmark 0x77"), "{msg}");
}

/// The container's first handshake initiation is lost on the way to the exit node: ADD
/// starts the handshake again after a second instead of waiting out WireGuard's 5 s retry,
/// which is as long as ADD's whole default wait.
#[test]
fn add_survives_a_lost_first_handshake() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("lost");
    crate::world::drop_first_handshake_initiation(
        &w.exit,
        &w.path("lost-handshake.nft"),
        "dport 51820",
    );
    let started = std::time::Instant::now();
    w.cni("ADD", &c, &conf).ok();
    let took = started.elapsed();
    assert_eq!(crate::world::handshakes_dropped(&w.exit), 1);
    assert!(
        took < std::time::Duration::from_secs(3),
        "ADD took {took:?} with its first handshake lost"
    );
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP, "{}", w.daemon_log());
}
