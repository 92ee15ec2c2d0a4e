//! Open connections carried through a failover, from containers to servers behind the
//! uplink: a TCP connection on which only the server writes (a line every 100 ms), one on
//! which only the container writes, and a UDP flow on which only the server sends after
//! the container's first datagram. [`OpenFlows::close`] says whether they were kept:
//! every line arrived, in order, nothing was reset, the server saw each flow from the
//! same egress address and port throughout, and the UDP datagrams arrived in order on one
//! mapping, the only ones missing sent in one stretch (the pause, which nothing resends).
//!
//! Used by the `pool_flows` tests and by row 8 of the benchmarks.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The flows' servers, on the isp's echo addresses.
pub const SERVER: &str = "198.18.0.10";
pub const SERVER6: &str = "2001:db8:ec::10";
const PUSH_PORT: u16 = 8091;
const TALK_PORT: u16 = 8092;
const UDP_PORT: u16 = 8093;
const EVERY: Duration = Duration::from_millis(100);
/// How long a side waits for a connection, a line or a datagram.
const WAIT: Duration = Duration::from_secs(20);

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

/// Lines or datagrams received so far, one counter per flow of a kind.
#[derive(Clone)]
struct Counts(Arc<Vec<AtomicUsize>>);

impl Counts {
    fn new(n: usize) -> Counts {
        Counts(Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect()))
    }

    fn bump(&self, i: usize) {
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    fn least(&self) -> usize {
        self.0
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
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

/// Reads numbered lines until `end`, counting each in `counts[i]`; an error names the
/// first missing or failed line.
fn read_lines(s: impl std::io::Read, counts: &Counts, i: usize) -> Result<usize, String> {
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
        counts.bump(i);
    }
    Err(format!("closed after {n} lines, before the end"))
}

/// What a server saw on one connection: its peer, and how many lines (or what went wrong).
pub type Seen = (SocketAddr, Result<usize, String>);

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

/// Accepts `peers` connections on `port` and runs `serve` on each (with its index) in its
/// own thread; tells `ready` once it listens.
fn tcp_server(
    isp: &Path,
    at: SocketAddr,
    peers: usize,
    ready: std::sync::mpsc::Sender<()>,
    serve: impl Fn(TcpStream, usize) -> Result<usize, String> + Send + Clone + 'static,
) -> JoinHandle<Vec<Seen>> {
    in_netns(isp, move || {
        let l = TcpListener::bind(at).unwrap();
        ready.send(()).unwrap();
        let conns: Vec<(SocketAddr, JoinHandle<Result<usize, String>>)> = (0..peers)
            .map(|i| {
                let (s, peer) = accept_within(&l, WAIT);
                // A connection that dies fails the check rather than hanging it.
                s.set_read_timeout(Some(WAIT)).unwrap();
                s.set_write_timeout(Some(WAIT)).unwrap();
                let serve = serve.clone();
                (peer, std::thread::spawn(move || serve(s, i)))
            })
            .collect();
        conns
            .into_iter()
            .map(|(peer, h)| (peer, h.join().unwrap()))
            .collect()
    })
}

/// The servers in the isp namespace, each for every container.
struct Servers {
    push: JoinHandle<Vec<Seen>>,
    talk: JoinHandle<Vec<Seen>>,
    udp: JoinHandle<Udp>,
}

/// What the UDP server saw: the source of every datagram it received (the containers'
/// last ones come after the failover), and how many it sent to each.
struct Udp {
    sources: Vec<SocketAddr>,
    sent: usize,
}

/// Waits for a first datagram (`hello`, which a container repeats until answered) from
/// `peers` containers, then sends numbered datagrams to each until `stop`, then `end`,
/// and waits for each one's `bye`.
fn udp_server(u: UdpSocket, peers: usize, stop: &AtomicBool) -> Udp {
    let mut buf = [0u8; 64];
    let mut sources = Vec::new();
    u.set_read_timeout(Some(WAIT)).unwrap();
    while sources.len() < peers {
        let (_, peer) = u
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no first datagram: {e}"));
        if !sources.contains(&peer) {
            sources.push(peer);
        }
    }
    let to = sources.clone();
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        for peer in &to {
            // A send the network refuses for a moment (an ICMP error during the pause) is
            // a datagram lost like the others.
            let _ = u.send_to(sent.to_string().as_bytes(), peer);
        }
        sent += 1;
        std::thread::sleep(EVERY);
    }
    for peer in &to {
        let _ = u.send_to(b"end", peer);
    }
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byes = 0;
    while byes < peers {
        let Ok((len, from)) = u.recv_from(&mut buf) else {
            break;
        };
        // (A repeated hello that arrived late is not a bye.)
        if &buf[..len] == b"bye" {
            sources.push(from);
            byes += 1;
        }
    }
    Udp { sources, sent }
}

