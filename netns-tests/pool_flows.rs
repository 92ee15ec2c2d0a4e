//! Open connections through a pool survive its leader's death, whoever speaks first: a TCP
//! connection on which the container writes, one on which only the server writes, and a
//! UDP flow on which only the server sends after the first datagram. The server sees the
//! same egress address and port before and after.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::collections::HashSet;

use crate::pool_world::{echo6_once, echo_once, Pool, EGRESS_IP, EGRESS_IP6};
use crate::world::{sh, Container};

/// The flows' servers, on the isp's echo addresses.
const SERVER: &str = "198.18.0.10";
const SERVER6: &str = "2001:db8:ec::10";
const PUSH_PORT: u16 = 8091;
const TALK_PORT: u16 = 8092;
const UDP_PORT: u16 = 8093;
const EVERY: Duration = Duration::from_millis(100);

/// Runs `f` on a thread inside the network namespace at `netns`.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = std::fs::File::open(netns).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

fn server_addr(server: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(server, port)
}

/// Numbered lines `0..` every 100 ms until `stop`, then `end`.
fn write_lines(mut s: impl Write, stop: &AtomicBool) -> Result<usize, String> {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        writeln!(s, "{n}").map_err(|e| format!("line {n}: {e}"))?;
        n += 1;
        std::thread::sleep(EVERY);
    }
    writeln!(s, "end").map_err(|e| format!("end: {e}"))?;
    Ok(n)
}

/// Reads numbered lines until `end`; an error names the first missing or failed line.
fn read_lines(s: impl std::io::Read) -> Result<usize, String> {
    let mut n = 0;
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| format!("after {n} lines: {e}"))?;
        if line == "end" {
            return Ok(n);
        }
        if line != n.to_string() {
            return Err(format!("line {n} expected, got {line:?}"));
        }
        n += 1;
    }
    Err(format!("closed after {n} lines, before the end"))
}

/// What a server saw on one connection: its peer, and how many lines (or what went wrong).
type Seen = (SocketAddr, Result<usize, String>);

/// The servers in the isp namespace, each for `peers` containers: they listen before
/// `start_servers` returns.
struct Servers {
    push: JoinHandle<Vec<Seen>>,
    talk: JoinHandle<Vec<Seen>>,
    udp: JoinHandle<Udp>,
}

/// Accepts `peers` connections on `port` and runs `serve` on each in its own thread.
/// How long a server waits for a connection, a line or a datagram.
const WAIT: Duration = Duration::from_secs(20);

