//! Private networks (like Fly's 6PN): an organisation's containers on two hosts reach each
//! other by `.internal` name through the gateway, another organisation cannot reach them or
//! their resolver, and a laptop joins with the real `wg-quick`.
//!
//! ```text
//!  host ns (198.51.100.10) ──┐                    ┌── isp ns: echo 198.18.0.10, dnsmasq 198.18.0.53
//!  host2 ns (198.18.1.2) ────┼── exit ns (wgexitd) ┘
//!  laptop ns (198.18.2.2) ───┘   networks acme fdaa:0:1::/48 (upstream: dnsmasq), beta fdaa:0:2::/48 (none)
//! ```

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::world::{sh, try_sh, Container, Settings, World, API, EGRESS_IP, TOKEN};

const ACME_PREFIX: &str = "fdaa:0:1::/48";
pub(crate) const ACME_DNS: &str = "fdaa:0:1::3";
const BETA_PREFIX: &str = "fdaa:0:2::/48";
const BETA_DNS: &str = "fdaa:0:2::3";
const ACME_NET_TOKEN: &str = "acme-net-token-0123456789abcdef";
const BETA_NET_TOKEN: &str = "beta-net-token-0123456789abcdef";
const UPSTREAM: &str = "198.18.0.53";
const WEB_ID: &str = "0a1b2c3d4e5f6789web";
const API_ID: &str = "fedcba9876543210api";

/// The test world plus a second container host, a laptop's uplink, the networks acme and
/// beta, and dnsmasq as acme's upstream resolver.
pub(crate) struct Nets {
    pub(crate) w: World,
    host2: String,
    laptop: String,
    dnsmasq: Option<Child>,
    etc_netns: Vec<PathBuf>,
    servers: Vec<Arc<AtomicBool>>,
}

fn network_tables(w: &World) -> String {
    let dir = w.path("");
    format!(
        r#"
[[network]]
name = "acme"
prefix = "{ACME_PREFIX}"
wg_interface = "{id}na"
listen_port = 51830
endpoint = "198.51.100.2:51830"
token_file = "{dir}/acme-net.tokens"
dns_upstream = ["{UPSTREAM}:53"]

[[network]]
name = "beta"
prefix = "{BETA_PREFIX}"
wg_interface = "{id}nb"
listen_port = 51831
endpoint = "198.51.100.2:51831"
token_file = "{dir}/beta-net.tokens"
"#,
        id = w.id,
        dir = dir.display().to_string().trim_end_matches('/'),
    )
}

/// A veth from the exit node to a new namespace `ns`: exit `exit_if` = `exit_ip`/24, `ns`'s
/// `eth0`-like end `up0` = `ns_ip`/24 with a default route back through the exit node.
fn uplink(w: &World, ns: &str, exit_if: &str, exit_ip: &str, ns_ip: &str) {
    sh(&["ip", "netns", "add", ns]);
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    sh(&[
        "ip", "link", "add", exit_if, "netns", &w.exit, "type", "veth", "peer", "name", "up0",
        "netns", ns,
    ]);
    sh(&[
        "ip",
        "-n",
        &w.exit,
        "addr",
        "add",
        &format!("{exit_ip}/24"),
        "dev",
        exit_if,
    ]);
    sh(&["ip", "-n", &w.exit, "link", "set", exit_if, "up"]);
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ns_ip}/24"),
        "dev",
        "up0",
    ]);
    sh(&["ip", "-n", ns, "link", "set", "up0", "up"]);
    sh(&["ip", "-n", ns, "route", "add", "default", "via", exit_ip]);
}

impl Nets {
    pub(crate) fn new() -> Nets {
        Nets::with("")
    }

    /// As [`Nets::new`], with `extra` top-level lines in the daemon's config.
    fn with(extra: &str) -> Nets {
        // The networks' tables name token files in the world's own directory, which exists
        // only once the world does: make it, add the tokens and tables, restart the daemon.
        let settings = Settings {
            daemon_extra: format!("peer_timeout = 4\nfirst_handshake_timeout = 2\npersistent_keepalive = 1\ncollect_interval = 1\n{extra}"),
            ..Default::default()
        };
        let mut w = World::with(settings);
        std::fs::write(
            w.path("acme-net.tokens"),
            format!("{ACME_NET_TOKEN}\n{TOKEN}\n"),
        )
        .unwrap();
        std::fs::write(w.path("beta-net.tokens"), format!("{BETA_NET_TOKEN}\n")).unwrap();
        std::fs::write(w.path("acme-net.token"), format!("{ACME_NET_TOKEN}\n")).unwrap();
        std::fs::write(w.path("beta-net.token"), format!("{BETA_NET_TOKEN}\n")).unwrap();
        let tables = network_tables(&w);
        let config = std::fs::read_to_string(w.daemon_config()).unwrap();
        std::fs::write(w.daemon_config(), format!("{config}{tables}")).unwrap();
        w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
        let mut n = Nets {
            host2: format!("{}-host2", w.id),
            laptop: format!("{}-lap", w.id),
            w,
            dnsmasq: None,
            etc_netns: Vec::new(),
            servers: Vec::new(),
        };
        uplink(&n.w, &n.host2, "down1", "198.18.1.1", "198.18.1.2");
        uplink(&n.w, &n.laptop, "lap0", "198.18.2.1", "198.18.2.2");
        n.start_dnsmasq();
        n.w.start_daemon();
        n
    }