/// One container's side: reads the pushed lines, writes its own, receives datagrams.
struct Clients {
    push: JoinHandle<Result<usize, String>>,
    talk: JoinHandle<Result<usize, String>>,
    udp: JoinHandle<Result<Vec<usize>, String>>,
}

/// Progress of every flow: lines the containers read, lines the server read, datagrams
/// the containers received.
#[derive(Clone)]
struct Progress {
    pushed: Counts,
    talked: Counts,
    datagrams: Counts,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let each =
            |c: &Counts| -> Vec<usize> { c.0.iter().map(|n| n.load(Ordering::Relaxed)).collect() };
        write!(
            f,
            "lines the containers read {:?}, the server read {:?}, datagrams {:?}",
            each(&self.pushed),
            each(&self.talked),
            each(&self.datagrams)
        )
    }
}

impl Progress {
    fn least(&self) -> usize {
        [&self.pushed, &self.talked, &self.datagrams]
            .iter()
            .map(|c| c.least())
            .min()
            .unwrap_or(0)
    }
}

/// The three flows of every container, open.
pub struct OpenFlows {
    stop: Arc<AtomicBool>,
    servers: Servers,
    clients: Vec<Clients>,
    progress: Progress,
}

/// What the flows carried, once kept.
#[derive(Debug)]
pub struct Kept {
    /// The servers' view of the server-writes connections (peer: the egress address and
    /// port), for checks of their own.
    pub pushed: Vec<Seen>,
    /// Datagrams the server sent each container, and the most any container missed (all
    /// in one stretch: the pause).
    pub datagrams_sent: usize,
    pub datagrams_lost: usize,
}

impl OpenFlows {
    /// Starts the servers in namespace `isp` on `server`, opens the flows from each of
    /// `containers` (network namespace paths), and waits until every flow has carried
    /// something.
    pub fn open(isp: &Path, server: IpAddr, containers: &[&Path]) -> OpenFlows {
        let stop = Arc::new(AtomicBool::new(false));
        let n = containers.len();
        let progress = Progress {
            pushed: Counts::new(n),
            talked: Counts::new(n),
            datagrams: Counts::new(n),
        };
        let servers = start_servers(isp, server, n, &stop, &progress.talked);
        let clients = containers
            .iter()
            .enumerate()
            .map(|(i, c)| start_clients(c, server, i, &stop, &progress))
            .collect();
        let flows = OpenFlows {
            stop,
            servers,
            clients,
            progress,
        };
        assert!(
            flows.wait_flowing(1, Duration::from_secs(10)),
            "the flows did not start: {}",
            flows.progress
        );
        flows
    }

