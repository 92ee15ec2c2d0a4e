//! Egress IP sets: an egress with several static IPs, each container leaving from one of
//! them (`assign = "exclusive"`: a container per IP; `"spread"`: evenly shared).

use std::collections::{BTreeMap, HashMap, HashSet};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::world::{Container, Settings, World, TOKEN};

const IPS: [&str; 3] = ["203.0.113.80", "203.0.113.81", "203.0.113.82"];

fn world(assign: &str) -> World {
    World::with(Settings {
        egress_ips: IPS.iter().map(|s| s.to_string()).collect(),
        assign: Some(assign.to_string()),
        // Exclusive: one of acme's two tokens takes every IP (by default each would get an
        // equal share of the three).
        daemon_extra: if assign == "exclusive" {
            "max_leases_per_owner = 3\n".into()
        } else {
            String::new()
        },
        ..Settings::default()
    })
}

/// `GET /v1/egress/acme`'s lease count per egress IP.
fn leases_per_ip(w: &World) -> BTreeMap<String, u64> {
    let (code, body) = w.api_raw("GET", "/v1/egress/acme", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        info["egress_ip"], IPS[0],
        "old clients still see the first IP"
    );
    info["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["ip"].as_str().unwrap().to_string(),
                i["leases"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn each(n: u64) -> BTreeMap<String, u64> {
    IPS.iter().map(|ip| (ip.to_string(), n)).collect()
}

/// Where each container's request reaches the echo server from.
fn sources(w: &World, cs: &[Container]) -> HashMap<String, String> {
    cs.iter()
        .map(|c| {
            let seen = w.echo_from(c).unwrap_or_else(|e| panic!("{}: {e}", c.id));
            (c.id.clone(), seen)
        })
        .collect()
}

#[test]
fn exclusive_gives_three_containers_three_ips_and_refuses_a_fourth_until_one_leaves() {
    let mut w = world("exclusive");
    let conf = w.net_conf("acme");
    let cs: Vec<Container> = (0..4).map(|i| w.container(&format!("x{i}"))).collect();
    for c in &cs[..3] {
        w.cni("ADD", c, &conf).ok();
    }
    let seen = sources(&w, &cs[..3]);
    let distinct: HashSet<&str> = seen.values().map(String::as_str).collect();
    assert_eq!(distinct, IPS.into_iter().collect(), "{}", w.daemon_log());
    assert_eq!(leases_per_ip(&w), each(1));

    // A fourth: refused with CNI 102 naming the held IPs, and nothing is left behind.
    let (code, msg) = w.cni("ADD", &cs[3], &conf).err();
    assert_eq!(code, 102, "{msg}");
    assert!(msg.contains("egress_ips_exhausted"), "{msg}");
    for ip in IPS {
        assert!(msg.contains(ip), "{ip} not named: {msg}");
    }
    assert_eq!(w.links(&cs[3].netns), vec!["lo"]);
    assert!(!w.links(&w.host).contains(&cs[3].host_ifname("eth0")));
    let files = w.state_files();
    assert!(!files.iter().any(|f| f.starts_with(&cs[3].id)), "{files:?}");
    assert_eq!(w.leases("acme", TOKEN).len(), 3);
    assert_eq!(w.exit_peers().len(), 3);

    // One leaves; the fourth now gets the IP it freed.
    w.cni("DEL", &cs[1], &conf).ok_empty();
    w.cni("ADD", &cs[3], &conf).ok();
    assert_eq!(w.echo_from(&cs[3]).unwrap(), seen[&cs[1].id]);
    assert_eq!(leases_per_ip(&w), each(1));
    for c in [&cs[0], &cs[2]] {
        assert_eq!(w.echo_from(c).unwrap(), seen[&c.id]);
    }
}

#[test]
fn spread_shares_three_ips_evenly_among_thirty_containers_and_keeps_them_across_a_restart() {
    let mut w = world("spread");
    let conf = w.net_conf("acme");
    let cs: Vec<Container> = (0..30).map(|i| w.container(&format!("s{i}"))).collect();
    for c in &cs {
        w.cni("ADD", c, &conf).ok();
    }
    assert_eq!(leases_per_ip(&w), each(10));
    let before = sources(&w, &cs);
    let mut per_ip: BTreeMap<String, u64> = BTreeMap::new();
    for ip in before.values() {
        *per_ip.entry(ip.clone()).or_default() += 1;
    }
    assert_eq!(per_ip, each(10), "what the echo server saw");
    let metrics = w.metrics();
    for ip in IPS {
        let line = format!("wgexit_egress_ip_leases{{egress=\"acme\",ip=\"{ip}\"}} 10");
        assert!(metrics.contains(&line), "no {line:?} in {metrics}");
    }

    w.stop_daemon(Signal::SIGTERM);
    w.start_daemon();
    assert_eq!(leases_per_ip(&w), each(10));
    assert_eq!(
        sources(&w, &cs),
        before,
        "a container changed its egress IP"
    );
}
