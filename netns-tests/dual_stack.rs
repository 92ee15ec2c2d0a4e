//! IPv6 egress: an egress with `ip6` and `pool6` gives each container an overlay IPv6 too,
//! and the container leaves from the static IPv6 over IPv6 and the static IPv4 over IPv4.
//! An IPv4-only egress is unchanged.

use serde_json::Value;

use crate::world::{sh, Container, Settings, World, EGRESS_IP, EGRESS_IP6, POOL, POOL6, TOKEN};

fn dual_stack() -> World {
    World::with(Settings {
        dual_stack: true,
        ..Settings::default()
    })
}

fn with_prev(conf: &Value, result: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = result.clone();
    c
}

/// Routes of `family` ("-4", "-6") via eth0 in `c`'s namespace that the plugin added (not
/// the kernel's own for the link's addresses), as `ip` prints them.
fn routes(c: &Container, family: &str) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&sh(&["ip", "-n", &c.netns, family, "-j", "route", "show"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dev"] == "eth0" && r["protocol"] != "kernel")
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect()
}

/// Global addresses on eth0 in `c`'s namespace, "addr/len".
fn addresses(c: &Container) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&sh(&["ip", "-n", &c.netns, "-j", "addr", "show"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|l| l["ifname"] == "eth0")
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn in_net(addr: &str, net: &str) -> bool {
    let a: ipnet::IpNet = addr.parse().unwrap();
    let n: ipnet::IpNet = net.parse().unwrap();
    n.contains(&a.addr())
}

/// `GET /v1/egress/acme`'s leases per egress IPv6.
fn leases_on_ip6(w: &World) -> Vec<(String, u64)> {
    let (code, body) = w.api_raw("GET", "/v1/egress/acme", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["pool6"], POOL6, "{info}");
    info["ips6"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let ip = i["ip"].as_str().unwrap().to_string();
            (ip, i["leases"].as_u64().unwrap())
        })
        .collect()
}

#[test]
fn dual_stack_container_leaves_from_the_static_ipv6_and_ipv4_and_del_leaves_nothing() {
    let mut w = dual_stack();
    let conf = w.net_conf("acme");
    let c = w.container("d1");
    let r = w.cni("ADD", &c, &conf).ok();

    // Both families, each from its own static IP.
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP, "{}", w.daemon_log());
    assert_eq!(w.echo6_from(&c).unwrap(), EGRESS_IP6, "{}", w.daemon_log());

    // The result lists both addresses on the link and both default routes (1.0.0: no
    // per-IP version), exactly what the namespace holds.
    let ips: Vec<&str> = r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert_eq!(ips.len(), 2, "{r}");
    assert!(in_net(ips[0], POOL) && ips[0].ends_with("/32"), "{r}");
    assert!(in_net(ips[1], POOL6) && ips[1].ends_with("/128"), "{r}");
    assert!(r["ips"][1].get("version").is_none(), "{r}");
    assert_eq!(r["ips"][1]["interface"], 0);
    let mut have = addresses(&c);
    have.sort();
    let mut want: Vec<String> = ips.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(have, want);
    assert_eq!(
        r["routes"],
        serde_json::json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
    );
    assert_eq!(routes(&c, "-4"), vec!["default"]);
    assert_eq!(routes(&c, "-6"), vec!["default"]);

    // The lease says the same; the egress counts it on its IPv6.
    let leases = w.leases("acme", TOKEN);
    let address6 = leases[0]["address6"].as_str().unwrap();
    assert_eq!(format!("{address6}/128"), ips[1]);
    assert_eq!(leases_on_ip6(&w), vec![(EGRESS_IP6.to_string(), 1)]);

    // CHECK passes with both families in place, and fails when the IPv6 route is gone.
    w.cni("CHECK", &c, &with_prev(&conf, &r)).ok_empty();
    sh(&[
        "ip", "-n", &c.netns, "-6", "route", "del", "default", "dev", "eth0",
    ]);
    let (code, msg) = w.cni("CHECK", &c, &with_prev(&conf, &r)).err();
    assert_eq!(code, 107, "{msg}");
    assert!(msg.contains("::/0"), "{msg}");

    // DEL: no link, address or route in the container, no peer, no lease, and the SNAT
    // map holds the pool's block as before (a lease never changes it).
    let map_before = snat6(&w);
    w.cni("DEL", &c, &conf).ok_empty();
    assert_eq!(w.links(&c.netns), vec!["lo"]);
    assert!(routes(&c, "-6").is_empty() && addresses(&c).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.leases("acme", TOKEN).is_empty());
    assert_eq!(leases_on_ip6(&w), vec![(EGRESS_IP6.to_string(), 0)]);
    assert_eq!(snat6(&w), map_before);
    assert!(
        map_before.contains(POOL6) && map_before.contains(EGRESS_IP6),
        "{map_before}"
    );
}

