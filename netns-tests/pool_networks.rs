//! Private networks on a pool (see `pool_world.rs`): the network is led like an egress (its
//! endpoint address 198.51.100.4 floats on its leader, its identity is the pool's), every
//! member programs every member of it, and when its leader dies the containers on both
//! hosts, their `.internal` names and a laptop's `wg-quick` tunnel carry on through the
//! survivor.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::networks::{address_of, dig, wg_quick_up_in};
use crate::pool_world::Pool;
use crate::world::{try_sh, Container};

/// The network's own endpoint address: not the egress's, so it has a leader of its own.
const NET_ENDPOINT_IP: &str = "198.51.100.4";
const PREFIX: &str = "fdaa:0:7::/48";
const DNS: &str = "fdaa:0:7::3";
const GAP: Duration = Duration::from_secs(3);

fn network_table() -> String {
    format!(
        r#"
[[network]]
name = "acme"
prefix = "{PREFIX}"
wg_interface = "{{wg}}n"
listen_port = 51830
endpoint = "{NET_ENDPOINT_IP}:51830"
endpoint_interface = "core0"
token_file = "{{tokens}}"
"#
    )
}

/// The plugin config joining network acme as app `app` (no egress: routes none).
fn conf(p: &Pool, app: &str) -> Value {
    let mut c = p.net_conf();
    let obj = c.as_object_mut().unwrap();
    obj.remove("egress");
    obj.insert("network".into(), json!("acme"));
    obj.insert("routes".into(), json!("none"));
    obj.insert("app".into(), json!(app));
    obj.insert("region".into(), json!("ams"));
    c
}

/// Member `i`'s network device's peers.
fn network_peers(p: &Pool, i: usize) -> usize {
    let m = &p.members[i];
    let wg = format!("{}n", m.wg);
    let out = try_sh(&["ip", "netns", "exec", &m.ns, "wg", "show", &wg, "peers"]);
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn pings(ns: &str, addr: &str) -> bool {
    try_sh(&[
        "ip", "netns", "exec", ns, "ping", "-6", "-n", "-c", "1", "-W", "1", addr,
    ])
    .status
    .success()
}

fn ping_within(ns: &str, addr: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !pings(ns, addr) {
        assert!(
            Instant::now() < deadline,
            "{ns} cannot reach {addr} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pings from `ns` to `addr` every 100 ms until stopped; the longest time between two
/// answered pings.
struct PingProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Instant>>,
}

impl PingProbe {
    fn start(ns: &str, addr: &str) -> PingProbe {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (s, ns, addr) = (stop.clone(), ns.to_string(), addr.to_string());
        let handle = std::thread::spawn(move || {
            let mut answered = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let ok = try_sh(&[
                    "ip", "netns", "exec", &ns, "ping", "-6", "-n", "-c", "1", "-W", "0.3", &addr,
                ]);
                if ok.status.success() {
                    answered.push(at);
                }
                std::thread::sleep(
                    (at + Duration::from_millis(100)).saturating_duration_since(Instant::now()),
                );
            }
            answered
        });
        PingProbe { stop, handle }
    }

    fn stop(self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let answered = self.handle.join().unwrap();
        answered
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(Duration::MAX)
    }
}

/// A laptop on host `h`: `wgexit peer create` against member `via`, then the real
/// `wg-quick up` (its DNS line left out: the laptop asks the resolver by address).
/// Returns the laptop's overlay address.
fn laptop(p: &Pool, h: usize, via: usize) -> String {
    let iface = format!("{}l", p.id);
    let conf_path = p.path(&format!("{iface}.conf"));
    let out = Command::new("ip")
        .args(["netns", "exec", &p.hosts[h]])
        .arg(crate::world::bin("wgexit"))
        .args(["peer", "create", "--name", "alice", "--network", "acme"])
        .args(["--server", &format!("https://{}:7443", p.members[via].ip)])
        .arg("--ca-file")
        .arg(p.ca_file())
        .arg("--token-file")
        .arg(p.path("acme.token"))
        .arg("--out")
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "peer create: {out:?}");
    let written = std::fs::read_to_string(&conf_path).unwrap();
    assert!(
        written.contains(&format!("Endpoint = {NET_ENDPOINT_IP}:51830")),
        "{written}"
    );
    let without_dns: String = written
        .lines()
        .filter(|l| !l.starts_with("DNS"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&conf_path, without_dns).unwrap();
    wg_quick_up_in(&p.hosts[h], &[], &conf_path);
    let address = written
        .lines()
        .find_map(|l| l.strip_prefix("Address = "))
        .expect("an Address line");
    address.split('/').next().unwrap().to_string()
}

fn resolves(from: &Container, name: &str) -> Vec<String> {
    let (status, answers) = dig(&from.netns, DNS, name, "AAAA");
    assert_eq!(status, "NOERROR", "{name} from {}", from.id);
    answers
}

/// A server in `c` on `[::]:7070` that sends back every line it reads, on one connection.
fn line_echo(c: &Container) {
    let ns = std::fs::File::open(&c.netns_path).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let listener = TcpListener::bind("[::]:7070").unwrap();
        ready_tx.send(()).unwrap();
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if writer.write_all(line.as_bytes()).is_err() {
                return;
            }
            line.clear();
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

/// A TCP connection from inside `c` to `[addr]:7070`.
fn connect_from(c: &Container, addr: &str) -> TcpStream {
    let ns = std::fs::File::open(&c.netns_path).unwrap();
    let to: SocketAddr = format!("[{addr}]:7070").parse().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap()
        })
        .join()
        .unwrap()
    })
}

