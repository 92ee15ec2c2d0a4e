//! podman 5's network stack: the real netavark 2.1 runs `wgexit` as a netavark plugin, driven
//! as podman drives it (`netavark --config DIR --rootless=false --plugin-directory DIR create`
//! and `setup|teardown NETNS`, podman's JSON on stdin), from the host namespace of the test
//! world. netavark is built from crates.io into a cache by `scripts/deps`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::networks::{address_of, dig, Nets, ACME_DNS};
use crate::world::{Container, World, API, EGRESS_IP, TOKEN};

/// Where `scripts/deps` installs netavark (`cargo install --root`).
const NETAVARK_ROOT: &str = "/var/cache/wgexit-tests/netavark";
const NETAVARK_VERSION: &str = "2.1.0";
/// A network ID as podman makes them: 64 hex digits.
const NETWORK_ID: &str = "2f259bab93aaaaa2542ba43ef33eb990d0999ee1b9924b557b7be53c0b7a1bb9";

/// The netavark binary: `$WGEXIT_NETAVARK`, else the one `scripts/deps` installs. Missing, the
/// test fails: a podman 5 path nobody ran is not a passing test.
fn netavark_bin() -> PathBuf {
    let path = std::env::var_os("WGEXIT_NETAVARK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(NETAVARK_ROOT).join("bin/netavark"));
    assert!(
        path.exists(),
        "netavark {NETAVARK_VERSION} is missing at {}: run scripts/deps, which installs it \
         (cargo install netavark --version {NETAVARK_VERSION} --locked --root {NETAVARK_ROOT})",
        path.display()
    );
    let version = Command::new(&path).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(
        version.contains(NETAVARK_VERSION),
        "{} is {version:?}, not netavark {NETAVARK_VERSION}: run scripts/deps",
        path.display()
    );
    path
}

/// podman 5's side: a plugin directory holding a link named `wgexit` to the plugin, and
/// netavark's run directory (`--config`).
struct Podman5<'a> {
    w: &'a World,
    netavark: PathBuf,
    plugins: PathBuf,
    run_dir: PathBuf,
}

/// What netavark printed and how it exited.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "netavark failed: {self:?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// Asserts success with nothing printed (teardown).
    fn ok_empty(&self) {
        assert_eq!(self.code, 0, "netavark failed: {self:?}");
        assert!(self.stdout.trim().is_empty(), "unexpected output: {self:?}");
    }

    /// The error netavark reports (its `{"error": …}` on stdout).
    fn error(&self) -> String {
        assert_ne!(self.code, 0, "netavark should have failed: {self:?}");
        let v: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("no error JSON ({e}): {self:?}"));
        v["error"].as_str().unwrap_or_default().to_string()
    }
}

impl<'a> Podman5<'a> {
    fn new(w: &'a World) -> Podman5<'a> {
        let netavark = netavark_bin();
        let plugins = w.path("netavark-plugins");
        let run_dir = w.path("netavark-run");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(&run_dir).unwrap();
        std::os::unix::fs::symlink(crate::world::bin("wgexit"), plugins.join("wgexit")).unwrap();
        Podman5 {
            w,
            netavark,
            plugins,
            run_dir,
        }
    }

    /// `netavark ARGS` in the host namespace with `stdin`, as podman runs it.
    fn netavark(&self, args: &[&str], stdin: &Value) -> Ran {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.w.host])
            .arg(&self.netavark)
            .arg("--config")
            .arg(&self.run_dir)
            .arg("--rootless=false")
            .arg("--plugin-directory")
            .arg(&self.plugins)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run netavark");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.to_string().as_bytes()).unwrap();
        drop(input);
        let out: Output = child.wait_with_output().unwrap();
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `podman network create -d wgexit -o K=V … NAME`: netavark's `create`, which runs the
    /// plugin's.
    fn create(&self, name: &str, options: &[(&str, String)]) -> Ran {
        let options: serde_json::Map<String, Value> = options
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let request = json!({
            "network": {
                "name": name, "id": NETWORK_ID, "driver": "wgexit",
                "ipv6_enabled": false, "internal": false, "dns_enabled": true,
                "options": options,
            },
            "used": {"interfaces": [], "names": {}, "subnets": []},
            "options": {"subnet_pools": [], "check_used_subnets": false},
        });
        self.netavark(&["create"], &request)
    }