/// The elements of egress acme's IPv6 SNAT map, as nft prints them.
fn snat6(w: &World) -> String {
    let listed = sh(&[
        "ip",
        "netns",
        "exec",
        &w.exit,
        "nft",
        "list",
        "map",
        "inet",
        "wgexitd",
        "snat6_acme",
    ]);
    listed
        .lines()
        .filter(|l| l.contains("elements") || l.contains(':'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn dual_stack_split_routes_at_cni_0_4_0_carry_versions_and_work() {
    let mut w = dual_stack();
    let mut conf = w.net_conf("acme");
    conf["cniVersion"] = "0.4.0".into();
    conf["routes"] = "split".into();
    let c = w.container("d2");
    let r = w.cni("ADD", &c, &conf).ok();
    assert_eq!(r["ips"][0]["version"], "4", "{r}");
    assert_eq!(r["ips"][1]["version"], "6", "{r}");
    let dsts: Vec<&str> = r["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["dst"].as_str().unwrap())
        .collect();
    assert_eq!(dsts, ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]);
    let mut six = routes(&c, "-6");
    six.sort();
    assert_eq!(six, ["8000::/1", "::/1"]);
    assert_eq!(w.echo6_from(&c).unwrap(), EGRESS_IP6, "{}", w.daemon_log());
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    w.cni("CHECK", &c, &with_prev(&conf, &r)).ok_empty();
    w.cni("DEL", &c, &conf).ok_empty();
    assert_eq!(w.links(&c.netns), vec!["lo"]);
}

#[test]
fn dual_stack_leases_keep_their_ipv6_across_a_restart() {
    let mut w = dual_stack();
    let conf = w.net_conf("acme");
    let c = w.container("d3");
    let r = w.cni("ADD", &c, &conf).ok();
    let before = w.leases("acme", TOKEN);
    w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    w.start_daemon();
    assert_eq!(w.leases("acme", TOKEN), before);
    assert_eq!(w.echo6_from(&c).unwrap(), EGRESS_IP6, "{}", w.daemon_log());
    w.cni("CHECK", &c, &with_prev(&conf, &r)).ok_empty();
}

#[test]
fn dual_stack_ipv4_only_egress_result_is_unchanged() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("v4");
    let r = w.cni("ADD", &c, &conf).ok();
    let address = r["ips"][0]["address"].as_str().unwrap();
    assert_eq!(
        r["ips"],
        serde_json::json!([{"address": address, "interface": 0}])
    );
    assert_eq!(r["routes"], serde_json::json!([{"dst": "0.0.0.0/0"}]));
    assert!(routes(&c, "-6").is_empty());
    // No IPv6 fields in the lease, nor in the egress info.
    let leases = w.leases("acme", TOKEN);
    assert!(leases[0].get("address6").is_none(), "{leases:?}");
    let (_, info) = w.api_raw("GET", "/v1/egress/acme", Some(TOKEN));
    assert!(!info.contains("ips6") && !info.contains("pool6"), "{info}");
    // Over IPv6 the container has no way out at all.
    assert!(w.echo6_from(&c).is_err());
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
}