    fn start_dnsmasq(&mut self) {
        let isp = self.w.isp.clone();
        sh(&[
            "ip",
            "-n",
            &isp,
            "addr",
            "add",
            &format!("{UPSTREAM}/32"),
            "dev",
            "lo",
        ]);
        let pid = self.w.path("dnsmasq.pid");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &isp,
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
            ])
            .args([
                "--no-hosts",
                "--conf-file=/dev/null",
                "--bind-interfaces",
                "--user=root",
            ])
            .arg(format!("--listen-address={UPSTREAM}"))
            .arg("--host-record=example.test,198.18.0.99")
            .arg(format!("--pid-file={}", pid.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian dnsmasq-base; scripts/deps installs it)");
        self.dnsmasq = Some(child);
        // Wait for it to answer.
        let start = Instant::now();
        loop {
            let (status, answers) = dig(&isp, UPSTREAM, "example.test", "A");
            if status == "NOERROR" && answers == ["198.18.0.99"] {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "dnsmasq did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The plugin config joining `network` (routes none), or also leaving through `egress`.
    pub(crate) fn conf(&self, network: &str, egress: Option<&str>, data_dir: &str) -> Value {
        let mut c = json!({
            "cniVersion": "1.0.0", "name": "private", "type": "wgexit",
            "servers": [format!("https://{API}")],
            "network": network,
            "tokenFile": self.w.path(&format!("{network}-net.token")),
            "caFile": self.w.ca_file(),
            "backend": self.w.backend, "mtu": 1420, "routes": "none",
            "dataDir": self.w.path(data_dir),
        });
        if let Some(e) = egress {
            c["egress"] = json!(e);
            c["routes"] = json!("default");
            c["tokenFile"] = json!(self.w.path("acme.token"));
        }
        c
    }

    pub(crate) fn container(&mut self, name: &str, id: &str) -> Container {
        let mut c = self.w.container(name);
        c.id = id.to_string();
        c
    }

    /// ADD from `host` with APP and REGION in CNI_ARGS; the result.
    pub(crate) fn add(
        &self,
        host: &str,
        c: &Container,
        conf: &Value,
        app: &str,
        region: &str,
    ) -> Value {
        let args = format!("APP={app};REGION={region}");
        self.w
            .cni_on(
                host,
                "ADD",
                &c.id,
                Some(&c.netns_path),
                "eth0",
                conf.to_string().as_bytes(),
                &[("CNI_ARGS", &args)],
            )
            .ok()
    }

    fn del(&self, host: &str, c: &Container, conf: &Value) {
        self.w
            .cni_on(
                host,
                "DEL",
                &c.id,
                Some(&c.netns_path),
                "eth0",
                conf.to_string().as_bytes(),
                &[],
            )
            .ok_empty();
    }

    /// Gives namespace `ns` its own /etc/resolv.conf (`ip netns exec` mounts it).
    fn resolv_conf(&mut self, ns: &str, nameserver: &str) {
        let dir = PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\n"),
        )
        .unwrap();
        self.etc_netns.push(dir);
    }

    /// An HTTP server answering `body` on port 8080 of every address in `ns`.
    fn serve_http(&mut self, ns: &str, body: &'static str) {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        self.servers.push(stop.clone());
        let (ready, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = TcpListener::bind("[::]:8080").unwrap();
            listener.set_nonblocking(true).unwrap();
            ready.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        wait.recv_timeout(Duration::from_secs(5))
            .expect("http server");
    }

    /// The nftables counter of the networks' rule commented `comment`.
    fn net_counter(&self, comment: &str) -> u64 {
        let listing = sh(&[
            "ip",
            "netns",
            "exec",
            &self.w.exit,
            "nft",
            "list",
            "table",
            "inet",
            "wgexitd",
        ]);
        let line = listing
            .lines()
            .find(|l| l.contains(&format!("comment \"{comment}\"")))
            .unwrap_or_else(|| panic!("no rule {comment:?} in {listing}"));
        let rest = &line[line.find("packets ").expect("a counter") + "packets ".len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// `wgexit peer ARGS…` on the laptop, against network acme with its token.
    fn peer_cmd(&self, args: &[&str]) -> std::process::Output {
        self.peer_cmd_in("acme", args)
    }

    /// `wgexit peer ARGS…` on the laptop, against `network` with its token.
    fn peer_cmd_in(&self, network: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.laptop,
                crate::world::bin("wgexit"),
                "peer",
            ])
            .args(args)
            .args(["--server", &format!("https://{API}"), "--network", network])
            .arg("--ca-file")
            .arg(self.w.ca_file())
            .arg("--token-file")
            .arg(self.w.path(&format!("{network}-net.token")))
            .output()
            .unwrap()
    }

    /// The gateway's public key for `network`.
    fn gateway_key(&self, network: &str, token: &str) -> String {
        let (code, body) = self
            .w
            .api_raw("GET", &format!("/v1/network/{network}"), Some(token));
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["server_public_key"].as_str().unwrap().to_string()
    }

    /// Makes WireGuard device `device` (UAPI name, link name) send `extra` through its
    /// gateway peer too, as a member trying to reach beyond its network would.
    fn widen(
        &self,
        ns: &str,
        (device, link): (&str, &str),
        gateway_key: &str,
        own: &str,
        extra: &str,
    ) {
        let allowed = format!("{own},{extra}");
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            device,
            "peer",
            gateway_key,
            "allowed-ips",
            &allowed,
        ]);
        sh(&["ip", "-n", ns, "-6", "route", "replace", extra, "dev", link]);
    }
}