    /// Waits until every flow has carried `n` more lines or datagrams than when called;
    /// false if `within` passes first.
    pub fn wait_flowing(&self, n: usize, within: Duration) -> bool {
        let target = self.progress.least() + n;
        let deadline = Instant::now() + within;
        while self.progress.least() < target {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Ends the flows and checks that they were kept, each container's from its egress IP
    /// (`ips`, in the order of the containers); the error says what was not.
    pub fn close(self, ips: &[&str]) -> Result<Kept, String> {
        self.stop.store(true, Ordering::Relaxed);
        let pushed = self.servers.push.join().unwrap();
        let talked = self.servers.talk.join().unwrap();
        let udp = self.servers.udp.join().unwrap();
        let mut received = Vec::new();
        let mut written = Vec::new();
        let mut lost = 0;
        for (i, c) in self.clients.into_iter().enumerate() {
            received.push(
                c.push
                    .join()
                    .unwrap()
                    .map_err(|e| format!("server-writes {i}: {e}"))?,
            );
            written.push(
                c.talk
                    .join()
                    .unwrap()
                    .map_err(|e| format!("container-writes {i}: {e}"))?,
            );
            let datagrams = c.udp.join().unwrap().map_err(|e| format!("udp {i}: {e}"))?;
            lost = lost
                .max(datagrams_lost(&datagrams, udp.sent).map_err(|e| format!("udp {i}: {e}"))?);
        }
        same_lines(received, &pushed, "server-writes")?;
        same_lines(written, &talked, "container-writes")?;
        same_egress(&pushed, &talked, &udp, ips)?;
        Ok(Kept {
            pushed,
            datagrams_sent: udp.sent,
            datagrams_lost: lost,
        })
    }
}

fn start_servers(
    isp: &Path,
    server: IpAddr,
    peers: usize,
    stop: &Arc<AtomicBool>,
    talked: &Counts,
) -> Servers {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (s1, s3, talked) = (stop.clone(), stop.clone(), talked.clone());
    let at = move |port| SocketAddr::new(server, port);
    let push = tcp_server(isp, at(PUSH_PORT), peers, ready_tx.clone(), move |s, _| {
        let sent = write_lines(&s, &s1);
        let _ = s.shutdown(Shutdown::Write);
        sent
    });
    let talk = tcp_server(isp, at(TALK_PORT), peers, ready_tx.clone(), move |s, i| {
        read_lines(&s, &talked, i)
    });
    let udp = in_netns(isp, move || {
        let u = UdpSocket::bind(at(UDP_PORT)).unwrap();
        ready_tx.send(()).unwrap();
        udp_server(u, peers, &s3)
    });
    for _ in 0..3 {
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
    Servers { push, talk, udp }
}

fn start_clients(
    netns: &Path,
    server: IpAddr,
    i: usize,
    stop: &Arc<AtomicBool>,
    progress: &Progress,
) -> Clients {
    let (s2, pushed) = (stop.clone(), progress.pushed.clone());
    let push = in_netns(netns, move || {
        let to = SocketAddr::new(server, PUSH_PORT);
        let s =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
        read_lines(&s, &pushed, i)
    });
    let talk = in_netns(netns, move || {
        let to = SocketAddr::new(server, TALK_PORT);
        let s =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let n = write_lines(&s, &s2)?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        Ok(n)
    });
    let datagrams = progress.datagrams.clone();
    let udp = in_netns(netns, move || udp_client(server, &datagrams, i));
    Clients { push, talk, udp }
}

/// Sends the first datagram, receives numbered ones until `end`, answers `bye`.
fn udp_client(server: IpAddr, counts: &Counts, i: usize) -> Result<Vec<usize>, String> {
    let any = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let u = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    u.connect(SocketAddr::new(server, UDP_PORT))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let first = say_hello(&u, &mut buf)?;
    u.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut next = Some(first);
    loop {
        let len = match next.take() {
            Some(len) => len,
            None => u
                .recv(&mut buf)
                .map_err(|e| format!("after {got:?}: {e}"))?,
        };
        let text = String::from_utf8_lossy(&buf[..len]).to_string();
        if text == "end" {
            u.send(b"bye").map_err(|e| e.to_string())?;
            return Ok(got);
        }
        got.push(text.parse::<usize>().map_err(|e| e.to_string())?);
        counts.bump(i);
    }
}

/// Sends `hello` every 200 ms until the server's first datagram arrives (within
/// [`WAIT`]): the flow starts from a datagram the server saw, not one lost on the way.
/// Returns the first datagram's length (in `buf`).
fn say_hello(u: &UdpSocket, buf: &mut [u8]) -> Result<usize, String> {
    u.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + WAIT;
    loop {
        u.send(b"hello").map_err(|e| e.to_string())?;
        match u.recv(buf) {
            Ok(len) => return Ok(len),
            Err(e) if Instant::now() >= deadline => return Err(format!("no answer to hello: {e}")),
            Err(_) => {}
        }
    }
}

/// How many of the `sent` datagrams (numbered from 0) are missing from `got`: they must
/// have arrived in order, the last one among them, the missing ones all in one stretch.
fn datagrams_lost(got: &[usize], sent: usize) -> Result<usize, String> {
    if got.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("datagrams out of order: {got:?}"));
    }
    if got.last().copied() != Some(sent.wrapping_sub(1)) {
        return Err(format!(
            "the last of {sent} datagrams did not arrive: {got:?}"
        ));
    }
    let stretches = got.windows(2).filter(|w| w[1] > w[0] + 1).count() + usize::from(got[0] > 0);
    if stretches > 1 {
        return Err(format!(
            "datagrams missing in {stretches} stretches: {got:?}"
        ));
    }
    Ok(sent - got.len())
}

/// Lines each container counted against what the server counted, connection by
/// connection (sorted: a container does not know which of the server's connections is
/// its own).
fn same_lines(mut mine: Vec<usize>, seen: &[Seen], what: &str) -> Result<(), String> {
    let mut theirs = Vec::new();
    for (peer, r) in seen {
        theirs.push(
            r.clone()
                .map_err(|e| format!("{what}, the server's side ({peer}): {e}"))?,
        );
    }
    mine.sort();
    theirs.sort();
    if mine != theirs {
        return Err(format!(
            "{what}: the containers counted {mine:?} lines, the server {theirs:?}"
        ));
    }
    Ok(())
}

/// Each flow seen from its container's egress IP; a UDP flow from the same address and
/// port before and after.
fn same_egress(pushed: &[Seen], talked: &[Seen], udp: &Udp, ips: &[&str]) -> Result<(), String> {
    let sorted = |it: &mut dyn Iterator<Item = String>| {
        let mut v: Vec<String> = it.collect();
        v.sort();
        v
    };
    let expected = sorted(&mut ips.iter().map(|ip| ip.to_string()));
    for (what, seen) in [("server-writes", pushed), ("container-writes", talked)] {
        let got = sorted(&mut seen.iter().map(|(peer, _)| peer.ip().to_string()));
        if got != expected {
            return Err(format!("{what}: egress IPs {got:?}, expected {expected:?}"));
        }
    }
    let n = ips.len();
    if udp.sources.len() != 2 * n {
        return Err(format!(
            "udp: the containers' first and last datagrams: {:?}",
            udp.sources
        ));
    }
    let mut udp_ips = sorted(&mut udp.sources.iter().map(|peer| peer.ip().to_string()));
    udp_ips.dedup();
    let mut expected = expected;
    expected.dedup();
    if udp_ips != expected {
        return Err(format!(
            "udp: egress IPs {udp_ips:?}, expected {expected:?}"
        ));
    }
    let before: HashSet<&SocketAddr> = udp.sources[..n].iter().collect();
    let after: HashSet<&SocketAddr> = udp.sources[n..].iter().collect();
    if before != after {
        return Err(format!(
            "udp: the mapping changed: {before:?} before, {after:?} after"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn datagrams_may_be_lost_only_in_one_stretch() {
        let lost = super::datagrams_lost;
        assert_eq!(lost(&[0, 1, 2, 3], 4), Ok(0));
        assert_eq!(lost(&[0, 1, 5, 6], 7), Ok(3));
        assert_eq!(lost(&[3, 4], 5), Ok(3));
        assert!(lost(&[0, 2, 4], 5).is_err());
        assert!(lost(&[1, 2, 4], 5).is_err());
        assert!(lost(&[0, 2, 1, 3], 4).is_err());
        assert!(lost(&[0, 1, 2], 4).is_err());
        assert!(lost(&[], 4).is_err());
    }
}