    /// The options of a network leaving through egress acme with `token_file`.
    fn options(&self, token_file: &str) -> Vec<(&'static str, String)> {
        vec![
            ("servers", format!("https://{API}")),
            ("egress", "acme".into()),
            ("token_file", self.w.path(token_file).display().to_string()),
            ("ca_file", self.w.ca_file().display().to_string()),
            ("backend", self.w.backend.clone()),
            ("data_dir", self.w.data_dir().display().to_string()),
        ]
    }

    /// podman's JSON for `setup` and `teardown` of container `c` on `network` (as create
    /// returned it), with the container's per-network `options`.
    fn container_json(c: &Container, network: &Value, options: Value) -> Value {
        let name = network["name"].as_str().unwrap();
        json!({
            "container_id": c.id,
            "container_name": c.netns,
            "networks": {name: {"interface_name": "eth0", "aliases": [c.netns], "options": options}},
            "network_info": {name: network},
        })
    }

    fn setup(&self, c: &Container, network: &Value, options: Value) -> Ran {
        let path = c.netns_path.display().to_string();
        let stdin = Podman5::container_json(c, network, options);
        self.netavark(&["setup", &path], &stdin)
    }

    fn teardown(&self, c: &Container, network: &Value) -> Ran {
        let path = c.netns_path.display().to_string();
        let stdin = Podman5::container_json(c, network, json!({}));
        self.netavark(&["teardown", &path], &stdin)
    }
}