impl Drop for Nets {
    fn drop(&mut self) {
        for s in &self.servers {
            s.store(true, Ordering::Relaxed);
        }
        if let Some(mut d) = self.dnsmasq.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        for dir in &self.etc_netns {
            let _ = std::fs::remove_dir_all(dir);
        }
        // The laptop's wireguard-go goes with its link.
        let _ = try_sh(&[
            "ip",
            "-n",
            &self.laptop,
            "link",
            "del",
            &format!("{}lap", self.w.id),
        ]);
        for ns in [&self.host2, &self.laptop] {
            let _ = try_sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// `dig TYPE NAME @SERVER` from `ns`: (status, the answers' data; TXT strings joined).
pub(crate) fn dig(ns: &str, server: &str, name: &str, rtype: &str) -> (String, Vec<String>) {
    let out = try_sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "dig",
        "+time=2",
        "+tries=1",
        "+noall",
        "+comments",
        "+answer",
        &format!("@{server}"),
        rtype,
        name,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO ANSWER")
        .to_string();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == rtype)?;
            let data = fields[at + 1..].join(" ");
            Some(if rtype == "TXT" {
                data.split('"')
                    .filter(|p| !p.trim().is_empty())
                    .collect::<String>()
            } else {
                data
            })
        })
        .collect();
    (status, answers)
}

pub(crate) fn address_of(result: &Value, v6: bool) -> String {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .find(|a| a.contains(':') == v6)
        .unwrap_or_else(|| panic!("no address in {result}"))
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

fn curl(ns: &str, url: &str) -> Result<String, String> {
    let out = try_sh(&[
        "ip", "netns", "exec", ns, "curl", "-s", "-g", "-m", "3", url,
    ]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("curl exit {:?}", out.status.code()))
    }
}

/// Org acme's `web` (ams, host 1) and `api` (ord, host 2), with their addresses.
struct Acme {
    web: Container,
    api: Container,
    web_ip: String,
    api_ip: String,
}

fn acme_on_two_hosts(n: &mut Nets) -> Acme {
    let (host1, host2) = (n.w.host.clone(), n.host2.clone());
    let web = n.container("web", WEB_ID);
    let api = n.container("api", API_ID);
    let rweb = n.add(
        &host1,
        &web,
        &n.conf("acme", None, "cni-data"),
        "web",
        "ams",
    );
    let rapi = n.add(
        &host2,
        &api,
        &n.conf("acme", None, "cni-data2"),
        "api",
        "ord",
    );
    // The results: the member's /128, the prefix as the only route, the resolver.
    assert_eq!(rweb["ips"].as_array().unwrap().len(), 1, "{rweb}");
    assert_eq!(rweb["routes"], json!([{"dst": ACME_PREFIX}]));
    assert_eq!(rweb["dns"]["nameservers"], json!([ACME_DNS]));
    let (web_ip, api_ip) = (address_of(&rweb, true), address_of(&rapi, true));
    assert!(web_ip.starts_with("fdaa:0:1:"), "{web_ip}");
    n.serve_http(&web.netns, "web says hi\n");
    Acme {
        web,
        api,
        web_ip,
        api_ip,
    }
}

