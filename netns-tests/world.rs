//! The test world of DESIGN.md, made and removed by each test:
//!
//! ```text
//!  container ns ──(WireGuard)──► host ns ──veth──► exit ns ──veth──► isp ns
//!  (one per container)          198.51.100.10    198.51.100.2       203.0.113.1
//!                                                203.0.113.77 (egress IP)
//!                                                                   198.18.0.10:8080 echo
//!                                                2001:db8:77::77    2001:db8:77::1
//!                                                (egress IPv6)      [2001:db8:ec::10]:8080 echo
//! ```
//!
//! Every name is unique per world (namespaces, the exit's userspace WireGuard socket), so
//! worlds run side by side; addresses can repeat because each world's namespaces are its own.
//! Dropping a world kills its daemon and removes every namespace, file and socket it made.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ECHO: &str = "198.18.0.10:8080";
/// The isp's IPv6 echo server.
pub const ECHO6: &str = "[2001:db8:ec::10]:8080";
pub const EGRESS_IP: &str = "203.0.113.77";
/// With [`Settings::dual_stack`]: egress acme's static IPv6, on the exit's uplink
/// 2001:db8:77::/64 (the isp is 2001:db8:77::1).
pub const EGRESS_IP6: &str = "2001:db8:77::77";
pub const POOL6: &str = "fd77:0:1::/64";
/// With [`Settings::dual_stack`]: egress other's own static IPs and IPv6 pool.
pub const OTHER_IP: &str = "203.0.113.78";
pub const OTHER_IP6: &str = "2001:db8:77::78";
pub const OTHER_POOL6: &str = "fd77:0:2::/64";
pub const API: &str = "198.51.100.2:7443";
/// `[metrics] listen` of the exit node, inside its namespace.
pub const METRICS: &str = "127.0.0.1:9469";
pub const HOST_IP: &str = "198.51.100.10";
pub const POOL: &str = "100.96.0.0/24";
pub const TOKEN: &str = "acme-token-0123456789abcdef";
pub const OTHER_TOKEN: &str = "other-token-0123456789abcdef";
/// A second token of egress acme (another tenant team, say): same egress, other owner.
pub const SECOND_TOKEN: &str = "acme-second-token-0123456789";

/// The path of one of the workspace's binaries, `wgexit` or `wgexitd`. They belong to other
/// packages of the workspace, so cargo does not hand their paths to this test: they are beside
/// it in the profile's directory, built by `cargo build --workspace --bins` (scripts/test does).
pub fn bin(name: &str) -> &'static str {
    static PLUGIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static DAEMON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let cell = match name {
        "wgexit" => &PLUGIN,
        "wgexitd" => &DAEMON,
        other => panic!("no workspace binary named {other}"),
    };
    cell.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps");
        let path = dir.join(name);
        assert!(
            path.exists(),
            "{} is missing: build the binaries first (cargo build --workspace --bins)",
            path.display()
        );
        path.to_string_lossy().into_owned()
    })
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The WireGuard backend of both sides, as configs name it: `$WGEXIT_TEST_BACKEND`, else
/// "userspace" (these machines have no WireGuard module; the VM test sets "kernel").
pub fn backend() -> String {
    std::env::var("WGEXIT_TEST_BACKEND").unwrap_or_else(|_| "userspace".to_string())
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output whatever its status.
pub fn try_sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// nftables in namespace `ns` (rules written to `file`) that drop the first WireGuard
/// handshake initiation (message type 1: a 148-byte payload starting 01 00 00 00) arriving
/// with UDP `port` (`"sport 51820"`, `"dport 51820"`), and only the first: the rule's quota
/// (300 bytes) is used up by that one 176-byte packet.
pub fn drop_first_handshake_initiation(ns: &str, file: &Path, port: &str) {
    let rules = format!(
        "table inet lost_handshake {{\n chain input {{\n  type filter hook input priority -10;\n  \
         udp {port} @th,64,32 0x01000000 quota until 300 bytes counter drop\n }}\n}}\n"
    );
    std::fs::write(file, rules).unwrap();
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "-f",
        &file.to_string_lossy(),
    ]);
}