/// Sends `line` on `stream` and reads what comes back, within 5 s.
fn round_trip(stream: &mut TcpStream, line: &str) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut back = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut back)
        .unwrap();
    back.trim_end().to_string()
}

/// Kills member `i` as a machine dies, its network device gone too.
fn kill_with_network(p: &mut Pool, i: usize) {
    let (ns, wg) = (p.members[i].ns.clone(), format!("{}n", p.members[i].wg));
    p.kill_member(i);
    let _ = try_sh(&["ip", "-n", &ns, "link", "del", &wg]);
}

#[test]
fn a_networks_leader_dies_and_its_members_and_laptop_carry_on() {
    let mut p = Pool::with_config(&network_table());
    let leader = p.wait_holder(&[NET_ENDPOINT_IP], Duration::from_secs(10));
    let (web, db) = (p.container("web"), p.container("db"));
    let web_ip = address_of(&p.cni(0, "ADD", &web, &conf(&p, "web")).ok(), true);
    let db_ip = address_of(&p.cni(1, "ADD", &db, &conf(&p, "db")).ok(), true);

    // Both members program both containers (hot standby), whichever member leased them.
    for i in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(5);
        while network_peers(&p, i) != 2 {
            assert!(
                Instant::now() < deadline,
                "member {i} lacks the network's peers"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    ping_within(&db.netns, &web_ip, Duration::from_secs(5));
    ping_within(&web.netns, &db_ip, Duration::from_secs(5));
    assert_eq!(resolves(&db, "web.internal"), vec![web_ip.clone()]);
    line_echo(&web);
    let mut open = connect_from(&db, &web_ip);
    assert_eq!(round_trip(&mut open, "before"), "before");

    // A laptop joins through the member that does not lead the network.
    let lap = p.add_host();
    let lap_ip = laptop(&p, lap, 1 - leader);
    ping_within(&p.hosts[lap], &web_ip, Duration::from_secs(10));
    assert_eq!(resolves(&web, "alice._peer.internal"), vec![lap_ip]);

    // The next leader wakes the peers whose endpoints the leader published.
    p.wait_space_endpoints_published("network:acme", 3, Duration::from_secs(5));
    let probe = PingProbe::start(&db.netns, &web_ip);
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    kill_with_network(&mut p, leader);
    let next = 1 - leader;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.holds(next, NET_ENDPOINT_IP) {
        assert!(Instant::now() < deadline, "no takeover:\n{}", p.log(next));
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = killed.elapsed();
    ping_within(&db.netns, &web_ip, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1000));
    let gap = probe.stop();
    assert!(
        gap <= GAP,
        "db -> web gap {gap:?} (endpoint moved after {took:?})\n{}",
        p.log(next)
    );
    eprintln!("network failover: endpoint after {took:?}, db -> web gap {gap:?}");

    // The same addresses, the same resolver, the same names; the open connection goes on
    // (a network forwards without NAT: nothing to carry over).
    assert_eq!(round_trip(&mut open, "after"), "after");
    ping_within(&web.netns, &db_ip, Duration::from_secs(2));
    assert_eq!(resolves(&db, "web.internal"), vec![web_ip.clone()]);
    // The laptop's tunnel, never recreated, works again.
    ping_within(&p.hosts[lap], &web_ip, GAP);

    // A new container joins through the survivor and is known by name at once.
    let api = p.container("api");
    let api_ip = address_of(&p.cni(0, "ADD", &api, &conf(&p, "api")).ok(), true);
    ping_within(&api.netns, &db_ip, Duration::from_secs(5));
    assert_eq!(resolves(&db, "api.internal"), vec![api_ip]);
}

/// The same container joining through both members at the same moment (a plugin retrying
/// on the second server, say): one of the two writes is refused by etcd, and that member
/// answers with the lease the other made. Both answers name the same address; etcd holds
/// one record per key.
#[test]
fn joins_through_both_members_at_once_make_one_member_each() {
    let p = Pool::with_config(&network_table());
    p.wait_holder(&[NET_ENDPOINT_IP], Duration::from_secs(10));
    let keys: Vec<String> = (0..8)
        .map(|_| {
            let private = wgexit::keys::Key::generate_private().unwrap();
            private.public().to_base64()
        })
        .collect();
    for key in &keys {
        let body = json!({"public_key": key, "app": "web", "region": "ams"}).to_string();
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let asks: Vec<_> = (0..2)
                .map(|i| {
                    let body = &body;
                    let p = &p;
                    s.spawn(move || p.api(i, "POST", "/v1/network/acme/members", Some(body)))
                })
                .collect();
            asks.into_iter().map(|a| a.join().unwrap()).collect()
        });
        let addresses: Vec<String> = answers
            .iter()
            .map(|(code, body)| {
                assert_eq!(*code, 200, "{body}");
                let v: Value = serde_json::from_str(body).unwrap();
                v["address"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(addresses[0], addresses[1], "{key}");
    }
    assert_eq!(p.keys_under("leases/network:acme/"), keys.len());
}