/// Every name of DESIGN.md, asked by `api`.
fn every_name_answers(a: &Acme) {
    let txt = |name: &str| dig(&a.api.netns, ACME_DNS, name, "TXT").1;
    let aaaa = |name: &str| dig(&a.api.netns, ACME_DNS, name, "AAAA");
    let web = vec![a.web_ip.clone()];
    assert_eq!(txt("regions.web.internal"), vec!["ams"]);
    assert_eq!(txt("_apps.internal"), vec!["api,web"]);
    assert_eq!(
        txt("vms.web.internal"),
        vec![format!("{} ams", &WEB_ID[..12])]
    );
    assert_eq!(aaaa(&format!("{}.vm.web.internal", &WEB_ID[..12])).1, web);
    assert_eq!(aaaa("ams.web.internal").1, web);
    assert_eq!(aaaa("global.web.internal").1, web);
    assert_eq!(aaaa("top1.nearest.of.web.internal").1, web);
    let (web_ip, api_ip) = (&a.web_ip, &a.api_ip);
    let mut instances = [
        (
            web_ip.parse::<std::net::Ipv6Addr>().unwrap(),
            format!("instance={},app=web,ip={web_ip},region=ams", &WEB_ID[..12]),
        ),
        (
            api_ip.parse().unwrap(),
            format!("instance={},app=api,ip={api_ip},region=ord", &API_ID[..12]),
        ),
    ];
    instances.sort();
    let instances: Vec<String> = instances.into_iter().map(|(_, i)| i).collect();
    assert_eq!(txt("_instances.internal"), vec![instances.join(";")]);
    assert_eq!(aaaa("ord.web.internal").0, "NXDOMAIN");
    assert_eq!(aaaa("nothing.internal").0, "NXDOMAIN");
}

/// Beta's member `db` cannot reach acme's members or resolver, even sending into acme's
/// prefix through its tunnel on purpose, and acme's `api` cannot reach `db`: the gateway
/// refuses and counts it. Acme's own traffic still flows.
fn orgs_are_isolated(n: &Nets, a: &Acme, db: &Container, db_ip: &str) {
    let beta_key = n.gateway_key("beta", BETA_NET_TOKEN);
    let acme_key = n.gateway_key("acme", ACME_NET_TOKEN);
    let db_dev = db.host_ifname("eth0");
    n.widen(
        &db.netns,
        (&db_dev, "eth0"),
        &beta_key,
        BETA_PREFIX,
        ACME_PREFIX,
    );
    let api_dev = a.api.host_ifname("eth0");
    n.widen(
        &a.api.netns,
        (&api_dev, "eth0"),
        &acme_key,
        ACME_PREFIX,
        BETA_PREFIX,
    );
    let leaves_beta = n.net_counter("beta: leaves the network");
    let to_gateway = n.net_counter("beta: to the gateway");
    assert!(curl(&db.netns, &format!("http://[{}]:8080/", a.web_ip)).is_err());
    assert_eq!(
        dig(&db.netns, ACME_DNS, "web.internal", "AAAA").0,
        "NO ANSWER"
    );
    assert!(n.net_counter("beta: leaves the network") > leaves_beta);
    assert!(n.net_counter("beta: to the gateway") > to_gateway);
    let leaves_acme = n.net_counter("acme: leaves the network");
    assert!(curl(&a.api.netns, &format!("http://[{db_ip}]:8080/")).is_err());
    assert!(n.net_counter("acme: leaves the network") > leaves_acme);
    assert_eq!(
        curl(&a.api.netns, &format!("http://[{}]:8080/", a.web_ip)),
        Ok("web says hi".into())
    );
}

#[test]
fn an_org_reaches_itself_by_name_across_hosts_and_no_other_org() {
    let mut n = Nets::new();
    let a = acme_on_two_hosts(&mut n);

    // By name, from the other host: dig, then HTTP to the address it gave.
    let (status, answers) = dig(&a.api.netns, ACME_DNS, "web.internal", "AAAA");
    assert_eq!(
        (status.as_str(), answers.clone()),
        ("NOERROR", vec![a.web_ip.clone()])
    );
    let url = format!("http://[{}]:8080/", answers[0]);
    assert_eq!(curl(&a.api.netns, &url), Ok("web says hi".into()));
    every_name_answers(&a);

    // The C library's resolver, with the network's resolver in the container's resolv.conf.
    n.resolv_conf(&a.api.netns, ACME_DNS);
    let getent = sh(&[
        "ip",
        "netns",
        "exec",
        &a.api.netns,
        "getent",
        "ahosts",
        "web.internal",
    ]);
    assert!(getent.starts_with(&format!("{} ", a.web_ip)), "{getent}");

    // Other names: forwarded to acme's upstream; beta has none, so refused.
    let upstream = dig(&a.api.netns, ACME_DNS, "example.test", "A");
    assert_eq!(upstream, ("NOERROR".into(), vec!["198.18.0.99".into()]));
    let (host1, host2) = (n.w.host.clone(), n.host2.clone());
    let beta_conf = n.conf("beta", None, "cni-data");
    let db = n.container("db", "99887766554433db");
    let db_ip = address_of(&n.add(&host1, &db, &beta_conf, "db", "ams"), true);
    assert!(db_ip.starts_with("fdaa:0:2:"), "{db_ip}");
    assert_eq!(dig(&db.netns, BETA_DNS, "example.test", "A").0, "REFUSED");
    assert_eq!(
        dig(&db.netns, BETA_DNS, "web.internal", "AAAA").0,
        "NXDOMAIN"
    );
    n.serve_http(&db.netns, "db\n");
    orgs_are_isolated(&n, &a, &db, &db_ip);

    // DEL of web: its name is gone within the TTL.
    n.del(&host1, &a.web, &n.conf("acme", None, "cni-data"));
    let deleted = Instant::now();
    while dig(&a.api.netns, ACME_DNS, "web.internal", "AAAA").0 != "NXDOMAIN" {
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "web.internal still answers"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        dig(&a.api.netns, ACME_DNS, "_apps.internal", "TXT").1,
        vec!["api"]
    );
    n.del(&host2, &a.api, &n.conf("acme", None, "cni-data2"));
    n.del(&host1, &db, &beta_conf);
    let (_, members) =
        n.w.api_raw("GET", "/v1/network/acme/members", Some(ACME_NET_TOKEN));
    let members: Value = serde_json::from_str(&members).unwrap();
    assert_eq!(members["members"], json!([]));
}