/// Packets the rule of [`drop_first_handshake_initiation`] in `ns` dropped.
pub fn handshakes_dropped(ns: &str) -> u64 {
    let table = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "list",
        "table",
        "inet",
        "lost_handshake",
    ]);
    let rest = table.split("counter packets ").nth(1).unwrap_or_default();
    let n = rest.split_whitespace().next().unwrap_or_default();
    n.parse()
        .unwrap_or_else(|_| panic!("no counter in {table}"))
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the namespace tests need root (network namespaces, nftables); run scripts/test as root"
    );
}

pub struct World {
    pub id: String,
    pub dir: tempfile::TempDir,
    pub isp: String,
    pub exit: String,
    pub host: String,
    pub wg_interface: String,
    /// The WireGuard backend both sides' configs name.
    pub backend: String,
    daemon: Option<Child>,
    echo_stop: Arc<AtomicBool>,
    containers: Vec<Container>,
    settings: Settings,
}

/// Knobs of a world's exit node beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Top-level `wgexitd.toml` lines (timeouts, intervals, ...).
    pub daemon_extra: String,
    /// Egress acme's pool instead of [`POOL`].
    pub pool: Option<String>,
    /// `RUST_LOG` for the daemon.
    pub log_filter: Option<String>,
    /// Egress acme's `ips` instead of `ip = EGRESS_IP` (each added on the exit's uplink,
    /// in 203.0.113.0/24 like [`EGRESS_IP`]).
    pub egress_ips: Vec<String>,
    /// Egress acme's `assign`.
    pub assign: Option<String>,
    /// Both egresses dual stack: acme with `ip6 =` [`EGRESS_IP6`], other with its own
    /// [`OTHER_IP`] and [`OTHER_IP6`] (else other shares acme's IPv4).
    pub dual_stack: bool,
    /// Egress other's `ips` instead of one `ip` (each added on the exit's uplink).
    pub other_ips: Vec<String>,
    /// Egress other's pool instead of 100.97.0.0/24.
    pub other_pool: Option<String>,
    /// Lines after egress other's keys (its `[egress.policy]`, say): the config's last table.
    pub other_tail: String,
}

impl Settings {
    /// Egress acme's IP lines of `wgexitd.toml`.
    fn acme_ip_lines(&self) -> String {
        if self.egress_ips.is_empty() {
            return format!("ip = \"{EGRESS_IP}\"");
        }
        let ips: Vec<String> = self.egress_ips.iter().map(|ip| format!("{ip:?}")).collect();
        let assign = self
            .assign
            .as_ref()
            .map(|a| format!("\nassign = {a:?}"))
            .unwrap_or_default();
        format!("ips = [{}]{assign}", ips.join(", "))
    }

    /// Egress acme's IPv6 lines.
    fn acme_ip6_lines(&self) -> String {
        if !self.dual_stack {
            return String::new();
        }
        format!("ip6 = \"{EGRESS_IP6}\"\npool6 = \"{POOL6}\"")
    }

    /// Egress other's IP lines: its `ips` when given, else its own [`OTHER_IP`] when dual
    /// stack, else acme's IPv4; and its IPv6 when dual stack.
    fn other_ip_lines(&self) -> String {
        let v4 = if !self.other_ips.is_empty() {
            let ips: Vec<String> = self.other_ips.iter().map(|ip| format!("{ip:?}")).collect();
            format!("ips = [{}]", ips.join(", "))
        } else if self.dual_stack {
            format!("ip = \"{OTHER_IP}\"")
        } else {
            format!("ip = \"{EGRESS_IP}\"")
        };
        if !self.dual_stack {
            return v4;
        }
        format!("{v4}\nip6 = \"{OTHER_IP6}\"\npool6 = \"{OTHER_POOL6}\"")
    }
}

impl World {
    /// Makes the namespaces, links and echo server, writes configs, and starts `wgexitd`,
    /// with the backend of [`backend()`].
    pub fn new() -> World {
        World::with(Settings::default())
    }

    /// As [`World::new`], with `backend` ("auto", "kernel", "userspace") on both sides.
    pub fn with_backend(backend: &str) -> World {
        World::with_backend_and(backend, Settings::default())
    }

