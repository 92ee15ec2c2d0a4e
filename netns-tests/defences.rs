//! A single exit node's defences (docs/exit-node-defences.md): what turning IPv6 forwarding
//! on must not break, what the private policy covers, what one token may take, what the
//! plugin refuses to touch, and what a flood of connections must not stop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::isolation::refused;
use crate::world::{sh, try_sh, Container, Settings, World, EGRESS_IP6, SECOND_TOKEN, TOKEN};

/// Polls `check` every 50 ms until it holds or `limit` passes; whether it held.
fn within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The NAT64 prefixes lead, through a translator, to private IPv4 addresses: with the
/// default `private = "deny"` a container's packets to them are refused (TCP reset) and
/// counted, like those to any other private range, even where the exit node reaches them.
#[test]
fn defences_private_deny_covers_the_nat64_prefixes() {
    let mut w = World::with(Settings {
        dual_stack: true,
        ..Settings::default()
    });
    // The isp plays the NAT64 translator: it answers on both prefixes.
    let translated = [
        ("64:ff9b::c612:a", "[64:ff9b::c612:a]:8080"),
        ("64:ff9b:1:2::c612:a", "[64:ff9b:1:2::c612:a]:8080"),
    ];
    for (addr, at) in translated {
        let addr = format!("{addr}/128");
        sh(&["ip", "-n", &w.isp, "addr", "add", &addr, "dev", "lo"]);
        w.start_echo(at);
        let from_exit = try_sh(&[
            "ip",
            "netns",
            "exec",
            &w.exit,
            "curl",
            "-s",
            "-m",
            "3",
            &format!("http://{at}/"),
        ]);
        assert!(from_exit.status.success(), "the exit node reaches {at}");
    }
    let c = w.container("n64");
    w.cni("ADD", &c, &w.net_conf("acme")).ok();
    assert_eq!(w.echo6_from(&c).unwrap(), EGRESS_IP6, "{}", w.daemon_log());
    for (_, at) in translated {
        let before = refused(&w, "acme");
        let start = Instant::now();
        let err = w
            .fetch_from(&c, &format!("http://{at}/"), Duration::from_secs(3))
            .unwrap_err();
        assert!(err.contains("exit Some(7)"), "{at}: {err}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{at}: not refused at once"
        );
        assert!(refused(&w, "acme") > before, "{at}: not counted as refused");
    }
}

/// The exit node's IPv6 default route as `ip -6 route` shows it, if it came from a router
/// advertisement.
fn ra_default_route(w: &World) -> Option<String> {
    let out = sh(&["ip", "-n", &w.exit, "-6", "route", "show", "default"]);
    out.lines()
        .find(|l| l.contains("proto ra"))
        .map(str::to_string)
}