#[test]
fn egress_and_network_through_one_interface() {
    let mut n = Nets::new();
    let host = n.w.host.clone();
    let web = n.container("web", WEB_ID);
    let web_conf = n.conf("acme", None, "cni-data");
    let rweb = n.add(&host, &web, &web_conf, "web", "ams");
    let web_ip = address_of(&rweb, true);

    let both = n.conf("acme", Some("acme"), "cni-data");
    let worker = n.container("worker", "5566778899aabbccwk");
    let r = n.add(&host, &worker, &both, "worker", "ams");
    // One interface with both addresses, both routes, the resolver.
    assert_eq!(r["interfaces"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["ips"].as_array().unwrap().len(), 2, "{r}");
    assert!(address_of(&r, false).starts_with("100.96.0."), "{r}");
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0"}, {"dst": ACME_PREFIX}])
    );
    assert_eq!(n.w.links(&worker.netns), vec!["lo", "eth0"]);
    // The internet from the egress IP, web by name, through that one interface.
    assert_eq!(n.w.echo_from(&worker).unwrap(), EGRESS_IP);
    assert_eq!(
        dig(&worker.netns, ACME_DNS, "web.internal", "AAAA").1,
        vec![web_ip]
    );
    // CHECK sees both peers; DEL releases both leases.
    let mut check = both.clone();
    check["prevResult"] = r.clone();
    n.w.cni_on(
        &host,
        "CHECK",
        &worker.id,
        Some(&worker.netns_path),
        "eth0",
        check.to_string().as_bytes(),
        &[],
    )
    .ok_empty();
    n.del(&host, &worker, &both);
    assert!(n.w.leases("acme", TOKEN).is_empty());
    let (_, members) =
        n.w.api_raw("GET", "/v1/network/acme/members", Some(ACME_NET_TOKEN));
    let members: Value = serde_json::from_str(&members).unwrap();
    assert_eq!(members["members"].as_array().unwrap().len(), 1, "{members}");
}

/// `wgexit peer create` on the laptop writes a 0600 wg-quick config, and a second create
/// refuses to overwrite it. Returns the config.
fn peer_create_writes_a_config(n: &Nets, conf_path: &PathBuf) -> String {
    use std::os::unix::fs::PermissionsExt;
    let out = conf_path.display().to_string();
    let create = || n.peer_cmd(&["create", "--name", "alice", "--out", &out]);
    let first = create();
    assert!(first.status.success(), "{first:?}");
    let mode = std::fs::metadata(conf_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let written = std::fs::read_to_string(conf_path).unwrap();
    assert!(
        written.contains(&format!("DNS = {ACME_DNS}\n"))
            && written.contains(&format!("AllowedIPs = {ACME_PREFIX}\n")),
        "{written}"
    );
    let second = create();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("never overwrites"));
    assert_eq!(std::fs::read_to_string(conf_path).unwrap(), written);
    written
}