fn accept_within(l: &TcpListener, within: Duration) -> (TcpStream, SocketAddr) {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + within;
    loop {
        match l.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false).unwrap();
                return (s, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {within:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn tcp_server(
    isp: &Path,
    server: IpAddr,
    port: u16,
    peers: usize,
    ready: std::sync::mpsc::Sender<()>,
    serve: impl Fn(TcpStream) -> Result<usize, String> + Send + Clone + 'static,
) -> JoinHandle<Vec<Seen>> {
    in_netns(isp, move || {
        let l = TcpListener::bind(server_addr(server, port)).unwrap();
        ready.send(()).unwrap();
        let conns: Vec<(SocketAddr, JoinHandle<Result<usize, String>>)> = (0..peers)
            .map(|_| {
                let (s, peer) = accept_within(&l, WAIT);
                // A connection that dies fails the test rather than hanging it.
                s.set_read_timeout(Some(WAIT)).unwrap();
                s.set_write_timeout(Some(WAIT)).unwrap();
                let serve = serve.clone();
                (peer, std::thread::spawn(move || serve(s)))
            })
            .collect();
        conns
            .into_iter()
            .map(|(peer, h)| (peer, h.join().unwrap()))
            .collect()
    })
}

fn start_servers(isp: &Path, server: IpAddr, peers: usize, stop: &Arc<AtomicBool>) -> Servers {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (s1, s3) = (stop.clone(), stop.clone());
    let push = tcp_server(isp, server, PUSH_PORT, peers, ready_tx.clone(), move |s| {
        let sent = write_lines(&s, &s1);
        let _ = s.shutdown(Shutdown::Write);
        sent
    });
    let talk = tcp_server(isp, server, TALK_PORT, peers, ready_tx.clone(), |s| {
        read_lines(&s)
    });
    let udp = in_netns(isp, move || {
        let u = UdpSocket::bind(server_addr(server, UDP_PORT)).unwrap();
        ready_tx.send(()).unwrap();
        udp_server(u, peers, &s3)
    });
    for _ in 0..3 {
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
    Servers { push, talk, udp }
}

/// What the UDP server saw: the source of every datagram it received (the containers'
/// last ones come after the failover), and how many it sent to each.
struct Udp {
    sources: Vec<SocketAddr>,
    sent: usize,
}

/// Waits for a first datagram from `peers` containers, then sends numbered datagrams to
/// each until `stop`, then `end`, and waits for each one's `bye`.
fn udp_server(u: UdpSocket, peers: usize, stop: &AtomicBool) -> Udp {
    let mut buf = [0u8; 64];
    let mut sources = Vec::new();
    while sources.len() < peers {
        u.set_read_timeout(Some(WAIT)).unwrap();
        let (_, peer) = u
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no first datagram: {e}"));
        sources.push(peer);
    }
    let to = sources.clone();
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        for peer in &to {
            u.send_to(sent.to_string().as_bytes(), peer).unwrap();
        }
        sent += 1;
        std::thread::sleep(EVERY);
    }
    for peer in &to {
        u.send_to(b"end", peer).unwrap();
    }
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byes = 0;
    while byes < peers {
        let Ok((_, from)) = u.recv_from(&mut buf) else {
            break;
        };
        sources.push(from);
        byes += 1;
    }
    Udp { sources, sent }
}

/// The container's side: reads the pushed lines, writes its own, receives datagrams.
struct Clients {
    push: JoinHandle<Result<usize, String>>,
    talk: JoinHandle<Result<usize, String>>,
    udp: JoinHandle<Result<Vec<usize>, String>>,
}

fn start_clients(netns: &Path, server: IpAddr, stop: &Arc<AtomicBool>) -> Clients {
    let s2 = stop.clone();
    let push = in_netns(netns, move || {
        let s = TcpStream::connect_timeout(&server_addr(server, PUSH_PORT), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
        read_lines(&s)
    });
    let talk = in_netns(netns, move || {
        let s = TcpStream::connect_timeout(&server_addr(server, TALK_PORT), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let n = write_lines(&s, &s2)?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        Ok(n)
    });
    let udp = in_netns(netns, move || {
        let any = if server.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let u = UdpSocket::bind(any).map_err(|e| e.to_string())?;
        u.connect(server_addr(server, UDP_PORT))
            .map_err(|e| e.to_string())?;
        u.send(b"hello").map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            let len = u
                .recv(&mut buf)
                .map_err(|e| format!("after {got:?}: {e}"))?;
            let text = String::from_utf8_lossy(&buf[..len]).to_string();
            if text == "end" {
                u.send(b"bye").map_err(|e| e.to_string())?;
                return Ok(got);
            }
            got.push(text.parse::<usize>().map_err(|e| e.to_string())?);
        }
    });
    Clients { push, talk, udp }
}

/// Runs the three flows from each of `containers` through a leader's death; checks that
/// everything arrived and that the server saw each flow from the same egress address and
/// port before and after, and each container's flows from its egress IP (`ips`, in the
/// same order). Returns the servers' view of the push connections.
fn flows_through_a_failover(
    p: &mut Pool,
    leader: usize,
    containers: &[Container],
    server: &str,
    ips: &[&str],
) -> Vec<Seen> {
    let server: IpAddr = server.parse().unwrap();
    let isp = PathBuf::from(format!("/var/run/netns/{}", p.isp));
    let stop = Arc::new(AtomicBool::new(false));
    let servers = start_servers(&isp, server, containers.len(), &stop);
    let clients: Vec<Clients> = containers
        .iter()
        .map(|c| start_clients(&c.netns_path, server, &stop))
        .collect();
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
    // Lines go on for a while on the new leader (TCP resends what the pause held up).
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);

    check_flows(&p.log(next), servers, clients, ips)
}

/// Checks what the servers and the containers saw once the flows ended (see
/// [`flows_through_a_failover`]); `log` is the new leader's, for the messages.
fn check_flows(log: &str, servers: Servers, clients: Vec<Clients>, ips: &[&str]) -> Vec<Seen> {
    let pushed = servers.push.join().unwrap();
    let talked = servers.talk.join().unwrap();
    let udp = servers.udp.join().unwrap();
    // What each side counted, connection by connection (sorted: a client does not know
    // which of the server's connections is its own).
    let counts = |seen: &[Seen], what: &str| -> Vec<usize> {
        let mut n: Vec<usize> = seen
            .iter()
            .map(|(_, r)| r.clone().unwrap_or_else(|e| panic!("{what}: {e}\n{log}")))
            .collect();
        n.sort();
        n
    };
    let mut received = Vec::new();
    let mut written = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.push.join().unwrap();
        received.push(r.unwrap_or_else(|e| panic!("server-writes {i}: {e}\n{log}")));
        let w = c.talk.join().unwrap();
        written.push(w.unwrap_or_else(|e| panic!("container-writes {i}: {e}\n{log}")));
        let datagrams = c
            .udp
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("udp {i}: {e}\n{log}"));
        eprintln!(
            "flow {i}: {} of {} datagrams arrived",
            datagrams.len(),
            udp.sent
        );
        // Datagrams sent while no member held the address are lost (UDP does not resend);
        // every one after the takeover arrives, on the same mapping.
        assert_eq!(
            datagrams.last().copied(),
            Some(udp.sent - 1),
            "udp {i}: {datagrams:?}\n{log}"
        );
    }
    received.sort();
    written.sort();
    eprintln!("lines the server wrote: {received:?}, the containers wrote: {written:?}");
    assert_eq!(
        received,
        counts(&pushed, "server-writes"),
        "server-writes\n{log}"
    );
    assert_eq!(
        written,
        counts(&talked, "container-writes"),
        "container-writes\n{log}"
    );
    let mut expected: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    expected.sort();
    for seen in [&pushed, &talked] {
        let mut seen_ips: Vec<String> =
            seen.iter().map(|(peer, _)| peer.ip().to_string()).collect();
        seen_ips.sort();
        assert_eq!(seen_ips, expected, "the flows' egress IPs");
    }
    let mut udp_ips: Vec<String> = udp
        .sources
        .iter()
        .map(|peer| peer.ip().to_string())
        .collect();
    udp_ips.sort();
    udp_ips.dedup();
    expected.dedup();
    assert_eq!(udp_ips, expected, "the UDP flows' egress IPs");
    let n = ips.len();
    assert_eq!(
        udp.sources.len(),
        2 * n,
        "the containers' last datagrams: {:?}",
        udp.sources
    );
    let before: HashSet<&SocketAddr> = udp.sources[..n].iter().collect();
    let after: HashSet<&SocketAddr> = udp.sources[n..].iter().collect();
    assert_eq!(before, after, "a UDP flow's mapping changed");
    pushed
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