/// `radvd` on the isp's side of the uplink, advertising itself as the default router and
/// 2001:db8:77::/64 for SLAAC.
fn start_radvd(w: &World) -> Running {
    let conf = w.path("radvd.conf");
    std::fs::write(
        &conf,
        "interface up0 {\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n  MaxRtrAdvInterval 4;\n  \
         AdvDefaultLifetime 60;\n  prefix 2001:db8:77::/64 { AdvOnLink on; AdvAutonomous on; };\n};\n",
    )
    .unwrap();
    sh(&[
        "ip",
        "netns",
        "exec",
        &w.isp,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    let pid = w.path("radvd.pid");
    let child = Command::new("ip")
        .args(["netns", "exec", &w.isp, "radvd", "-n", "-m", "stderr", "-C"])
        .arg(&conf)
        .arg("-p")
        .arg(&pid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start radvd (scripts/deps installs it)");
    Running(child)
}

/// Sets an exit-namespace sysctl (`-w` form).
fn exit_sysctl(w: &World, setting: &str) {
    sh(&["ip", "netns", "exec", &w.exit, "sysctl", "-qw", setting]);
}

/// An exit node that learnt its IPv6 default route from a router advertisement (SLAAC)
/// keeps it when wgexitd turns IPv6 forwarding on, and its containers' IPv6 leaves by it.
#[test]
fn defences_ipv6_forwarding_keeps_the_router_advertised_default_route() {
    let mut w = World::with(Settings {
        dual_stack: true,
        ..Settings::default()
    });
    let c = w.container("ra");
    w.cni("ADD", &c, &w.net_conf("acme")).ok();
    // The exit node as it boots: not forwarding, accepting router advertisements, no
    // static IPv6 default route; then the daemon starts again.
    w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    exit_sysctl(&w, "net.ipv6.conf.all.forwarding=0");
    exit_sysctl(&w, "net.ipv6.conf.isp0.accept_ra=1");
    sh(&[
        "ip",
        "-n",
        &w.exit,
        "-6",
        "route",
        "del",
        "default",
        "via",
        "2001:db8:77::1",
    ]);
    let _radvd = start_radvd(&w);
    assert!(
        within(Duration::from_secs(15), || ra_default_route(&w).is_some()),
        "no default route from the router advertisement: {}",
        sh(&["ip", "-n", &w.exit, "-6", "route"])
    );

    w.start_daemon();
    let forwarding = || {
        sh(&[
            "ip",
            "netns",
            "exec",
            &w.exit,
            "sysctl",
            "-n",
            "net.ipv6.conf.all.forwarding",
        ])
    };
    assert!(within(Duration::from_secs(5), || forwarding().trim() == "1"));
    assert!(
        ra_default_route(&w).is_some(),
        "wgexitd's forwarding removed the router-advertised default route: {}",
        sh(&["ip", "-n", &w.exit, "-6", "route"])
    );
    assert_eq!(w.echo6_from(&c).unwrap(), EGRESS_IP6, "{}", w.daemon_log());
    // Later advertisements still count: the route is renewed, not left to expire.
    let accept_ra = sh(&[
        "ip",
        "netns",
        "exec",
        &w.exit,
        "sysctl",
        "-n",
        "net.ipv6.conf.isp0.accept_ra",
    ]);
    assert_eq!(accept_ra.trim(), "2");
}

/// The world's host namespace's default route and links, as `ip` prints them.
fn routes_and_links(w: &World) -> (String, Vec<String>) {
    (sh(&["ip", "-n", &w.host, "route"]), w.links(&w.host))
}

/// `wgexit oci-hook add` run in the world's host namespace for container `hostnet-2`, whose
/// process is `pid` and whose `config.json` has no network namespace; plugin config `conf`.
fn oci_hook_add(w: &World, conf: &serde_json::Value, pid: u32) -> std::process::Output {
    let bundle = w.path("hostnet-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let config = serde_json::json!({"ociVersion": "1.0.2",
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}});
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    let hook_conf = w.path("hook.conf");
    std::fs::write(&hook_conf, conf.to_string()).unwrap();
    let state = serde_json::json!({"ociVersion": "1.0.2", "id": "hostnet-2",
        "status": "created", "pid": pid, "bundle": bundle});
    let mut hook = Command::new("ip")
        .args([
            "netns",
            "exec",
            &w.host,
            crate::world::bin("wgexit"),
            "oci-hook",
            "add",
        ])
        .arg("--config")
        .arg(&hook_conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    hook.stdin
        .take()
        .unwrap()
        .write_all(state.to_string().as_bytes())
        .unwrap();
    hook.wait_with_output().unwrap()
}

/// A host-network container's namespace is the host's. Neither ADD given the plugin's own
/// namespace as `CNI_NETNS` nor the OCI hook for a container whose `config.json` names no
/// network namespace touches it: both refuse with CNI code 4, saying why, and the host's
/// routes and links stay as they were. (The world's host namespace plays the host: the
/// plugin runs in it.)
#[test]
fn defences_the_plugin_refuses_the_hosts_own_namespace() {
    let w = World::new();
    sh(&[
        "ip",
        "-n",
        &w.host,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.2",
    ]);
    let before = routes_and_links(&w);
    let conf = w.net_conf("acme");
    let host_ns = std::path::PathBuf::from(format!("/var/run/netns/{}", w.host));
    let out = w.cni_raw(
        "ADD",
        "hostnet-1",
        Some(&host_ns),
        "eth0",
        conf.to_string().as_bytes(),
    );
    let (code, msg) = out.err();
    assert_eq!(code, 4, "{msg}");
    assert!(msg.contains("plugin's own network namespace"), "{msg}");
    assert_eq!(routes_and_links(&w), before);
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());

    // The OCI hook: a container process in the host's namespace, and a config.json whose
    // namespaces have no "network" entry.
    let sleeper = Running(
        Command::new("ip")
            .args(["netns", "exec", &w.host, "sleep", "60"])
            .spawn()
            .unwrap(),
    );
    let out = oci_hook_add(&w, &conf, sleeper.0.id());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("error 4:"), "{stderr}");
    assert!(stderr.contains("host-network container"), "{stderr}");
    assert_eq!(routes_and_links(&w), before);
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
}

