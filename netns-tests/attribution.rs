//! Attribution: `wgexitd who` names the container that held an egress IP and port, from
//! the flows conntrack reported, also after the container is gone.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::world::{sh, Container, Settings, World, EGRESS_IP, EGRESS_IP6};

/// Where the port echo listens in the isp namespace (TCP and UDP).
const PORT_ECHO: &str = "198.18.0.10:9100";
const PORT_ECHO6: &str = "[2001:db8:ec::10]:9100";

/// Runs `f` on a thread inside namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .unwrap()
}

/// A server in `ns` answering each TCP connection and UDP datagram with the source
/// address and port it saw; returns once every socket is bound (and listening). Stops
/// when the returned flag is set.
pub fn start_port_echo(ns: &str, at: &[&str]) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let at: Vec<SocketAddr> = at.iter().map(|a| a.parse().unwrap()).collect();
    let sockets = in_netns(ns, move || {
        at.iter()
            .map(|a| {
                let tcp = TcpListener::bind(a).unwrap();
                let udp = UdpSocket::bind(a).unwrap();
                tcp.set_nonblocking(true).unwrap();
                udp.set_nonblocking(true).unwrap();
                (tcp, udp)
            })
            .collect::<Vec<_>>()
    });
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            let mut idle = true;
            for (tcp, udp) in &sockets {
                if let Ok((mut s, peer)) = tcp.accept() {
                    idle = false;
                    let _ = s.set_nonblocking(false);
                    let _ = writeln!(s, "{peer}");
                }
                let mut buf = [0u8; 64];
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    idle = false;
                    let _ = udp.send_to(format!("{peer}\n").as_bytes(), peer);
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    stop
}

/// A TCP connection from `c` to `to`: the source the server saw.
pub fn tcp_from(c: &Container, to: &str) -> SocketAddr {
    let to: SocketAddr = to.parse().unwrap();
    in_netns(&c.netns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut seen = String::new();
        s.read_to_string(&mut seen).unwrap();
        seen.trim().parse().unwrap()
    })
}

/// A UDP exchange from `c` to `to`: the source the server saw.
pub fn udp_from(c: &Container, to: &str) -> SocketAddr {
    let to: SocketAddr = to.parse().unwrap();
    in_netns(&c.netns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(b"who am i", to).unwrap();
        let mut buf = [0u8; 128];
        let (n, _) = s.recv_from(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).trim().parse().unwrap()
    })
}

