//! Open connections through a pool survive its leader's death, whoever speaks first: a TCP
//! connection on which the container writes, one on which only the server writes, and a
//! UDP flow on which only the server sends after the first datagram. The server sees the
//! same egress address and port before and after.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::pool_world::{Pool, EGRESS_IP};

const SERVER_IP: &str = "198.18.0.10";
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

fn server_addr(port: u16) -> SocketAddr {
    format!("{SERVER_IP}:{port}").parse().unwrap()
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

/// What a server saw: its peer, and how many lines or datagrams (or what went wrong).
type Seen = (SocketAddr, Result<usize, String>);

/// The servers in the isp namespace: they bind before `start` returns.
struct Servers {
    push: JoinHandle<Seen>,
    talk: JoinHandle<Seen>,
    udp: JoinHandle<(Vec<SocketAddr>, Result<usize, String>)>,
}

fn start_servers(isp: &Path, stop: &Arc<AtomicBool>) -> Servers {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (r1, r2, r3) = (ready_tx.clone(), ready_tx.clone(), ready_tx);
    let (s1, s3) = (stop.clone(), stop.clone());
    let push = in_netns(isp, move || {
        let l = TcpListener::bind(server_addr(PUSH_PORT)).unwrap();
        r1.send(()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let sent = write_lines(&s, &s1);
        let _ = s.shutdown(Shutdown::Write);
        (peer, sent)
    });
    let talk = in_netns(isp, move || {
        let l = TcpListener::bind(server_addr(TALK_PORT)).unwrap();
        r2.send(()).unwrap();
        let (s, peer) = l.accept().unwrap();
        (peer, read_lines(&s))
    });
    let udp = in_netns(isp, move || {
        let u = UdpSocket::bind(server_addr(UDP_PORT)).unwrap();
        r3.send(()).unwrap();
        udp_server(u, &s3)
    });
    for _ in 0..3 {
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
    Servers { push, talk, udp }
}

/// Waits for the first datagram, then sends numbered datagrams to its source until
/// `stop`, then `end`; returns every source that sent to it (the container's last
/// datagram comes after the failover) and how many it sent.
fn udp_server(u: UdpSocket, stop: &AtomicBool) -> (Vec<SocketAddr>, Result<usize, String>) {
    let mut buf = [0u8; 64];
    let (_, peer) = u.recv_from(&mut buf).unwrap();
    let mut sources = vec![peer];
    u.set_nonblocking(true).unwrap();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = u.send_to(n.to_string().as_bytes(), peer) {
            return (sources, Err(format!("datagram {n}: {e}")));
        }
        n += 1;
        std::thread::sleep(EVERY);
    }
    let _ = u.send_to(b"end", peer);
    u.set_nonblocking(false).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while let Ok((_, from)) = u.recv_from(&mut buf) {
        sources.push(from);
        if &buf[..3] == b"bye" {
            break;
        }
    }
    (sources, Ok(n))
}

/// The container's side: reads the pushed lines, writes its own, receives datagrams.
struct Clients {
    push: JoinHandle<Result<usize, String>>,
    talk: JoinHandle<Result<usize, String>>,
    udp: JoinHandle<Result<Vec<usize>, String>>,
}

fn start_clients(netns: &Path, stop: &Arc<AtomicBool>) -> Clients {
    let s2 = stop.clone();
    let push = in_netns(netns, || {
        let s = TcpStream::connect_timeout(&server_addr(PUSH_PORT), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        read_lines(&s)
    });
    let talk = in_netns(netns, move || {
        let s = TcpStream::connect_timeout(&server_addr(TALK_PORT), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let n = write_lines(&s, &s2)?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        Ok(n)
    });
    let udp = in_netns(netns, || {
        let u = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        u.connect(server_addr(UDP_PORT))
            .map_err(|e| e.to_string())?;
        u.send(b"hello").map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
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

#[test]
fn open_connections_survive_the_leaders_death_whoever_speaks_first() {
    let mut p = Pool::new();
    let leader = p.wait_leader(Duration::from_secs(10));
    let conf = p.net_conf();
    let c = p.container("flows");
    p.cni(0, "ADD", &c, &conf).ok();
    assert_eq!(
        crate::pool_world::echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
        EGRESS_IP
    );
    let isp = PathBuf::from(format!("/var/run/netns/{}", p.isp));
    let stop = Arc::new(AtomicBool::new(false));
    let servers = start_servers(&isp, &stop);
    let clients = start_clients(&c.netns_path, &stop);
    // Long enough for the leader to have copied the flows' state (every 200 ms).
    std::thread::sleep(Duration::from_millis(1500));
    p.wait_endpoints_published(1, Duration::from_secs(5));
    let killed = Instant::now();
    p.kill_member(leader);
    let next = 1 - leader;
    p.wait_holds(next, Duration::from_secs(5));
    eprintln!("addresses moved after {:?}", killed.elapsed());
    // Lines go on for a while on the new leader (TCP retransmits what the gap held up).
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);

    let log = p.log(next);
    let (push_peer, pushed) = servers.push.join().unwrap();
    let (talk_peer, talked) = servers.talk.join().unwrap();
    let (udp_sources, sent) = servers.udp.join().unwrap();
    let pushed = pushed.unwrap_or_else(|e| panic!("server-writes: {e}\n{log}"));
    let received = clients.push.join().unwrap();
    assert_eq!(received, Ok(pushed), "server-writes connection\n{log}");
    let written = clients.talk.join().unwrap();
    assert!(written.is_ok(), "container-writes: {written:?}");
    assert_eq!(talked, written, "container-writes connection\n{log}");
    let datagrams = clients
        .udp
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("udp: {e}\n{log}"));
    let sent = sent.unwrap();
    eprintln!(
        "server wrote {pushed} lines, container {written:?}, {sent} datagrams sent, {} received",
        datagrams.len()
    );
    // Datagrams sent while no member held the address are lost (UDP does not resend);
    // every one after the takeover arrives, on the same mapping.
    let last = datagrams.last().copied();
    assert_eq!(last, Some(sent - 1), "udp: {datagrams:?}\n{log}");
    for peer in [push_peer, talk_peer].iter().chain(&udp_sources) {
        assert_eq!(peer.ip().to_string(), EGRESS_IP);
    }
    assert_eq!(
        udp_sources.len(),
        2,
        "the container's last datagram: {udp_sources:?}"
    );
    assert_eq!(
        udp_sources[0], udp_sources[1],
        "the UDP flow's mapping changed"
    );
}