/// Leases an address for a fresh key through the API with `token`, as a client that never
/// completes a handshake: (status, body).
fn lease_random_key(w: &World, token: &str) -> (u16, String) {
    let key = wgexit::keys::Key::generate_private().unwrap().public();
    let body = serde_json::json!({ "public_key": key.to_base64(),
        "attachment": { "container_id": "drain", "ifname": "eth0", "host": "nowhere" } });
    w.api_with(
        "POST",
        "/v1/egress/acme/leases",
        Some(token),
        Some(&body.to_string()),
        &[],
    )
}

/// Egress acme's pool (a /28: 13 leases) is shared by two tokens. One token re-leasing random
/// keys stops at its share (6) with 409 `quota_exceeded`, and the other still gets leases.
/// A configured quota no pool can hold (more than the largest, egress other's /24: 253) is
/// refused by the config check.
#[test]
fn defences_one_token_cannot_drain_a_shared_pool() {
    let w = World::with(Settings {
        pool: Some("100.96.0.0/28".into()),
        ..Settings::default()
    });
    let mut granted = 0;
    let (status, body) = loop {
        let (status, body) = lease_random_key(&w, TOKEN);
        if status != 200 {
            break (status, body);
        }
        granted += 1;
        assert!(granted <= 13, "more leases than the pool holds");
    };
    assert_eq!((status, granted), (409, 6), "{body}");
    assert!(body.contains("quota_exceeded"), "{body}");
    for _ in 0..6 {
        let (status, body) = lease_random_key(&w, SECOND_TOKEN);
        assert_eq!(status, 200, "the other token: {body}");
    }

    let config = std::fs::read_to_string(w.daemon_config()).unwrap();
    let too_big = w.path("too-big.toml");
    std::fs::write(&too_big, format!("max_leases_per_owner = 254\n{config}")).unwrap();
    let out = try_sh(&[
        crate::world::bin("wgexitd"),
        "check-config",
        "--config",
        &too_big.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("max_leases_per_owner"), "{stderr}");
    assert!(stderr.contains("100.97.0.0/24"), "{stderr}");
}

/// A bounded flood of TCP connections from namespace `ns` (from its address `source`, if
/// given) to `to`: every other one stalls in the middle of a message (a TLS ClientHello's
/// start, or for DNS a length its bytes never reach), the rest send nothing. Held open until
/// dropped.
struct Flood {
    connected: usize,
    _sockets: Vec<std::net::TcpStream>,
}

impl Flood {
    fn open(ns: &str, source: Option<&str>, to: &str, n: usize) -> Flood {
        use nix::sys::socket::{
            bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
            SockaddrStorage,
        };
        // The flood's own descriptors: this process's soft limit up to its hard one.
        let (_, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .unwrap();
        assert!(hard as usize > n + 256, "the test needs {n} descriptors");
        let ns = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        let to: std::net::SocketAddr = to.parse().unwrap();
        let family = if to.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let source = source.map(|ip| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            SockaddrStorage::from(std::net::SocketAddr::new(ip, 0))
        });
        let to = SockaddrStorage::from(to);
        std::thread::spawn(move || {
            use std::os::fd::AsFd;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut sockets = Vec::new();
            for i in 0..n {
                let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
                let wait = nix::sys::time::TimeVal::new(1, 0);
                setsockopt(&fd, sockopt::SendTimeout, &wait).unwrap();
                if let Some(source) = &source {
                    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), source).unwrap();
                }
                if connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &to).is_err() {
                    continue;
                }
                let mut s = std::net::TcpStream::from(fd);
                if i % 2 == 1 {
                    // A TLS record header announcing 512 bytes of ClientHello, and its first byte.
                    use std::io::Write;
                    let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
                }
                sockets.push(s);
            }
            Flood {
                connected: sockets.len(),
                _sockets: sockets,
            }
        })
        .join()
        .unwrap()
    }
}