/// The real wg-quick brings the config up in the laptop's namespace; its DNS line goes
/// through resolvconf, here a stand-in that writes the laptop's own resolv.conf.
fn wg_quick_up(n: &mut Nets, conf_path: &std::path::Path, dns: &str) {
    use std::os::unix::fs::PermissionsExt;
    n.resolv_conf(&n.laptop.clone(), "198.18.2.1");
    let bin = n.w.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let resolv = format!("/etc/netns/{}/resolv.conf", n.laptop);
    let shim = format!("#!/bin/sh\n[ \"$1\" = -a ] && cat > {resolv}\nexit 0\n");
    std::fs::write(bin.join("resolvconf"), shim).unwrap();
    let exec = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(bin.join("resolvconf"), exec).unwrap();
    let path = format!(
        "PATH={}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    wg_quick_up_in(&n.laptop, &[path], conf_path);
    let resolv = std::fs::read_to_string(&resolv).unwrap();
    assert_eq!(resolv.trim(), format!("nameserver {dns}"));
}

/// The real `wg-quick up CONF` (with wireguard-go) in namespace `ns`, `env` (`NAME=value`)
/// set for it; panics with its output when it fails.
pub(crate) fn wg_quick_up_in(ns: &str, env: &[String], conf_path: &std::path::Path) {
    let up = Command::new("ip")
        .args(["netns", "exec", ns, "env"])
        .args(env)
        .args([
            "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go",
            "wg-quick",
            "up",
        ])
        .arg(conf_path)
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "wg-quick up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
}

/// Silent longer than peer_timeout + first_handshake_timeout (collected every second): a
/// container whose host went away (its wireguard-go killed: no more keepalives) is
/// collected; the laptop stays.
fn a_silent_container_goes_the_laptop_stays(n: &mut Nets, web: &Container) {
    let host = n.w.host.clone();
    let tmp = n.container("tmp", "1122334455667788tmp");
    n.add(&host, &tmp, &n.conf("acme", None, "cni-data"), "tmp", "ams");
    assert_eq!(
        dig(&web.netns, ACME_DNS, "tmp.internal", "AAAA").0,
        "NOERROR"
    );
    let pid = wgexit::wg::userspace::pid_of(&tmp.host_ifname("eth0")).expect("its wireguard-go");
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let gone = dig(&web.netns, ACME_DNS, "tmp.internal", "AAAA").0;
    assert_eq!(gone, "NXDOMAIN", "{}", n.w.daemon_log());
    let collected = "wgexit_network_members_collected_total{network=\"acme\"} 1";
    let metrics = n.w.metrics();
    assert!(metrics.lines().any(|l| l == collected), "{metrics}");
    assert_eq!(
        dig(&web.netns, ACME_DNS, "_peer.internal", "TXT").1,
        vec!["alice"]
    );
    assert_eq!(
        curl(&n.laptop, "http://web.internal:8080/"),
        Ok("web says hi".into())
    );
    let list = n.peer_cmd(&["list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).starts_with("alice\t"),
        "{list:?}"
    );
}

#[test]
fn a_laptop_joins_with_wg_quick_and_stays() {
    let mut n = Nets::new();
    let host = n.w.host.clone();
    let web = n.container("web", WEB_ID);
    let rweb = n.add(&host, &web, &n.conf("acme", None, "cni-data"), "web", "ams");
    let web_ip = address_of(&rweb, true);
    n.serve_http(&web.netns, "web says hi\n");
    let db = n.container("db", "99887766554433db");
    let rdb = n.add(&host, &db, &n.conf("beta", None, "cni-data"), "db", "ams");
    let db_ip = address_of(&rdb, true);
    n.serve_http(&db.netns, "db\n");

    let iface = format!("{}lap", n.w.id);
    let conf_path = n.w.path(&format!("{iface}.conf"));
    let written = peer_create_writes_a_config(&n, &conf_path);
    wg_quick_up(&mut n, &conf_path, ACME_DNS);

    // Resolves web by name with its configured resolver (wg-quick's first packet starts
    // the handshake), reaches it, and shows up as a peer.
    let start = Instant::now();
    let getent = loop {
        let out = try_sh(&[
            "ip",
            "netns",
            "exec",
            &n.laptop,
            "getent",
            "ahosts",
            "web.internal",
        ]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "laptop cannot resolve web.internal"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(getent.starts_with(&format!("{web_ip} ")), "{getent}");
    assert_eq!(
        curl(&n.laptop, "http://web.internal:8080/"),
        Ok("web says hi".into())
    );
    assert_eq!(
        dig(&web.netns, ACME_DNS, "_peer.internal", "TXT").1,
        vec!["alice"]
    );
    let laptop_ip = dig(&web.netns, ACME_DNS, "alice._peer.internal", "AAAA").1;
    assert!(
        written.contains(&format!("Address = {}/128", laptop_ip[0])),
        "{written}"
    );

    // Not another org, even when it tries through the tunnel.
    let acme_key = n.gateway_key("acme", ACME_NET_TOKEN);
    n.widen(
        &n.laptop.clone(),
        (&iface, &iface),
        &acme_key,
        ACME_PREFIX,
        BETA_PREFIX,
    );
    let before = n.w.metrics();
    let leaves = n.net_counter("acme: leaves the network");
    assert!(curl(&n.laptop, &format!("http://[{db_ip}]:8080/")).is_err());
    assert!(n.net_counter("acme: leaves the network") > leaves);
    status_and_metrics_show_the_network(&n, (&web, &db), &before);

    a_silent_container_goes_the_laptop_stays(&mut n, &web);

    // `peer remove` takes it out: the name goes, the tunnel stops.
    let remove = n.peer_cmd(&["remove", "--name", "alice"]);
    assert!(remove.status.success(), "{remove:?}");
    let gone = dig(&web.netns, ACME_DNS, "alice._peer.internal", "AAAA").0;
    assert_eq!(gone, "NXDOMAIN");
    assert!(curl(&n.laptop, &format!("http://[{web_ip}]:8080/")).is_err());
}

/// `wgexitd status --json` from the running daemon.
fn status_json(n: &Nets) -> Value {
    let out = Command::new(crate::world::bin("wgexitd"))
        .args(["status", "--json", "--config"])
        .arg(n.w.daemon_config())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The growth of the sample `name{labels}` from `before` to `after` (absent: 0).
fn grew(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let at = |body| crate::ops::sample(body, name, labels).unwrap_or(0.0);
    at(after) - at(before)
}

/// With web (a container) and alice (a wg-quick laptop) in acme, after traffic and a
/// packet the firewall refused (`before`: /metrics before it): `wgexitd status --json`
/// shows acme's members, peers, handshakes and bytes; /metrics counts the resolvers'
/// answers, refusals and forwards, and the drop.
fn status_and_metrics_show_the_network(
    n: &Nets,
    (web, db): (&Container, &Container),
    before: &str,
) {
    assert_eq!(
        dig(&web.netns, ACME_DNS, "web.internal", "AAAA").0,
        "NOERROR"
    );
    let forwarded = dig(&web.netns, ACME_DNS, "example.test", "A");
    assert_eq!(forwarded.1, ["198.18.0.99"]);
    // Beta has no upstream: other names are refused.
    assert_eq!(dig(&db.netns, BETA_DNS, "example.test", "A").0, "REFUSED");
    let report = status_json(n);
    let acme = report["network"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "acme")
        .unwrap_or_else(|| panic!("no network acme in {report}"));
    assert_eq!(
        acme["members"],
        json!({"containers": 1, "peers": 1}),
        "{acme}"
    );
    let peers = &acme["peers"];
    assert_eq!(peers["total"], 2, "{acme}");
    assert_eq!(peers["live"], 2, "{acme}");
    let newest = peers["newest_handshake_age_seconds"].as_u64().unwrap();
    assert!(newest < 180, "{acme}");
    assert!(peers["received_bytes"].as_u64().unwrap() > 0, "{acme}");
    assert!(peers["transmitted_bytes"].as_u64().unwrap() > 0, "{acme}");
    assert!(acme["dns"]["answered"].as_u64().unwrap() >= 3, "{acme}");
    assert!(acme["dns"]["forwarded"].as_u64().unwrap() >= 1, "{acme}");
    assert!(acme["firewall_drops"].as_u64().unwrap() >= 1, "{acme}");

    let after = n.w.metrics();
    let checked = crate::ops::promtool_check(&after);
    assert!(checked.status.success(), "promtool: {checked:?}\n{after}");
    let dns = "wgexit_network_dns_queries_total";
    let (acme_net, beta_net) = (("network", "acme"), ("network", "beta"));
    assert!(grew(before, &after, dns, &[acme_net, ("outcome", "answered")]) >= 1.0);
    assert!(grew(before, &after, dns, &[acme_net, ("outcome", "forwarded")]) >= 1.0);
    assert!(grew(before, &after, dns, &[beta_net, ("outcome", "refused")]) >= 1.0);
    let drops = "wgexit_firewall_dropped_packets_total";
    let acme_space = [("kind", "network"), ("name", "acme")];
    assert!(grew(before, &after, drops, &acme_space) >= 1.0, "{after}");
    let received = "wgexit_network_tunnel_received_bytes_total";
    assert!(crate::ops::sample(&after, received, &[acme_net]).unwrap() > 0.0);
    let live = [acme_net, ("handshake_age", "0-30s")];
    assert_eq!(
        crate::ops::sample(&after, "wgexit_network_peers", &live),
        Some(2.0)
    );
    let text = Command::new(crate::world::bin("wgexitd"))
        .args(["status", "--config"])
        .arg(n.w.daemon_config())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("network acme\n"), "{text}");
    assert!(
        text.contains("  members     1 containers, 1 peers\n"),
        "{text}"
    );
}

/// How often the flush test's daemon reconciles (seconds).
const FLUSH_INTERVAL: u64 = 2;

/// A TCP connection from `ns` to `[addr]:8080` that an HTTP server answers (1 s at most).
fn reaches(ns: &str, addr: &str) -> bool {
    let out = try_sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "curl",
        "-s",
        "-g",
        "--connect-timeout",
        "0.5",
        "-m",
        "1",
        &format!("http://[{addr}]:8080/"),
    ]);
    out.status.success()
}

/// Every global IPv6 address of namespace `ns`.
fn global_addresses6(ns: &str) -> Vec<String> {
    let listing = sh(&[
        "ip", "-n", ns, "-6", "-j", "addr", "show", "scope", "global",
    ]);
    let links: Value = serde_json::from_str(&listing).unwrap();
    let infos = links.as_array().unwrap().iter();
    infos
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .collect()
}

/// Beta's laptop, its wg-quick tunnel widened to acme's prefix and to every address of the
/// gateway: (its interface, the targets it must never reach).
fn beta_laptop_probing_everything(n: &mut Nets, acme: &Acme) -> (String, Vec<String>) {
    let iface = format!("{}lap", n.w.id);
    let conf_path = n.w.path(&format!("{iface}.conf"));
    let out = conf_path.display().to_string();
    let create = n.peer_cmd_in("beta", &["create", "--name", "eve", "--out", &out]);
    assert!(create.status.success(), "{create:?}");
    wg_quick_up(n, &conf_path, BETA_DNS);
    let gateway = global_addresses6(&n.w.exit);
    let mut allowed = vec![BETA_PREFIX.to_string(), ACME_PREFIX.to_string()];
    let laptop = n.laptop.clone();
    for addr in &gateway {
        let host = format!("{addr}/128");
        sh(&[
            "ip", "-n", &laptop, "-6", "route", "replace", &host, "dev", &iface,
        ]);
        allowed.push(host);
    }
    sh(&[
        "ip",
        "-n",
        &laptop,
        "-6",
        "route",
        "replace",
        ACME_PREFIX,
        "dev",
        &iface,
    ]);
    let beta_key = n.gateway_key("beta", BETA_NET_TOKEN);
    sh(&[
        "ip",
        "netns",
        "exec",
        &laptop,
        "wg",
        "set",
        &iface,
        "peer",
        &beta_key,
        "allowed-ips",
        &allowed.join(","),
    ]);
    let mut targets = gateway;
    targets.extend([acme.web_ip.clone(), acme.api_ip.clone()]);
    (iface, targets)
}

/// Beta's laptop reaches none of `targets`.
fn reaches_none(n: &Nets, targets: &[String], when: &str) {
    for t in targets {
        assert!(
            !reaches(&n.laptop, t),
            "{when}: beta's laptop reached [{t}]:8080\n{}",
            n.w.daemon_log()
        );
    }
}

#[test]
fn a_flushed_ruleset_lets_no_network_tunnel_reach_the_gateway_or_another_network() {
    let mut n = Nets::with(&format!("reconcile_interval = {FLUSH_INTERVAL}\n"));
    let a = acme_on_two_hosts(&mut n);
    n.serve_http(&a.api.netns, "api says hi\n");
    let exit = n.w.exit.clone();
    // Another address of the gateway, outside every network, and a service on all of them.
    sh(&[
        "ip",
        "-n",
        &exit,
        "addr",
        "add",
        "2001:db8:1a9::1/128",
        "dev",
        "lo",
    ]);
    n.serve_http(&exit, "the gateway itself\n");
    let db = n.container("db", "99887766554433db");
    let rdb = n.add(
        &n.w.host.clone(),
        &db,
        &n.conf("beta", None, "cni-data"),
        "db",
        "ams",
    );
    let db_ip = address_of(&rdb, true);
    n.serve_http(&db.netns, "db\n");
    let (_, targets) = beta_laptop_probing_everything(&mut n, &a);
    assert!(
        targets.iter().any(|t| t == "2001:db8:1a9::1"),
        "{targets:?}"
    );
    let acme_web = format!("http://[{}]:8080/", a.web_ip);

    // Before: the laptop's tunnel works (beta's db), and goes nowhere else.
    let start = Instant::now();
    while !reaches(&n.laptop, &db_ip) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no tunnel to beta"
        );
    }
    reaches_none(&n, &targets, "before the flush");
    assert_eq!(curl(&a.api.netns, &acme_web), Ok("web says hi".into()));
    sh(&["ip", "netns", "exec", &exit, "nft", "flush", "ruleset"]);
    let flushed = Instant::now();
    let during = Duration::from_secs(3 * FLUSH_INTERVAL);
    let acme_back = std::thread::scope(|s| {
        let back = s.spawn(|| loop {
            if reaches(&a.api.netns, &a.web_ip) {
                return flushed.elapsed();
            }
            if flushed.elapsed() > during {
                return during;
            }
        });
        while flushed.elapsed() < during {
            reaches_none(&n, &targets, "after the flush");
        }
        back.join().unwrap()
    });
    // The next round puts the table back; a round and a probe take well under a second.
    assert!(
        acme_back < Duration::from_secs(FLUSH_INTERVAL + 1),
        "acme's members apart for {acme_back:?}\n{}",
        n.w.daemon_log()
    );
    reaches_none(&n, &targets, "after the repair");
    assert!(
        reaches(&n.laptop, &db_ip),
        "beta's laptop lost its own network"
    );
    assert_eq!(curl(&a.api.netns, &acme_web), Ok("web says hi".into()));
    // /metrics counts each network's members by kind.
    let metrics = n.w.metrics();
    for line in [
        "wgexit_network_members{network=\"acme\",kind=\"container\"} 2",
        "wgexit_network_members{network=\"acme\",kind=\"peer\"} 0",
        "wgexit_network_members{network=\"beta\",kind=\"container\"} 1",
        "wgexit_network_members{network=\"beta\",kind=\"peer\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}
