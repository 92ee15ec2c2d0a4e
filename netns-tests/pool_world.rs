//! The test world of a pool: a real 3-member etcd cluster, two `wgexitd` members and two
//! container hosts, each in its own namespace, on shared L2 segments (bridges inside a
//! namespace of their own):
//!
//! ```text
//!  core segment 198.51.100.0/24:  etcd e1-e3 .21-.23, members m1 .11 m2 .12, hosts h1 .31 h2 .32,
//!                                 the endpoint 198.51.100.2 floating on the leader
//!  isp segment  203.0.113.0/24:   members .11 .12, isp .1 (echo 198.18.0.10:8080),
//!                                 the egress IP 203.0.113.77 floating on the leader;
//!               2001:db8:77::/64: members ::11 ::12, isp ::1 (echo [2001:db8:ec::10]:8080),
//!                                 the egress IPv6 2001:db8:77::77 floating on the leader
//! ```
//!
//! etcd runs as in production: TLS on its client and peer ports, client certificates
//! required (`--client-cert-auth`), every certificate made by the world with `openssl`
//! ([`Pool::make_certificates`]); members hold one each, and the tests' `etcdctl` an
//! administrator's ([`Pool::etcdctl`]). Members share a `secret_file`.
//!
//! Names are unique per world; dropping it kills every process and removes every namespace.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::world::{sh, try_sh, CniOutput, Container, TOKEN};

pub const EGRESS_IP: &str = "203.0.113.77";
pub const ENDPOINT_IP: &str = "198.51.100.2";
pub const ECHO: &str = "198.18.0.10:8080";
/// The egress's static IPv6, on the isp segment 2001:db8:77::/64 (isp ::1, members ::11, ::12),
/// floating on the leader like the IPv4.
pub const EGRESS_IP6: &str = "2001:db8:77::77";
pub const ECHO6: &str = "[2001:db8:ec::10]:8080";
pub const LEADER_TTL: u64 = 1;
/// A second egress of [`Pool::with_beta`]: its own egress IP, the same endpoint address as
/// acme's on another port, so both are led together.
pub const BETA_IP: &str = "203.0.113.78";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Member {
    pub node: String,
    pub ns: String,
    pub ip: String,
    pub wg: String,
    daemon: Option<Child>,
}

pub struct EtcdNode {
    pub name: String,
    pub ns: String,
    pub ip: String,
    child: Option<Child>,
}

pub struct Pool {
    pub id: String,
    pub dir: tempfile::TempDir,
    pub seg: String,
    pub isp: String,
    pub hosts: Vec<String>,
    pub etcd: Vec<EtcdNode>,
    pub members: Vec<Member>,
    pub containers: Vec<Container>,
    /// Whether members also have egress "beta", member `i` listing it before acme when `i`
    /// is odd.
    pub beta: bool,
    echo_stop: Arc<AtomicBool>,
}

fn netns_exec(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]);
    c
}

impl Pool {
    /// Makes the segments, the etcd cluster and the two members, and waits for all of them.
    pub fn new() -> Pool {
        Pool::build(false, "")
    }

    /// [`Pool::new`] whose members also have egress "beta" ([`BETA_IP`]), sharing acme's
    /// endpoint address, their tables in opposite orders.
    pub fn with_beta() -> Pool {
        Pool::build(true, "")
    }

    /// [`Pool::new`] with `extra` (TOML; `{wg}` stands for the member's `wg`, `{tokens}` for
    /// the tokens file) at the end of every member's config.
    pub fn with_config(extra: &str) -> Pool {
        Pool::build(false, extra)
    }

    fn build(beta: bool, extra: &str) -> Pool {
        crate::world::require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("wx{:x}p{n}", std::process::id() & 0xffff);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .unwrap();
        let mut p = Pool {
            seg: format!("{id}-seg"),
            isp: format!("{id}-isp"),
            hosts: (1..=2).map(|i| format!("{id}-h{i}")).collect(),
            etcd: (1..=3)
                .map(|i| EtcdNode {
                    name: format!("e{i}"),
                    ns: format!("{id}-e{i}"),
                    ip: format!("198.51.100.2{i}"),
                    child: None,
                })
                .collect(),
            members: (1..=2)
                .map(|i| Member {
                    node: format!("m{i}"),
                    ns: format!("{id}-m{i}"),
                    ip: format!("198.51.100.1{i}"),
                    wg: format!("{id}w{i}"),
                    daemon: None,
                })
                .collect(),
            containers: Vec::new(),
            beta,
            echo_stop: Arc::new(AtomicBool::new(false)),
            id,
            dir,
        };
        p.make_certificates();
        p.build_network();
        p.build_ipv6();
        p.start_echo(ECHO);
        p.start_echo(ECHO6);
        for i in 0..3 {
            p.start_etcd(i);
        }
        for i in 0..3 {
            p.wait_etcd(i);
        }
        p.write_configs(extra);
        for i in 0..2 {
            p.start_member(i);
        }
        p
    }