/// The world's daemon, restarted under `prlimit --nofile=LIMITS` (soft:hard); killed when
/// dropped (before the world, which is declared first).
struct Limited {
    daemon: Running,
    log: std::path::PathBuf,
}

impl Limited {
    /// Serving (its API answers) when it returns.
    fn restart(w: &mut World, limits: &str) -> Limited {
        w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
        let log = w.path("limited.log");
        let daemon = Running(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &w.exit,
                    "prlimit",
                    &format!("--nofile={limits}"),
                ])
                .arg(crate::world::bin("wgexitd"))
                .arg("serve")
                .arg("--config")
                .arg(w.daemon_config())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let limited = Limited { daemon, log };
        assert!(
            within(Duration::from_secs(30), || w
                .api_raw("GET", "/healthz", None)
                .0
                == 200),
            "{}",
            limited.log()
        );
        limited
    }

    /// `ip netns exec` and `prlimit` exec the daemon: the child's pid is the daemon's.
    fn pid(&self) -> u32 {
        self.daemon.0.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// After a flood: a new container is added within 5 s and leaves from the egress IP,
    /// `steady` still does, and the daemon never ran out of descriptors.
    fn still_serves(&self, w: &mut World, steady: &Container) {
        let start = Instant::now();
        let fresh = w.container("fresh");
        w.cni("ADD", &fresh, &w.net_conf("acme")).ok();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "ADD took {:?}",
            start.elapsed()
        );
        assert_eq!(w.echo_from(&fresh).unwrap(), crate::world::EGRESS_IP);
        assert_eq!(w.echo_from(steady).unwrap(), crate::world::EGRESS_IP);
        let log = self.log();
        assert!(!log.contains("Too many open files"), "{log}");
    }
}

/// Descriptors process `pid` holds open.
fn descriptors_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Under a 1,024-descriptor limit, 1,100 connections from one address (idle, or stalled in
/// the TLS handshake) neither exhaust the daemon's descriptors nor stop an authenticated
/// lease from another address, and traffic through existing tunnels goes on. The daemon,
/// started with a soft limit of 512, raises it to the hard 1,024.
#[test]
fn defences_a_connection_flood_under_1024_descriptors_stops_no_lease() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let steady = w.container("steady");
    w.cni("ADD", &steady, &conf).ok();
    let daemon = Limited::restart(&mut w, "512:1024");
    let pid = daemon.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["1024", "1024"],
        "{open_files}"
    );
    assert_eq!(w.echo_from(&steady).unwrap(), crate::world::EGRESS_IP);

    sh(&[
        "ip",
        "-n",
        &w.host,
        "addr",
        "add",
        "198.51.100.11/24",
        "dev",
        "up0",
    ]);
    let flood = Flood::open(&w.host, Some("198.51.100.11"), crate::world::API, 1100);
    let held = descriptors_of(pid);
    assert!(held < 1024 - 128, "the daemon holds {held} descriptors");
    daemon.still_serves(&mut w, &steady);
    eprintln!(
        "flood: {} connections made, the daemon held {held} descriptors",
        flood.connected
    );
}

/// The private network of the DNS flood test: its prefix and resolver.
const NET_PREFIX: &str = "fdde:0:1::/48";
const NET_RESOLVER: &str = "fdde:0:1::3";
const NET_TOKEN: &str = "defence-net-token-0123456789";

/// A DNS query (recursion desired) for `name`, type A.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}

