//! A pool's egress IPv6 floats with the leader: the leader holds it, a dual-stack container
//! leaves from it, and after the leader dies the next one takes it and tells the isp
//! segment (unsolicited neighbour advertisement), so the container leaves from it again
//! within seconds instead of after the isp's neighbour entry for the dead leader expires.

use std::time::{Duration, Instant};

use crate::pool_world::{echo6_once, Pool, EGRESS_IP, EGRESS_IP6};
use crate::world::{sh, Container};

/// Waits until `c` reaches the IPv6 echo server within `within`; the source it saw.
fn echo6_within(c: &Container, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        match echo6_once(&c.netns_path, Duration::from_millis(500)) {
            Ok(ip) => return ip,
            Err(e) => assert!(Instant::now() < deadline, "{}: {e}", c.id),
        }
    }
}

/// The MAC address of member `i`'s uplink.
fn uplink_mac(p: &Pool, i: usize) -> String {
    let v: serde_json::Value = serde_json::from_str(&sh(&[
        "ip",
        "-n",
        &p.members[i].ns,
        "-j",
        "link",
        "show",
        "isp0",
    ]))
    .unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// The isp's neighbour entry for the egress IPv6.
fn isp_neighbour(p: &Pool) -> String {
    sh(&["ip", "-n", &p.isp, "-6", "neigh", "show", EGRESS_IP6])
}

#[test]
fn pool_ipv6_egress_floats_with_the_leader_and_is_announced() {
    let mut p = Pool::new();
    let first = p.wait_leader(Duration::from_secs(10));
    let next = 1 - first;
    assert!(p.holds(first, EGRESS_IP6) && !p.holds(next, EGRESS_IP6));
    let c = p.container("v6");
    let conf = p.net_conf();
    let r = p.cni(0, "ADD", &c, &conf).ok();
    assert_eq!(r["ips"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(echo6_within(&c, Duration::from_secs(2)), EGRESS_IP6);
    assert!(isp_neighbour(&p).contains(&uplink_mac(&p, first)));

    p.wait_endpoints_published(1, Duration::from_secs(5));
    p.kill_member(first);
    p.wait_holds(next, Duration::from_secs(5));
    assert!(p.holds(next, EGRESS_IP6), "{}", p.log(next));
    // The takeover wakes the container's tunnel with its whole peer entry: IPv6 flows at
    // once, not only once the wake is over.
    assert_eq!(echo6_within(&c, Duration::from_secs(3)), EGRESS_IP6);
    let neighbour = isp_neighbour(&p);
    assert!(neighbour.contains(&uplink_mac(&p, next)), "{neighbour}");
    assert_eq!(
        crate::pool_world::echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
        EGRESS_IP
    );
}