/// The addresses of interface `eth0` in a status block of network `name`.
fn status_addresses(status: &Value, name: &str) -> Vec<String> {
    status[name]["interfaces"]["eth0"]["subnets"]
        .as_array()
        .unwrap_or_else(|| panic!("no eth0 subnets in {status}"))
        .iter()
        .map(|s| s["ipnet"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_container_set_up_by_netavark_leaves_from_the_egress_ip_and_teardown_releases_it() {
    let mut w = World::new();
    let c = w.container("pod");
    let podman = Podman5::new(&w);
    let network = podman.create("egress", &podman.options("acme.token")).ok();
    assert_eq!(network["driver"], "wgexit");
    assert_eq!(network["ipam_options"], json!({"driver": "none"}));
    assert_eq!(network["dns_enabled"], false);

    let status = podman.setup(&c, &network, json!({})).ok();
    let addresses = status_addresses(&status, "egress");
    assert_eq!(addresses.len(), 1, "{status}");
    assert!(addresses[0].starts_with("100.96.0."), "{status}");
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    let leases = w.leases("acme", TOKEN);
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0]["attachment"]["container_id"], c.id, "{leases:?}");
    assert_eq!(
        leases[0]["address"].as_str().map(|a| a.split('/').next()),
        Some(addresses[0].split('/').next()),
        "{leases:?}"
    );
    assert_eq!(w.links(&c.netns), vec!["lo", "eth0"]);

    podman.teardown(&c, &network).ok_empty();
    assert_eq!(w.links(&c.netns), vec!["lo"]);
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    // Idempotent, as DEL is: a second teardown finds nothing and succeeds.
    podman.teardown(&c, &network).ok_empty();
}

#[test]
fn a_container_on_a_private_network_resolves_internal_names() {
    let mut n = Nets::new();
    let host = n.w.host.clone();
    let web = n.container("web", "0a1b2c3d4e5f6789web");
    let web_conf = n.conf("acme", None, "cni-data");
    let web_ip = address_of(&n.add(&host, &web, &web_conf, "web", "ams"), true);

    let worker = n.container("worker", "5566778899aabbccpod");
    let podman = Podman5::new(&n.w);
    let mut options = podman.options("acme.token");
    options.push(("network", "acme".into()));
    options.push(("region", "ams".into()));
    let network = podman.create("acme", &options).ok();
    let status = podman
        .setup(&worker, &network, json!({"app": "worker"}))
        .ok();
    assert_eq!(
        status["acme"]["dns_server_ips"],
        json!([ACME_DNS]),
        "{status}"
    );
    assert_eq!(status_addresses(&status, "acme").len(), 2, "{status}");
    assert_eq!(n.w.echo_from(&worker).unwrap(), EGRESS_IP);
    assert_eq!(
        dig(&worker.netns, ACME_DNS, "web.internal", "AAAA").1,
        vec![web_ip]
    );
    let worker_ip = status_addresses(&status, "acme")
        .into_iter()
        .find(|a| a.contains(':'))
        .unwrap();
    assert_eq!(
        dig(&web.netns, ACME_DNS, "worker.internal", "AAAA").1,
        vec![worker_ip.trim_end_matches("/128").to_string()]
    );
    podman.teardown(&worker, &network).ok_empty();
    assert_eq!(n.w.links(&worker.netns), vec!["lo"]);
    assert!(n.w.leases("acme", TOKEN).is_empty());
}

#[test]
fn create_names_a_missing_or_bad_option_and_info_reports_the_api() {
    let w = World::new();
    let podman = Podman5::new(&w);
    let without = |option: &str| -> Vec<(&str, String)> {
        let mut o = podman.options("acme.token");
        o.retain(|(k, _)| *k != option);
        o
    };
    let with = |option: &'static str, value: &str| -> Vec<(&str, String)> {
        let mut o = podman.options("acme.token");
        o.retain(|(k, _)| *k != option);
        o.push((option, value.to_string()));
        o
    };
    let cases = [
        (without("servers"), "servers"),
        (without("token_file"), "token_file"),
        (without("ca_file"), "ca_file"),
        (without("egress"), "egress"),
        (with("mtu", "jumbo"), "mtu"),
        (with("routes", "sideways"), "routes"),
        (with("servers", &format!("http://{API}")), "servers"),
        (with("token_file", "/nonexistent/acme.token"), "token_file"),
        (with("colour", "blue"), "colour"),
    ];
    for (options, option) in cases {
        let error = podman.create("egress", &options).error();
        assert!(
            error.starts_with("exit code 1, message: ")
                && error.contains(&format!("option \"{option}\"")),
            "{option}: {error}"
        );
    }
    let info = Command::new(podman.plugins.join("wgexit"))
        .arg("info")
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["api_version"], "1.0.0");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn a_setup_that_fails_leaves_nothing_and_netavark_shows_why() {
    let mut w = World::new();
    let c = w.container("pod");
    std::fs::write(w.path("wrong.token"), "not-a-token-of-acme-0123456789\n").unwrap();
    let podman = Podman5::new(&w);
    let network = podman.create("egress", &podman.options("wrong.token")).ok();
    let ran = podman.setup(&c, &network, json!({}));
    let error = ran.error();
    // The plugin undid what it had done, and said nothing about failing to.
    assert!(!ran.stderr.contains("undoing the failed ADD"), "{ran:?}");
    assert!(
        error.starts_with("plugin \"wgexit\" failed: exit code 1, message: ")
            && error.contains("check option \"token_file\""),
        "{error}"
    );
    assert_eq!(w.links(&c.netns), vec!["lo"]);
    assert_eq!(w.links(&w.host), vec!["lo", "up0"]);
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(!std::path::Path::new(&format!(
        "/var/run/wireguard/{}.sock",
        c.host_ifname("eth0")
    ))
    .exists());
}