/// `dig @resolver AAAA name` from `ns`: the addresses answered.
fn dig_aaaa(ns: &str, name: &str) -> Vec<String> {
    let out = try_sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "dig",
        "+time=2",
        "+tries=1",
        "+short",
        &format!("@{NET_RESOLVER}"),
        "AAAA",
        name,
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Adds private network acme ([`NET_PREFIX`]) to the world's config, its upstream resolver
/// an address of the isp that swallows every query. Takes effect at the daemon's next start.
fn add_network_with_a_silent_upstream(w: &World) {
    std::fs::write(w.path("net.tokens"), format!("{NET_TOKEN}\n")).unwrap();
    std::fs::write(w.path("net.token"), format!("{NET_TOKEN}\n")).unwrap();
    let table = format!(
        "\n[[network]]\nname = \"acme\"\nprefix = \"{NET_PREFIX}\"\nwg_interface = \"{id}n\"\n\
         listen_port = 51830\nendpoint = \"198.51.100.2:51830\"\ntoken_file = \"{tokens}\"\n\
         dns_upstream = [\"198.18.0.53:53\"]\n",
        id = w.id,
        tokens = w.path("net.tokens").display(),
    );
    let config = std::fs::read_to_string(w.daemon_config()).unwrap();
    std::fs::write(w.daemon_config(), format!("{config}{table}")).unwrap();
    sh(&[
        "ip",
        "-n",
        &w.isp,
        "route",
        "add",
        "blackhole",
        "198.18.0.53/32",
    ]);
}

/// Joins `c` to network acme from the world's host with APP=`app`: its address.
fn join_network(w: &World, c: &crate::world::Container, app: &str) -> String {
    let mut conf = w.net_conf("acme");
    conf["network"] = serde_json::json!("acme");
    conf.as_object_mut().unwrap().remove("egress");
    conf["routes"] = serde_json::json!("none");
    conf["tokenFile"] = serde_json::json!(w.path("net.token"));
    let args = format!("APP={app};REGION=ams");
    let out = w.cni_on(
        &w.host,
        "ADD",
        &c.id,
        Some(&c.netns_path),
        "eth0",
        conf.to_string().as_bytes(),
        &[("CNI_ARGS", &args)],
    );
    let result = out.ok();
    let address = result["ips"][0]["address"].as_str().unwrap();
    address.split('/').next().unwrap().to_string()
}

/// Sends `n` queries for distinct outside names to the network's resolver from `c`, at once.
fn udp_query_flood(c: &crate::world::Container, n: u16) {
    let ns = std::fs::File::open(&c.netns_path).unwrap();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        let to = format!("[{NET_RESOLVER}]:53");
        for i in 0..n {
            let _ = s.send_to(&dns_query(i, &format!("q{i}.example")), &to);
        }
    })
    .join()
    .unwrap();
}

/// Under a 1,024-descriptor limit, a network member sending 5,000 queries for outside names
/// at once, to an upstream that never answers (each forwarded query would hold a socket for
/// its 2 s), then holding 1,100 TCP connections to the resolver, leaves the daemon its
/// descriptors: another member's `.internal` names resolve,
/// an authenticated lease is granted, and existing tunnels carry traffic.
#[test]
fn defences_a_dns_flood_from_a_member_under_1024_descriptors_stops_nothing_else() {
    let mut w = World::new();
    let steady = w.container("steady");
    w.cni("ADD", &steady, &w.net_conf("acme")).ok();
    add_network_with_a_silent_upstream(&w);
    let daemon = Limited::restart(&mut w, "1024:1024");

    let (flooder, asker) = (w.container("flooder"), w.container("asker"));
    let web = join_network(&w, &flooder, "web");
    join_network(&w, &asker, "db");
    assert_eq!(
        dig_aaaa(&asker.netns, "web.internal"),
        std::slice::from_ref(&web)
    );

    let before = descriptors_of(daemon.pid());
    // The flood: 5,000 queries at once from one member, for names only the upstream knows.
    udp_query_flood(&flooder, 5000);
    std::thread::sleep(Duration::from_millis(300));
    // At most the forwarding cap's sockets more (and a few for the checks' own traffic).
    let held = descriptors_of(daemon.pid());
    assert!(
        held <= before + 64 + 16,
        "the daemon holds {held} descriptors, {before} before"
    );
    assert_eq!(
        dig_aaaa(&asker.netns, "web.internal"),
        std::slice::from_ref(&web)
    );

    // Then 1,100 TCP connections to the resolver from the same member, held open.
    let tcp = Flood::open(&flooder.netns, None, &format!("[{NET_RESOLVER}]:53"), 1100);
    let held = descriptors_of(daemon.pid());
    assert!(
        held <= before + 64 + 16 + 16,
        "the daemon holds {held} descriptors, {before} before"
    );
    let over_tcp = try_sh(&[
        "ip",
        "netns",
        "exec",
        &asker.netns,
        "dig",
        "+tcp",
        "+time=2",
        "+tries=1",
        "+short",
        &format!("@{NET_RESOLVER}"),
        "AAAA",
        "web.internal",
    ]);
    assert_eq!(String::from_utf8_lossy(&over_tcp.stdout).trim(), web);
    daemon.still_serves(&mut w, &steady);
    eprintln!(
        "DNS flood: {} TCP connections made, the daemon held {held} descriptors",
        tcp.connected
    );
}