    fn add_ns(&self, ns: &str) {
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// A link `ifname` in `ns` with `addr`, plugged into `bridge` of the segment namespace
    /// through its peer `port`.
    fn plug(&self, ns: &str, ifname: &str, addr: &str, bridge: &str, port: &str) {
        sh(&[
            "ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port,
            "netns", &self.seg,
        ]);
        sh(&[
            "ip", "-n", &self.seg, "link", "set", port, "master", bridge, "up",
        ]);
        sh(&["ip", "-n", ns, "addr", "add", addr, "dev", ifname]);
        sh(&["ip", "-n", ns, "link", "set", ifname, "up"]);
    }

    fn build_network(&self) {
        self.add_ns(&self.seg);
        for br in ["br0", "br1"] {
            sh(&["ip", "-n", &self.seg, "link", "add", br, "type", "bridge"]);
            sh(&["ip", "-n", &self.seg, "link", "set", br, "up"]);
        }
        self.add_ns(&self.isp);
        self.plug(&self.isp, "isp0", "203.0.113.1/24", "br1", "i-isp");
        sh(&[
            "ip",
            "-n",
            &self.isp,
            "addr",
            "add",
            "198.18.0.10/32",
            "dev",
            "lo",
        ]);
        for e in &self.etcd {
            self.add_ns(&e.ns);
            self.plug(
                &e.ns,
                "core0",
                &format!("{}/24", e.ip),
                "br0",
                &format!("c-{}", e.name),
            );
        }
        for (i, m) in self.members.iter().enumerate() {
            self.add_ns(&m.ns);
            self.plug(
                &m.ns,
                "core0",
                &format!("{}/24", m.ip),
                "br0",
                &format!("c-{}", m.node),
            );
            let isp = format!("203.0.113.1{}/24", i + 1);
            self.plug(&m.ns, "isp0", &isp, "br1", &format!("i-{}", m.node));
            sh(&[
                "ip",
                "-n",
                &m.ns,
                "route",
                "add",
                "default",
                "via",
                "203.0.113.1",
            ]);
        }
        for (i, h) in self.hosts.iter().enumerate() {
            self.add_ns(h);
            let addr = format!("198.51.100.3{}/24", i + 1);
            self.plug(h, "core0", &addr, "br0", &format!("c-h{}", i + 1));
        }
    }

    /// The isp segment's IPv6 (no duplicate address detection: usable at once), the isp's
    /// IPv6 echo address, the members' IPv6 default routes.
    /// Another host on the core segment (`198.51.100.3<n>`, after h1 and h2); returns its
    /// index in `hosts`. Removed with the world.
    pub fn add_host(&mut self) -> usize {
        let i = self.hosts.len();
        let ns = format!("{}-h{}", self.id, i + 1);
        self.add_ns(&ns);
        let addr = format!("198.51.100.3{}/24", i + 1);
        self.plug(&ns, "core0", &addr, "br0", &format!("c-h{}", i + 1));
        self.hosts.push(ns);
        i
    }

    fn build_ipv6(&self) {
        let isp = ["-n", &self.isp, "addr", "add"];
        let echo6 = ECHO6.trim_start_matches('[').split(']').next().unwrap();
        sh(&[&["ip"][..], &isp, &[&format!("{echo6}/128"), "dev", "lo"]].concat());
        sh(&[
            &["ip"][..],
            &isp,
            &["2001:db8:77::1/64", "dev", "isp0", "nodad"],
        ]
        .concat());
        for (i, m) in self.members.iter().enumerate() {
            let addr = format!("2001:db8:77::1{}/64", i + 1);
            sh(&[
                "ip", "-n", &m.ns, "addr", "add", &addr, "dev", "isp0", "nodad",
            ]);
            let route = ["-6", "route", "add", "default", "via", "2001:db8:77::1"];
            sh(&[&["ip", "-n", m.ns.as_str()][..], &route].concat());
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn etcd_urls(&self) -> Vec<String> {
        self.etcd
            .iter()
            .map(|e| format!("https://{}:2379", e.ip))
            .collect()
    }

    /// Runs `openssl` with `args` in the world's directory; panics with its output on
    /// failure.
    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl (scripts/deps installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `NAME.pem` and `NAME.key`, issued by the world's etcd CA with `extensions`.
    fn issue(&self, name: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(self.path(&ext), extensions).unwrap();
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "etcd-ca.pem",
            "-CAkey",
            "etcd-ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }

    /// The etcd CA; a server certificate per etcd node (its IP; also its peer client
    /// certificate), a client certificate per member and one for the administrator
    /// (`root`); the pool's secret.
    fn make_certificates(&self) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "etcd-ca.key",
            "-out",
            "etcd-ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=wgexit test etcd CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        let leaf =
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n";
        for e in &self.etcd {
            self.issue(
                &e.name,
                &format!(
                    "{leaf}extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:{}\n",
                    e.ip
                ),
            );
        }
        for name in self.members.iter().map(|m| m.node.as_str()).chain(["root"]) {
            self.issue(name, &format!("{leaf}extendedKeyUsage=clientAuth\n"));
        }
        let secret = self.path("pool.secret");
        self.openssl(&["rand", "-base64", "-out", "pool.secret", "48"]);
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }

    /// `etcdctl` in etcd node `i`'s namespace, with the administrator's certificate, talking
    /// to that node.
    pub fn etcdctl(&self, i: usize) -> Command {
        let e = &self.etcd[i];
        let mut c = netns_exec(&e.ns);
        c.arg("etcdctl")
            .arg(format!("--endpoints=https://{}:2379", e.ip))
            .arg(format!("--cacert={}", self.path("etcd-ca.pem").display()))
            .arg(format!("--cert={}", self.path("root.pem").display()))
            .arg(format!("--key={}", self.path("root.key").display()))
            .args(["--dial-timeout", "1s", "--command-timeout", "1s"])
            .env("ETCDCTL_API", "3");
        c
    }

    /// The index of an etcd node that runs.
    pub fn live_etcd(&self) -> usize {
        self.etcd.iter().position(|e| e.child.is_some()).unwrap()
    }

    pub fn start_etcd(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .etcd
            .iter()
            .map(|e| format!("{}=https://{}:2380", e.name, e.ip))
            .collect();
        let e = &self.etcd[i];
        let client = format!("https://{}:2379", e.ip);
        let peer = format!("https://{}:2380", e.ip);
        let file = |ext: &str| self.path(&format!("{}.{ext}", e.name));
        let ca = self.path("etcd-ca.pem");
        let log = std::fs::File::create(self.path(&format!("{}.log", e.name))).unwrap();
        let child = netns_exec(&e.ns)
            .arg("etcd")
            .args(["--name", &e.name, "--data-dir"])
            .arg(self.path(&format!("{}.data", e.name)))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-token", &self.id])
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--cert-file")
            .arg(file("pem"))
            .arg("--key-file")
            .arg(file("key"))
            .arg("--peer-client-cert-auth")
            .arg("--peer-trusted-ca-file")
            .arg(&ca)
            .arg("--peer-cert-file")
            .arg(file("pem"))
            .arg("--peer-key-file")
            .arg(file("key"))
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (scripts/deps installs etcd-server)");
        self.etcd[i].child = Some(child);
    }

    /// Waits until etcd member `i` answers as healthy (it needs a quorum for that).
    pub fn wait_etcd(&self, i: usize) {
        let e = &self.etcd[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self
                .etcdctl(i)
                .args(["endpoint", "health"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "etcd {} not healthy", e.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many keys etcd holds under the pool's `rest` (e.g. `leases/acme/`).
    pub fn keys_under(&self, rest: &str) -> usize {
        let prefix = format!("/wgexit/{}/{rest}", self.id);
        let out = self
            .etcdctl(self.live_etcd())
            .args(["get", "--prefix", "--keys-only", &prefix])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .count()
    }

    /// Waits until the leader has published `n` peers' endpoints in etcd (for the next
    /// leader's handshakes).
    pub fn wait_endpoints_published(&self, n: usize, within: Duration) {
        self.wait_space_endpoints_published("acme", n, within)
    }

    /// [`Pool::wait_endpoints_published`] for the space stored as `scope` (an egress's
    /// name, `network:<name>` for a network).
    pub fn wait_space_endpoints_published(&self, scope: &str, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let keys = self.keys_under(&format!("endpoints/{scope}/"));
            if keys >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{keys} of {n} endpoints published"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop_etcd(&mut self, i: usize) {
        if let Some(mut c) = self.etcd[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn member_config(&self, i: usize) -> PathBuf {
        self.path(&format!("{}.toml", self.members[i].node))
    }

    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.path(&format!("{}-state", self.members[i].node))
    }

    pub fn ca_file(&self) -> PathBuf {
        self.state_dir(0).join("tls/ca.pem")
    }

    fn write_configs(&self, extra: &str) {
        std::fs::write(self.path("acme.tokens"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(self.path("acme.token"), format!("{TOKEN}\n")).unwrap();
        let etcd: Vec<String> = self
            .etcd_urls()
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect();
        for (i, m) in self.members.iter().enumerate() {
            let acme = format!(
                r#"
[[egress]]
name = "acme"
ip = "{EGRESS_IP}"
ip6 = "{EGRESS_IP6}"
pool6 = "fd77:0:1::/64"
interface = "isp0"
pool = "100.96.0.0/23"
wg_interface = "{wg}"
listen_port = 51820
endpoint = "{ENDPOINT_IP}:51820"
endpoint_interface = "core0"
token_file = "{tokens}"
"#,
                wg = m.wg,
                tokens = self.path("acme.tokens").display(),
            );
            let beta = format!(
                r#"
[[egress]]
name = "beta"
ip = "{BETA_IP}"
interface = "isp0"
pool = "100.97.0.0/23"
wg_interface = "{id}b{n}"
listen_port = 51821
endpoint = "{ENDPOINT_IP}:51821"
endpoint_interface = "core0"
token_file = "{tokens}"
"#,
                id = self.id,
                n = i + 1,
                tokens = self.path("acme.tokens").display(),
            );
            let egresses = match (self.beta, i % 2) {
                (false, _) => acme,
                (true, 0) => format!("{acme}{beta}"),
                (true, _) => format!("{beta}{acme}"),
            };
            let config = format!(
                r#"state_dir = "{state}"
backend = "userspace"

[api]
listen = "{ip}:7443"
{egresses}
[cluster]
name = "{id}"
node = "{node}"
etcd = [{etcd}]
etcd_ca = "{dir}/etcd-ca.pem"
etcd_cert = "{dir}/{node}.pem"
etcd_key = "{dir}/{node}.key"
secret_file = "{dir}/pool.secret"
leader_ttl = {LEADER_TTL}
"#,
                dir = self.dir.path().display(),
                state = self.state_dir(i).display(),
                ip = m.ip,
                id = self.id,
                node = m.node,
                etcd = etcd.join(", "),
            );
            let tokens = self.path("acme.tokens");
            let extra = extra.replace("{wg}", &m.wg);
            let config = config + &extra.replace("{tokens}", &tokens.display().to_string());
            std::fs::write(self.member_config(i), config).unwrap();
        }
    }

    pub fn start_member(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{}.log", m.node)))
            .unwrap();
        let child = netns_exec(&m.ns)
            .arg(crate::world::bin("wgexitd"))
            .args(["serve", "--config"])
            .arg(self.member_config(i))
            .env("RUST_LOG", "info,wgexit=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start wgexitd");
        self.members[i].daemon = Some(child);
        self.wait_member(i);
    }

    fn wait_member(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ca_file().exists() && self.api(i, "GET", "/healthz", None).0 == 200 {
                return;
            }
            if let Some(Ok(Some(status))) = self.members[i].daemon.as_mut().map(Child::try_wait) {
                panic!(
                    "wgexitd {} exited ({status}): {}",
                    self.members[i].node,
                    self.log(i)
                );
            }
            assert!(
                Instant::now() < deadline,
                "wgexitd not ready: {}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.path(&format!("{}.log", self.members[i].node)))
            .unwrap_or_default()
    }

    /// Kills member `i` the way a machine dies: its daemon and WireGuard device gone, its
    /// namespace cut off both segments (its addresses stay on its own links, unseen).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let m = &self.members[i];
        let _ = try_sh(&["ip", "-n", &m.ns, "link", "del", &m.wg]);
        self.cut(i, true);
    }

    /// Takes member `i`'s links to the segments down (`core_only`: only the core one, so
    /// it still sees the isp segment) or brings them back.
    pub fn set_links(&self, i: usize, up: bool, core_only: bool) {
        let node = &self.members[i].node;
        let state = if up { "up" } else { "down" };
        let mut ports = vec![format!("c-{node}")];
        if !core_only {
            ports.push(format!("i-{node}"));
        }
        for port in ports {
            sh(&["ip", "-n", &self.seg, "link", "set", &port, state]);
        }
    }

    pub fn cut(&self, i: usize, both: bool) {
        self.set_links(i, false, !both);
    }

    /// Brings a killed member back as a rebooted machine: no floating addresses, plugged
    /// in again, daemon started.
    pub fn revive_member(&mut self, i: usize) {
        let ns = self.members[i].ns.clone();
        let _ = try_sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "del",
            &format!("{EGRESS_IP}/32"),
            "dev",
            "isp0",
        ]);
        let _ = try_sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "del",
            &format!("{ENDPOINT_IP}/32"),
            "dev",
            "core0",
        ]);
        let _ = try_sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "del",
            &format!("{BETA_IP}/32"),
            "dev",
            "isp0",
        ]);
        let egress6 = format!("{EGRESS_IP6}/128");
        let _ = try_sh(&["ip", "-n", &ns, "addr", "del", &egress6, "dev", "isp0"]);
        self.set_links(i, true, false);
        self.start_member(i);
    }

    /// Whether member `i` has `ip` on any link.
    pub fn holds(&self, i: usize, ip: &str) -> bool {
        self.held(i).contains(&format!(" {ip}/"))
    }

    /// Every address on member `i`'s links (`ip -o addr show`).
    pub fn held(&self, i: usize) -> String {
        let out = try_sh(&["ip", "-n", &self.members[i].ns, "-o", "addr", "show"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until member `i` holds both floating addresses.
    pub fn wait_holds(&self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while !(self.holds(i, EGRESS_IP) && self.holds(i, ENDPOINT_IP)) {
            assert!(
                Instant::now() < deadline,
                "member {i} did not take over:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until exactly one member holds both floating addresses; returns it.
    pub fn wait_leader(&self, within: Duration) -> usize {
        self.wait_holder(&[EGRESS_IP, ENDPOINT_IP], within)
    }

    /// Waits until exactly one member holds every address of `ips`; returns it.
    pub fn wait_holder(&self, ips: &[&str], within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let holders: Vec<usize> = (0..2)
                .filter(|&i| ips.iter().all(|ip| self.holds(i, ip)))
                .collect();
            if holders.len() == 1 {
                return holders[0];
            }
            assert!(
                Instant::now() < deadline,
                "no single holder of {ips:?}: {holders:?}\n{}\n{}",
                self.log(0),
                self.log(1)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An API call to member `i` from host h1: (status, body).
    pub fn api(&self, i: usize, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let url = format!("https://{}:7443{path}", self.members[i].ip);
        let mut cmd = netns_exec(&self.hosts[0]);
        cmd.args(["curl", "-s", "-m", "5", "--cacert"])
            .arg(self.ca_file())
            .args(["-X", method, "-w", "\n%{http_code}"])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = cmd.arg(url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The leases member `i` serves.
    pub fn leases(&self, i: usize) -> Vec<Value> {
        let (code, body) = self.api(i, "GET", "/v1/egress/acme/leases", None);
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["leases"].as_array().cloned().unwrap_or_default()
    }

    /// Public keys of member `i`'s WireGuard peers.
    pub fn peers(&self, i: usize) -> Vec<String> {
        let m = &self.members[i];
        let out = try_sh(&["ip", "netns", "exec", &m.ns, "wg", "show", &m.wg, "peers"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn net_conf(&self) -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "egress",
            "type": "wgexit",
            "servers": self.members.iter().map(|m| format!("https://{}:7443", m.ip)).collect::<Vec<_>>(),
            "egress": "acme",
            "tokenFile": self.path("acme.token"),
            "caFile": self.ca_file(),
            "backend": "userspace",
            "dataDir": self.path("cni-data"),
        })
    }

    /// A new container namespace on host `h`.
    pub fn container(&mut self, name: &str) -> Container {
        let ns = format!("{}-{name}", self.id);
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let c = Container {
            id: format!("{ns}-id"),
            netns: ns.clone(),
            netns_path: PathBuf::from(format!("/var/run/netns/{ns}")),
            world_dir: self.dir.path().to_path_buf(),
        };
        self.containers.push(c.clone());
        c
    }

    /// Runs the plugin on host `h` as a runtime would.
    pub fn cni(&self, h: usize, command: &str, c: &Container, conf: &Value) -> CniOutput {
        let mut child = netns_exec(&self.hosts[h])
            .arg(crate::world::bin("wgexit"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &c.id)
            .env("CNI_NETNS", &c.netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        CniOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn start_echo(&self, at: &'static str) {
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.isp)).unwrap();
        let stop = self.echo_stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = TcpListener::bind(at).unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "{}", peer.ip());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}

/// One request from inside `netns` to the echo server: the source address it saw.
pub fn echo_once(netns: &Path, timeout: Duration) -> Result<String, String> {
    echo_at(netns, ECHO, timeout)
}

/// [`echo_once`] to the IPv6 echo server.
pub fn echo6_once(netns: &Path, timeout: Duration) -> Result<String, String> {
    echo_at(netns, ECHO6, timeout)
}

fn echo_at(netns: &Path, at: &str, timeout: Duration) -> Result<String, String> {
    let ns = std::fs::File::open(netns).map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| e.to_string())?;
            let addr: SocketAddr = at.parse().unwrap();
            let mut stream =
                TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            stream.read_to_string(&mut out).map_err(|e| e.to_string())?;
            Ok(out.trim().to_string())
        })
        .join()
        .unwrap()
    })
}

/// When a probe request was made and what it got.
type Answers = Vec<(Instant, Result<String, String>)>;

/// A probe from a container: one request every 100 ms, each answer (or failure) recorded.
pub struct Probe {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Answers>>,
}

impl Probe {
    pub fn start(netns: &Path) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, path) = (stop.clone(), netns.to_path_buf());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                seen.push((at, echo_once(&path, Duration::from_millis(300))));
                std::thread::sleep(
                    (at + Duration::from_millis(100)).saturating_duration_since(Instant::now()),
                );
            }
            seen
        });
        Probe {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops; returns the answers (source addresses) and the longest time between two
    /// successful requests.
    pub fn stop(self) -> (Vec<String>, Duration) {
        let ok = self.stop_timed();
        let gap = ok
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or(Duration::MAX);
        (ok.into_iter().map(|(_, ip)| ip).collect(), gap)
    }

    /// Stops; returns each successful request: when it began, and the answer.
    pub fn stop_timed(mut self) -> Vec<(Instant, String)> {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.handle.take().unwrap().join().unwrap();
        seen.into_iter()
            .filter_map(|(at, r)| r.ok().map(|ip| (at, ip)))
            .collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.echo_stop.store(true, Ordering::Relaxed);
        // WGEXIT_KEEP_LOGS=1: a failed test leaves its directory (members' and etcd's logs).
        if std::thread::panicking() && std::env::var_os("WGEXIT_KEEP_LOGS").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("pool world kept in {}", self.dir.path().display());
        }
        for i in 0..self.members.len() {
            if let Some(mut c) = self.members[i].daemon.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let m = &self.members[i];
            let _ = try_sh(&["ip", "-n", &m.ns, "link", "del", &m.wg]);
        }
        for i in 0..self.etcd.len() {
            self.stop_etcd(i);
        }
        crate::world::clear_spares(self.dir.path());
        // Containers' host-side links were moved into them; their wireguard-go exits when
        // the link goes with the namespace.
        let names: Vec<String> = self
            .containers
            .iter()
            .map(|c| c.netns.clone())
            .chain(self.hosts.clone())
            .chain(self.members.iter().map(|m| m.ns.clone()))
            .chain(self.etcd.iter().map(|e| e.ns.clone()))
            .chain([self.isp.clone(), self.seg.clone()])
            .collect();
        for ns in names {
            let _ = try_sh(&["ip", "netns", "del", &ns]);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        let ours = |n: &str| {
            n.starts_with(&self.id)
                || self
                    .containers
                    .iter()
                    .any(|c| n.starts_with(&c.host_ifname("eth0")))
        };
        let sockets = || -> Vec<String> {
            std::fs::read_dir("/var/run/wireguard")
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| ours(n))
                        .collect()
                })
                .unwrap_or_default()
        };
        while Instant::now() < deadline && !sockets().is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
        for s in sockets() {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{s}"));
        }
    }
}
