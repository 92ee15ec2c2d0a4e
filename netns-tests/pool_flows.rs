//! Open connections through a pool survive its leader's death, whoever speaks first: a TCP
//! connection on which the container writes, one on which only the server writes, and a
//! UDP flow on which only the server sends after the first datagram. The server sees the
//! same egress address and port before and after.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::open_flows::{OpenFlows, Seen, SERVER, SERVER6};
use crate::pool_world::{echo6_once, echo_once, Pool, EGRESS_IP, EGRESS_IP6};
use crate::world::{sh, Container};

/// Runs the three flows from each of `containers` through a leader's death; checks that
/// they were kept ([`OpenFlows::close`]), each container's from its egress IP (`ips`, in
/// the same order). Returns the servers' view of the push connections.
fn flows_through_a_failover(
    p: &mut Pool,
    leader: usize,
    containers: &[Container],
    server: &str,
    ips: &[&str],
) -> Vec<Seen> {
    let server: IpAddr = server.parse().unwrap();
    let isp = PathBuf::from(format!("/var/run/netns/{}", p.isp));
    let netns: Vec<&Path> = containers.iter().map(|c| c.netns_path.as_path()).collect();
    let flows = OpenFlows::open(&isp, server, &netns);
    // Long enough for the leader to have copied the flows' state (every 200 ms).
    std::thread::sleep(Duration::from_millis(1500));
    // (What the world counts is the first egress's; the others' are published with them.)
    let first_egress = ips.iter().filter(|ip| **ip == EGRESS_IP).count();
    p.wait_endpoints_published(first_egress, Duration::from_secs(5));
    let killed = Instant::now();
    p.kill_member(leader);
    let next = 1 - leader;
    p.wait_holds(next, Duration::from_secs(5));
    eprintln!("addresses moved after {:?}", killed.elapsed());
    // Lines go on on the new leader (TCP resends what the pause held up).
    let flowing = flows.wait_flowing(10, Duration::from_secs(10));
    let log = p.log(next);
    // What went wrong first (a reset, a missing line), then whether they stalled.
    let kept = flows.close(ips).unwrap_or_else(|e| panic!("{e}\n{log}"));
    assert!(flowing, "the flows did not go on after the failover\n{log}");
    eprintln!(
        "kept: {} datagrams sent, at most {} lost in the pause",
        kept.datagrams_sent, kept.datagrams_lost
    );
    kept.pushed
}

#[test]
fn open_connections_survive_the_leaders_death_whoever_speaks_first() {
    let mut p = Pool::new();
    let leader = p.wait_leader(Duration::from_secs(10));
    let conf = p.net_conf();
    let c = p.container("flows");
    p.cni(0, "ADD", &c, &conf).ok();
    assert_eq!(
        echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
        EGRESS_IP
    );
    flows_through_a_failover(&mut p, leader, &[c], SERVER, &[EGRESS_IP]);
}

#[test]
fn two_containers_on_the_same_source_port_keep_their_own_egress_ports() {
    let mut p = Pool::new();
    let leader = p.wait_leader(Duration::from_secs(10));
    let conf = p.net_conf();
    let mut cs = Vec::new();
    for (h, name) in [(0, "same-a"), (1, "same-b")] {
        let c = p.container(name);
        p.cni(h, "ADD", &c, &conf).ok();
        assert_eq!(
            echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
            EGRESS_IP
        );
        // Every connection and socket the container opens gets source port 40000.
        sh(&[
            "ip",
            "netns",
            "exec",
            &c.netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_local_port_range=40000 40000",
        ]);
        cs.push(c);
    }
    let pushed = flows_through_a_failover(&mut p, leader, &cs, SERVER, &[EGRESS_IP, EGRESS_IP]);
    eprintln!("the server saw the containers' port 40000 as {pushed:?}");
    let ports: HashSet<u16> = pushed.iter().map(|(peer, _)| peer.port()).collect();
    assert_eq!(
        ports.len(),
        2,
        "the two flows share an egress port: {pushed:?}"
    );
}

#[test]
fn open_ipv6_connections_survive_the_leaders_death_whoever_speaks_first() {
    let mut p = Pool::new();
    let leader = p.wait_leader(Duration::from_secs(10));
    let conf = p.net_conf();
    let c = p.container("flows6");
    p.cni(0, "ADD", &c, &conf).ok();
    let echoed = echo6_once(&c.netns_path, Duration::from_secs(2)).unwrap();
    assert_eq!(echoed, EGRESS_IP6);
    flows_through_a_failover(&mut p, leader, &[c], SERVER6, &[EGRESS_IP6]);
}

/// A second egress led with the first (it shares the endpoint's address), with its own IP.
const SECOND_EGRESS: &str = r#"
[[egress]]
name = "beta"
ip = "203.0.113.78"
interface = "isp0"
pool = "100.96.4.0/23"
wg_interface = "{wg}b"
listen_port = 51821
endpoint = "198.51.100.2:51821"
endpoint_interface = "core0"
token_file = "{tokens}"
"#;

#[test]
fn open_connections_of_two_egresses_survive_the_leaders_death() {
    let mut p = Pool::with_config(SECOND_EGRESS);
    let leader = p.wait_leader(Duration::from_secs(10));
    let mut cs = Vec::new();
    for (h, egress, ip) in [(0, "acme", EGRESS_IP), (1, "beta", "203.0.113.78")] {
        let mut conf = p.net_conf();
        conf["egress"] = egress.into();
        let c = p.container(egress);
        p.cni(h, "ADD", &c, &conf).ok();
        assert_eq!(
            echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
            ip
        );
        cs.push(c);
    }
    flows_through_a_failover(&mut p, leader, &cs, SERVER, &[EGRESS_IP, "203.0.113.78"]);
}