    /// [`World::new`] with `settings` for the exit node.
    pub fn with(settings: Settings) -> World {
        World::with_backend_and(&backend(), settings)
    }

    fn with_backend_and(backend: &str, mut settings: Settings) -> World {
        if std::env::var_os("WGEXIT_TEST_WRONG_SERVER_KEY").is_some() {
            // Keep the periodic reconcile from repairing the broken key mid-test.
            settings
                .daemon_extra
                .push_str("\nreconcile_interval = 86400\n");
        }
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("wx{:x}{n}", std::process::id() & 0xffff);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .expect("tempdir");
        let mut w = World {
            isp: format!("{id}-isp"),
            exit: format!("{id}-exit"),
            host: format!("{id}-host"),
            wg_interface: format!("{id}e"),
            backend: backend.to_string(),
            id,
            dir,
            daemon: None,
            echo_stop: Arc::new(AtomicBool::new(false)),
            containers: Vec::new(),
            settings,
        };
        for ns in [&w.isp, &w.exit, &w.host] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // isp <-> exit uplink; exit <-> host.
        sh(&[
            "ip", "link", "add", "isp0", "netns", &w.exit, "type", "veth", "peer", "name", "up0",
            "netns", &w.isp,
        ]);
        sh(&[
            "ip", "link", "add", "down0", "netns", &w.exit, "type", "veth", "peer", "name", "up0",
            "netns", &w.host,
        ]);
        sh(&[
            "ip",
            "-n",
            &w.isp,
            "addr",
            "add",
            "203.0.113.1/24",
            "dev",
            "up0",
        ]);
        sh(&[
            "ip",
            "-n",
            &w.isp,
            "addr",
            "add",
            "198.18.0.10/32",
            "dev",
            "lo",
        ]);
        sh(&["ip", "-n", &w.isp, "link", "set", "up0", "up"]);
        w.add_ipv6_uplink();
        sh(&[
            "ip",
            "-n",
            &w.exit,
            "addr",
            "add",
            &format!("{EGRESS_IP}/24"),
            "dev",
            "isp0",
        ]);
        for ip in w.settings.egress_ips.iter().chain(&w.settings.other_ips) {
            let ip = format!("{ip}/24");
            sh(&["ip", "-n", &w.exit, "addr", "add", &ip, "dev", "isp0"]);
        }
        if w.settings.dual_stack {
            let ip = format!("{OTHER_IP}/24");
            sh(&["ip", "-n", &w.exit, "addr", "add", &ip, "dev", "isp0"]);
        }
        sh(&[
            "ip",
            "-n",
            &w.exit,
            "addr",
            "add",
            "198.51.100.2/24",
            "dev",
            "down0",
        ]);
        sh(&["ip", "-n", &w.exit, "link", "set", "isp0", "up"]);
        sh(&["ip", "-n", &w.exit, "link", "set", "down0", "up"]);
        sh(&[
            "ip",
            "-n",
            &w.exit,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.1",
        ]);
        sh(&[
            "ip",
            "-n",
            &w.exit,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:77::1",
        ]);
        sh(&[
            "ip",
            "-n",
            &w.host,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            "up0",
        ]);
        sh(&["ip", "-n", &w.host, "link", "set", "up0", "up"]);
        w.start_echo(ECHO);
        w.start_echo(ECHO6);
        w.write_configs();
        w.start_daemon();
        if std::env::var_os("WGEXIT_TEST_WRONG_SERVER_KEY").is_some() {
            w.break_server_key();
        }
        w
    }

    /// Gives the exit node's WireGuard device a key other than the one the API hands out, so
    /// no handshake can succeed (the world then sets a reconcile interval that never comes
    /// round during a test, so the daemon does not repair it). The VM
    /// test uses this to show that its scenario fails when the tunnel does not work.
    fn break_server_key(&self) {
        let key = wgexit::keys::Key::generate_private().unwrap().to_base64();
        let path = self.path("wrong.key");
        std::fs::write(&path, key).unwrap();
        let path = path.display().to_string();
        self.exit_wg(&["set", &self.wg_interface, "private-key", &path]);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("exit-state")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path("cni-data")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.state_dir().join("tls/ca.pem")
    }