/// Sends `copies` copies of one question for `name` (IDs 1 to `copies`) to the network's
/// resolver from `c`, at once, from one socket: the (ID, response code) of each answer that
/// comes within `wait`.
fn ask_copies(c: &Container, name: &str, copies: u16, wait: Duration) -> Vec<(u16, u8)> {
    let ns = std::fs::File::open(&c.netns_path).unwrap();
    let name = name.to_string();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        let to = format!("[{NET_RESOLVER}]:53");
        for id in 1..=copies {
            s.send_to(&dns_query(id, &name), &to).unwrap();
        }
        let deadline = Instant::now() + wait;
        let mut answers = Vec::new();
        let mut buf = [0u8; 512];
        while answers.len() < usize::from(copies) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s.set_read_timeout(Some(left)).unwrap();
            match s.recv(&mut buf) {
                Ok(n) if n >= 4 => {
                    answers.push((u16::from_be_bytes([buf[0], buf[1]]), buf[3] & 0xf))
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        answers
    })
    .join()
    .unwrap()
}

/// The packets the isp has seen for the network's upstream (198.18.0.53, UDP 53), counted
/// by a table of the test's own in the isp's namespace (made on the first call).
fn upstream_queries(w: &World) -> u64 {
    let table = format!("{}count", w.id);
    let exists = try_sh(&[
        "ip", "netns", "exec", &w.isp, "nft", "list", "table", "inet", &table,
    ]);
    if !exists.status.success() {
        let rules = w.path("upstream-count.nft");
        let ruleset = format!(
            "table inet {table} {{\n chain pre {{\n  type filter hook prerouting priority -300;\n  \
             ip daddr 198.18.0.53 udp dport 53 counter\n }}\n}}\n"
        );
        std::fs::write(&rules, ruleset).unwrap();
        let rules = rules.display().to_string();
        sh(&["ip", "netns", "exec", &w.isp, "nft", "-f", &rules]);
        return 0;
    }
    let listing = String::from_utf8_lossy(&exists.stdout).to_string();
    let rest = &listing[listing.find("packets ").expect("a counter") + "packets ".len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Copies of one outside question in flight at once reach the upstream once: a member that
/// sends ten (as a spoofer racing many copies of a question would want it to) makes one
/// upstream query, and each copy still gets its own answer, with its own ID.
#[test]
fn defences_copies_of_one_question_in_flight_reach_the_upstream_once() {
    let mut w = World::new();
    add_network_with_a_silent_upstream(&w);
    w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    w.start_daemon();
    let asker = w.container("asker");
    join_network(&w, &asker, "db");
    assert_eq!(upstream_queries(&w), 0);

    // The upstream never answers: the one query is in flight for the whole 2 s timeout,
    // and every copy is answered SERVFAIL when it ends.
    let answers = ask_copies(&asker, "www.example.test", 10, Duration::from_secs(5));
    let mut ids: Vec<u16> = answers.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=10).collect::<Vec<u16>>(), "{answers:?}");
    assert!(answers.iter().all(|(_, code)| *code == 2), "{answers:?}");
    assert_eq!(upstream_queries(&w), 1, "one upstream query for ten copies");

    // Once that flight is over, the next question is asked anew.
    let answers = ask_copies(&asker, "www.example.test", 1, Duration::from_secs(5));
    assert_eq!(answers, [(1, 2)]);
    assert_eq!(upstream_queries(&w), 2);
}