/// `wgexitd ARGS --config CONFIG`.
pub fn wgexitd(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(crate::world::bin("wgexitd"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

/// `wgexitd who ADDRESS --json [EXTRA]`, parsed.
pub fn who(config: &std::path::Path, address: SocketAddr, extra: &[&str]) -> Value {
    let address = address.to_string();
    let mut args = vec!["who", address.as_str(), "--json"];
    args.extend_from_slice(extra);
    let out = wgexitd(config, &args);
    assert!(
        out.status.success(),
        "wgexitd who: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The container IDs `who`'s answer names.
pub fn named(answer: &Value) -> Vec<String> {
    answer["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["lease"]["container_id"].as_str().map(str::to_string))
        .collect()
}

/// Asks `who` until it names someone (the recorder writes in batches), bounded.
pub fn who_soon(config: &std::path::Path, address: SocketAddr, extra: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = who(config, address, extra);
        if !named(&answer).is_empty() || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Now, RFC 3339 with microseconds.
pub fn now_rfc3339() -> String {
    sh(&["date", "-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"])
        .trim()
        .to_string()
}

#[test]
fn who_names_the_container_behind_every_egress_port_also_after_it_is_gone() {
    let mut w = World::with(Settings {
        dual_stack: true,
        ..Settings::default()
    });
    let stop = start_port_echo(&w.isp, &[PORT_ECHO, PORT_ECHO6]);
    let config = w.daemon_config();
    let conf = w.net_conf("acme");
    let cs: Vec<Container> = ["c1", "c2", "c3"].iter().map(|n| w.container(n)).collect();
    for c in &cs {
        w.cni("ADD", c, &conf).ok();
    }
    let before = now_rfc3339();
    std::thread::sleep(Duration::from_millis(20));

    // Each container opens TCP connections; c2 a UDP flow too; c1 one over IPv6.
    let mut tcp = Vec::new();
    for c in &cs {
        for _ in 0..3 {
            let seen = tcp_from(c, PORT_ECHO);
            assert_eq!(seen.ip().to_string(), EGRESS_IP);
            tcp.push((seen, c.id.clone()));
        }
    }
    let udp = udp_from(&cs[1], PORT_ECHO);
    assert_eq!(udp.ip().to_string(), EGRESS_IP);
    let tcp6 = tcp_from(&cs[0], PORT_ECHO6);
    assert_eq!(tcp6.ip().to_string(), EGRESS_IP6);
    let during = now_rfc3339();

    for (seen, id) in tcp.iter().chain([(tcp6, cs[0].id.clone())].iter()) {
        let answer = who_soon(&config, *seen, &[]);
        assert_eq!(
            named(&answer),
            vec![id.clone()],
            "{seen}: {answer}\n{}",
            w.daemon_log()
        );
        let flow = &answer["flows"][0];
        assert_eq!(flow["lease"]["egress"], "acme");
        assert_eq!(flow["proto"], "tcp");
        assert_eq!(flow["egress_port"], seen.port());
        assert_eq!(flow["destination_port"], 9100);
        assert!(flow["first"].is_string());
    }

    // --proto udp names c2's UDP flow, and only it.
    let answer = who_soon(&config, udp, &["--proto", "udp"]);
    assert_eq!(named(&answer), vec![cs[1].id.clone()], "{answer}");
    assert_eq!(answer["flows"][0]["proto"], "udp");
    let tcp_only = who(&config, udp, &["--proto", "tcp"]);
    assert!(tcp_only["flows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["proto"] == "tcp"));

    // A time before any flow names nobody.
    for (seen, _) in &tcp {
        assert!(named(&who(&config, *seen, &["--at", &before])).is_empty());
    }

    // c1 is deleted: its ports still name it, now and at the time of the flows.
    w.cni("DEL", &cs[0], &conf).ok_empty();
    for (seen, id) in tcp.iter().filter(|(_, id)| *id == cs[0].id) {
        assert_eq!(named(&who(&config, *seen, &[])), vec![id.clone()]);
        assert_eq!(
            named(&who(&config, *seen, &["--at", &during])),
            vec![id.clone()]
        );
    }

    // conntrack lets c3's flows go: they are closed (with their byte counts), so nobody
    // holds those ports now, but c3 held them then.
    let c3_overlay = who(&config, tcp[6].0, &[])["flows"][0]["lease"]["overlay"]
        .as_str()
        .unwrap()
        .to_string();
    sh(&[
        "ip",
        "netns",
        "exec",
        &w.exit,
        "conntrack",
        "-D",
        "-s",
        &c3_overlay,
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !named(&who(&config, tcp[6].0, &[])).is_empty() {
        assert!(
            Instant::now() < deadline,
            "c3's flow still open: {}",
            w.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (seen, id) in tcp.iter().filter(|(_, id)| *id == cs[2].id) {
        let answer = who(&config, *seen, &["--at", &during]);
        assert_eq!(named(&answer), vec![id.clone()], "{answer}");
        assert!(answer["flows"][0]["last"].is_string(), "{answer}");
        assert!(
            answer["flows"][0]["bytes_in"].as_u64().unwrap() > 0,
            "{answer}"
        );
    }

    // The readable answer names the container too.
    let text = wgexitd(&config, &["who", &tcp[3].0.to_string()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&cs[1].id));

    // The export: one JSON object per line, every flow since `before`.
    let out = wgexitd(&config, &["flows", "--since", &before]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(flows.len() >= 11, "{flows:?}");
    for (seen, id) in &tcp {
        assert!(flows
            .iter()
            .any(|f| f["egress_port"] == seen.port() && f["lease"]["container_id"] == id.as_str()));
    }

    // Recorded, none lost.
    let metrics = w.metrics();
    assert!(
        metrics.contains("wgexit_attribution_recorded_total"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("wgexit_attribution_lost_total{"),
        "{metrics}"
    );
    stop.store(true, Ordering::Relaxed);
    for c in &cs[1..] {
        w.cni("DEL", c, &conf).ok_empty();
    }
}

#[test]
fn in_a_pool_the_member_that_did_not_forward_a_flow_names_its_container() {
    let mut p = crate::pool_world::Pool::new();
    let leader = p.wait_leader(Duration::from_secs(10));
    let other = 1 - leader;
    let stop = start_port_echo(&p.isp, &[PORT_ECHO]);
    let conf = p.net_conf();
    let c = p.container("c1");
    p.cni(0, "ADD", &c, &conf).ok();
    let seen = tcp_from(&c, PORT_ECHO);
    assert_eq!(seen.ip().to_string(), crate::pool_world::EGRESS_IP);

    // The leader forwarded it; the other member answers for the pool.
    let answer = who_soon(&p.member_config(other), seen, &[]);
    assert_eq!(
        named(&answer),
        vec![c.id.clone()],
        "{answer}\n{}",
        p.log(other)
    );
    assert_eq!(answer["flows"][0]["node"], p.members[leader].node.as_str());
    assert_eq!(answer["flows"][0]["lease"]["egress"], "acme");
    assert!(answer.get("unanswered").is_none(), "{answer}");
    // Asked of the leader, the same, once.
    let answer = who(&p.member_config(leader), seen, &[]);
    assert_eq!(named(&answer), vec![c.id.clone()], "{answer}");
    stop.store(true, Ordering::Relaxed);
    p.cni(0, "DEL", &c, &conf).ok_empty();
}

#[test]
fn a_burst_the_reader_cannot_take_is_counted_and_forwarding_goes_on() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("c1");
    w.cni("ADD", &c, &conf).ok();
    let overflows = |w: &World| {
        w.metrics()
            .lines()
            .find(|l| l.starts_with("wgexit_attribution_kernel_overflows_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(overflows(&w), 0.0, "{}", w.metrics());
    // The reader stops reading (as a stalled one would): its socket fills up.
    let daemon = w.daemon_pid().unwrap().to_string();
    let reader = sh(&["pgrep", "-P", &daemon, "-x", "conntrack"])
        .trim()
        .to_string();
    let pid = nix::unistd::Pid::from_raw(reader.parse().unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // A burst of 60,000 source-NATed flows from an address of the egress's pool.
    sh(&[
        "ip",
        "-n",
        &w.exit,
        "addr",
        "add",
        "100.96.0.250/32",
        "dev",
        "lo",
    ]);
    let started = Instant::now();
    in_netns(&w.exit, || {
        let s = UdpSocket::bind("100.96.0.250:0").unwrap();
        for port in 1024..61_024u16 {
            let _ = s.send_to(b"x", ("198.18.0.10", port));
        }
    });
    let burst = started.elapsed();
    // Forwarding never waited for the recorder.
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while overflows(&w) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no overflow counted: {}",
            w.metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "burst of 60,000 flows sent in {burst:?}; overflows {}",
        overflows(&w)
    );
    // And the recorder goes on recording.
    let stop = start_port_echo(&w.isp, &[PORT_ECHO]);
    let seen = tcp_from(&c, PORT_ECHO);
    let answer = who_soon(&w.daemon_config(), seen, &[]);
    assert_eq!(named(&answer), vec![c.id.clone()], "{answer}");
    stop.store(true, Ordering::Relaxed);
    w.cni("DEL", &c, &conf).ok_empty();
}