    pub fn daemon_config(&self) -> PathBuf {
        self.path("wgexitd.toml")
    }

    fn write_configs(&self) {
        std::fs::write(
            self.path("acme.tokens"),
            format!("# acme\n{TOKEN}\n{SECOND_TOKEN}\n"),
        )
        .unwrap();
        std::fs::write(self.path("other.tokens"), format!("{OTHER_TOKEN}\n")).unwrap();
        std::fs::write(self.path("acme.token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(self.path("other.token"), format!("{OTHER_TOKEN}\n")).unwrap();
        let wg2 = format!("{}o", self.id);
        let config = format!(
            r#"{extra}
state_dir = "{state}"
backend = "{backend}"

[api]
listen = "{API}"

[metrics]
listen = "{METRICS}"

[[egress]]
name = "acme"
{acme_ips}
{acme_ip6}
interface = "isp0"
pool = "{pool}"
wg_interface = "{wg}"
listen_port = 51820
endpoint = "198.51.100.2:51820"
token_file = "{tokens}"

[[egress]]
name = "other"
{other_ips}
interface = "isp0"
pool = "{other_pool}"
wg_interface = "{wg2}"
listen_port = 51821
endpoint = "198.51.100.2:51821"
token_file = "{other_tokens}"
{other_tail}
"#,
            extra = self.settings.daemon_extra,
            acme_ips = self.settings.acme_ip_lines(),
            acme_ip6 = self.settings.acme_ip6_lines(),
            other_ips = self.settings.other_ip_lines(),
            other_pool = self
                .settings
                .other_pool
                .as_deref()
                .unwrap_or("100.97.0.0/24"),
            other_tail = self.settings.other_tail,
            pool = self.settings.pool.as_deref().unwrap_or(POOL),
            state = self.state_dir().display(),
            backend = self.backend,
            wg = self.wg_interface,
            tokens = self.path("acme.tokens").display(),
            other_tokens = self.path("other.tokens").display(),
        );
        std::fs::write(self.daemon_config(), config).unwrap();
    }

    /// The plugin config for `egress`, as JSON.
    pub fn net_conf(&self, egress: &str) -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "egress",
            "type": "wgexit",
            "servers": [format!("https://{API}")],
            "egress": egress,
            "tokenFile": self.path(&format!("{egress}.token")),
            "caFile": self.ca_file(),
            "backend": self.backend,
            "mtu": 1420,
            "routes": "default",
            "dataDir": self.data_dir(),
        })
    }

    pub fn start_daemon(&mut self) {
        let log = std::fs::File::create(self.path("wgexitd.log")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.exit,
                crate::world::bin("wgexitd"),
                "serve",
                "--config",
            ])
            .arg(self.daemon_config())
            .envs(self.settings.log_filter.as_ref().map(|f| ("RUST_LOG", f)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start wgexitd");
        self.daemon = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if self.ca_file().exists() && self.api_raw("GET", "/healthz", None).0 == 200 {
                return;
            }
            if let Some(child) = self.daemon.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("wgexitd exited ({status}): {}", self.daemon_log());
                }
            }
            // Generous: under the VM test's emulated CPU a first start takes seconds.
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "wgexitd not ready: {}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.path("wgexitd.log")).unwrap_or_default()
    }

    /// The daemon's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The pid of the `wireguard-go` serving the exit node's device for egress acme.
    pub fn exit_wireguard_go(&self) -> Option<u32> {
        wgexit::wg::userspace::pid_of(&self.wg_interface)
    }

    /// `wg show IF dump` of egress acme's device in the exit node: per peer public key,
    /// (latest handshake in seconds since the epoch, rx bytes).
    pub fn exit_peer_stats(&self) -> std::collections::HashMap<String, (u64, u64)> {
        self.exit_wg_show("dump")
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((f[0].to_string(), (f[4].parse().ok()?, f[5].parse().ok()?)))
            })
            .collect()
    }

    /// The packet counter of the exit node's nftables rule commented `comment`
    /// (e.g. "acme: anti-spoof").
    pub fn nft_counter(&self, comment: &str) -> u64 {
        let listing = sh(&[
            "ip", "netns", "exec", &self.exit, "nft", "list", "table", "inet", "wgexitd",
        ]);
        let line = listing
            .lines()
            .find(|l| l.contains(&format!("comment \"{comment}\"")))
            .unwrap_or_else(|| panic!("no rule {comment:?} in {listing}"));
        let rest = &line[line.find("packets ").expect("a counter") + "packets ".len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Stops the daemon with `signal` and waits for it.
    pub fn stop_daemon(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut child) = self.daemon.take() {
            // `ip netns exec` execs the daemon, so the child pid is the daemon's.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
        }
    }

    /// An API call from the host namespace through curl: (status, body).
    pub fn api_raw(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        self.api_with(method, path, token, None, &[])
    }

    /// An API call with an optional JSON body and extra curl arguments: (status, body).
    pub fn api_with(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        extra: &[&str],
    ) -> (u16, String) {
        let url = format!("https://{API}{path}");
        let ca = self.ca_file();
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            self.host.clone(),
            "curl".into(),
            "-s".into(),
            "-m".into(),
            "5".into(),
            "--cacert".into(),
            ca.display().to_string(),
            "-X".into(),
            method.into(),
            "-w".into(),
            "\n%{http_code}".into(),
        ];
        if let Some(t) = token {
            args.push("-H".into());
            args.push(format!("Authorization: Bearer {t}"));
        }
        if let Some(b) = body {
            args.extend(["-H".into(), "Content-Type: application/json".into()]);
            args.extend(["--data-binary".into(), b.into()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(url);
        let out = Command::new("ip").args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// A plain-HTTP GET of `path` on the exit node's metrics listener: (status, body).
    pub fn metrics_raw(&self, path: &str) -> (u16, String) {
        let out = try_sh(&[
            "ip",
            "netns",
            "exec",
            &self.exit,
            "curl",
            "-s",
            "-m",
            "5",
            "-w",
            "\n%{http_code}",
            &format!("http://{METRICS}{path}"),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The exit node's `/metrics` (Prometheus text).
    pub fn metrics(&self) -> String {
        let (code, body) = self.metrics_raw("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// The leases the exit node holds for `egress`.
    pub fn leases(&self, egress: &str, token: &str) -> Vec<Value> {
        let (code, body) = self.api_raw("GET", &format!("/v1/egress/{egress}/leases"), Some(token));
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["leases"].as_array().cloned().unwrap_or_default()
    }

    /// Runs `wg ARGS` in the exit node's namespace; returns stdout.
    pub fn exit_wg(&self, args: &[&str]) -> String {
        let mut command = vec!["ip", "netns", "exec", &self.exit, "wg"];
        command.extend_from_slice(args);
        sh(&command)
    }

    /// `wg show IF WHAT` of egress acme's device in the exit node.
    pub fn exit_wg_show(&self, what: &str) -> String {
        self.exit_wg(&["show", &self.wg_interface, what])
    }

    /// Public keys of the exit node's WireGuard peers for egress acme.
    pub fn exit_peers(&self) -> Vec<String> {
        self.exit_wg_show("peers")
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// A new, empty container namespace.
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

    /// Runs the plugin from the host namespace as a runtime would.
    pub fn cni(&self, command: &str, c: &Container, conf: &Value) -> CniOutput {
        self.cni_raw(
            command,
            &c.id,
            Some(&c.netns_path),
            "eth0",
            conf.to_string().as_bytes(),
        )
    }

    pub fn cni_raw(
        &self,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        stdin: &[u8],
    ) -> CniOutput {
        self.cni_on(&self.host, command, container_id, netns, ifname, stdin, &[])
    }

    /// Runs the plugin from container host namespace `host`, with `env` added (e.g.
    /// `CNI_ARGS`).
    #[allow(clippy::too_many_arguments)]
    pub fn cni_on(
        &self,
        host: &str,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        stdin: &[u8],
        env: &[(&str, &str)],
    ) -> CniOutput {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", host, crate::world::bin("wgexit")])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", "/opt/cni/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", ns);
        }
        let mut child = cmd.spawn().expect("run wgexit");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        CniOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// An HTTP request from `c` to the echo server: the source address it saw.
    pub fn echo_from(&self, c: &Container) -> Result<String, String> {
        self.echo_from_within(c, Duration::from_secs(5))
    }

    /// [`World::echo_from`], giving up after `limit`.
    pub fn echo_from_within(&self, c: &Container, limit: Duration) -> Result<String, String> {
        let (host, port) = ECHO.split_once(':').unwrap();
        let out = try_sh(&[
            "ip",
            "netns",
            "exec",
            &c.netns,
            "curl",
            "-s",
            "-m",
            &format!("{:.1}", limit.as_secs_f64()),
            &format!("http://{host}:{port}/"),
        ]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "curl exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// An HTTP request from `c` to the IPv6 echo server: the source address it saw.
    pub fn echo6_from(&self, c: &Container) -> Result<String, String> {
        self.fetch_from(c, &format!("http://{ECHO6}/"), Duration::from_secs(5))
    }

    /// `curl URL` in `c`, giving up after `limit`: the body, or curl's complaint.
    pub fn fetch_from(&self, c: &Container, url: &str, limit: Duration) -> Result<String, String> {
        let out = try_sh(&[
            "ip",
            "netns",
            "exec",
            &c.netns,
            "curl",
            "-s",
            "-S",
            "-m",
            &format!("{:.1}", limit.as_secs_f64()),
            url,
        ]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "curl exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The isp and the exit on 2001:db8:77::/64 (the exit's IPv6 egress IPs on it), the
    /// exit's IPv6 default route via the isp, the isp's echo address on its loopback. No
    /// duplicate address detection: the addresses are usable at once.
    fn add_ipv6_uplink(&self) {
        let echo6 = ECHO6.trim_start_matches('[').split(']').next().unwrap();
        sh(&[
            "ip",
            "-n",
            &self.isp,
            "addr",
            "add",
            &format!("{echo6}/128"),
            "dev",
            "lo",
        ]);
        let isp = [
            "ip",
            "-n",
            &self.isp,
            "addr",
            "add",
            "2001:db8:77::1/64",
            "dev",
            "up0",
            "nodad",
        ];
        sh(&isp);
        let mut egress6 = vec![EGRESS_IP6];
        if self.settings.dual_stack {
            egress6.push(OTHER_IP6);
        }
        for ip in egress6 {
            let ip = format!("{ip}/64");
            sh(&[
                "ip", "-n", &self.exit, "addr", "add", &ip, "dev", "isp0", "nodad",
            ]);
        }
    }

    /// Links in namespace `ns`, by name, but for the plugin's warm spare links (`wgs…`),
    /// which belong to no container (`spares.rs` checks them).
    pub fn links(&self, ns: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(&sh(&["ip", "-n", ns, "-j", "link", "show"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .filter(|name| !name.starts_with(wgexit_plugin::cni::spares::PREFIX))
            .collect()
    }

    /// Files in the plugin's dataDir, but for the one marker of when ADD last swept for
    /// stale attachments (a single file, not per attachment) and the warm spares' directory
    /// (they belong to no attachment).
    pub fn state_files(&self) -> Vec<String> {
        match std::fs::read_dir(self.data_dir()) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".stale-check" && n != "spares")
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Starts the echo server and returns once it listens: its socket is bound and listening
    /// before the thread reports ready, so the first connection is accepted.
    pub fn start_echo(&self, at: &'static str) {
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.isp)).unwrap();
        let stop = self.echo_stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("enter isp");
            // An address just added may not be bindable yet (the kernel can still be
            // setting IPv6 up on the device): retry that one error, briefly.
            let since = Instant::now();
            let listener = loop {
                match TcpListener::bind(at) {
                    Ok(l) => break l,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AddrNotAvailable
                            && since.elapsed() < Duration::from_secs(3) =>
                    {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return ready_tx.send(Err(e.to_string())).unwrap(),
                }
            };
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(Ok(())).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let body = format!("{}\n", peer.ip());
                        let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("echo server in {}: cannot listen on {at}: {e}", self.isp),
            Err(e) => panic!("echo server in {} not listening within 5 s: {e}", self.isp),
        }
    }
}

/// Removes the plugin's warm spare links of every state directory under `dir` (with
/// `wgexit spares clear`): they live in a host namespace, whose removal they would outlive.
pub fn clear_spares(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for data_dir in entries.flatten().map(|e| e.path()) {
        if data_dir.join("spares").is_dir() {
            let data_dir = data_dir.display().to_string();
            wait_for_refills(&data_dir);
            let out = try_sh(&[bin("wgexit"), "spares", "clear", "--data-dir", &data_dir]);
            if !out.status.success() {
                eprintln!(
                    "spares clear {data_dir}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Waits, bounded, until no `wgexit spares refill` of `data_dir` runs: one an ADD started
/// just before could otherwise start a spare after the clear.
pub fn wait_for_refills(data_dir: &str) {
    let refilling = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                args.contains(&b"refill".as_slice()) && args.contains(&data_dir.as_bytes())
            })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while refilling() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_daemon(nix::sys::signal::Signal::SIGKILL);
        clear_spares(self.dir.path());
        self.echo_stop.store(true, Ordering::Relaxed);
        // Deleting a namespace deletes its links; wireguard-go exits when its link goes.
        // The exit's userspace WireGuard processes live in the exit namespace and keep it
        // alive: remove their links first (as `wgexitd teardown` would) so they exit.
        let listed = try_sh(&["ip", "-n", &self.exit, "-j", "link", "show"]);
        let links: Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
        let names = links.as_array().cloned().unwrap_or_default();
        for wg in names.iter().filter_map(|l| l["ifname"].as_str()) {
            if wg.starts_with(&self.id) {
                let _ = try_sh(&["ip", "-n", &self.exit, "link", "del", wg]);
            }
        }
        let container_ns = self.containers.iter().map(|c| &c.netns);
        for ns in container_ns.chain([&self.host, &self.exit, &self.isp]) {
            let _ = try_sh(&["ip", "netns", "del", ns]);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !self.wireguard_sockets().is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
        for s in self.wireguard_sockets() {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{s}"));
        }
    }
}

impl World {
    /// UAPI sockets this world's exit node made.
    pub fn wireguard_sockets(&self) -> Vec<String> {
        std::fs::read_dir("/var/run/wireguard")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| {
                        n.starts_with(&self.id)
                            || self
                                .containers
                                .iter()
                                .any(|c| n.starts_with(&c.host_ifname("eth0")))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub netns: String,
    pub netns_path: PathBuf,
    /// The world's directory, whose subdirectories are the plugin's state directories.
    pub world_dir: PathBuf,
}

impl Container {
    /// The name of this container's link while it is in the host namespace (and, for the
    /// userspace backend, of its UAPI socket): as a state directory of the world records it
    /// (a warm spare's name when ADD took one), else the name the plugin derives.
    pub fn host_ifname(&self, ifname: &str) -> String {
        let recorded = std::fs::read_dir(&self.world_dir).ok().and_then(|entries| {
            entries.flatten().find_map(|e| {
                wgexit_plugin::cni::state::StateDir::peek(&e.path(), &self.id, ifname)
            })
        });
        match recorded {
            Some(state) => state.host_ifname,
            None => wgexit_plugin::cni::state::host_ifname(&self.id, ifname, &self.netns_path),
        }
    }
}

#[derive(Debug)]
pub struct CniOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts success and returns the result JSON.
    pub fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        self.json()
    }

    /// Asserts failure with a CNI error and returns (code, msg).
    pub fn err(&self) -> (u64, String) {
        assert_ne!(self.code, 0, "plugin should have failed: {self:?}");
        let v = self.json();
        let code = v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code: {self:?}"));
        let msg = format!(
            "{} {}",
            v["msg"].as_str().unwrap_or(""),
            v["details"].as_str().unwrap_or("")
        );
        (code, msg)
    }
}

pub fn ipv4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub fn socket(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

impl CniOutput {
    /// Asserts success with no output (DEL).
    pub fn ok_empty(&self) {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        assert!(self.stdout.trim().is_empty(), "unexpected output: {self:?}");
    }
}
