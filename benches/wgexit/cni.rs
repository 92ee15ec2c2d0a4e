//! Rows 1 and 2: CNI ADD/DEL latency of wgexit and of `ptp` + `host-local`, run the same
//! way (from the host namespace, one container at a time, each in a fresh namespace), and
//! the wgexit container's first request right after ADD.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::in_ns;
use crate::stats::{ms, Summary};
use crate::steps;
use crate::world::{Container, World};

/// Where Debian's containernetworking-plugins live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The bench's own echo server in `isp`: blocking accept, so it adds no polling delay.
pub const ECHO: &str = "198.18.0.10:8081";
/// How long a first request may take before it counts as failed (a lost SYN is resent
/// after 1 s, so a request that needed a retry does not pass).
const FIRST_TRY: Duration = Duration::from_millis(900);

pub struct Echo;

/// Starts an echo server in `isp` that answers each connection with the caller's address.
pub fn start_echo(world: &World) -> Echo {
    let (tx, rx) = std::sync::mpsc::channel();
    let isp = world.isp.clone();
    std::thread::spawn(move || {
        let path = PathBuf::from(format!("/var/run/netns/{isp}"));
        let netns = wgexit::net::Netns::open(&path).expect("isp netns");
        let _guard = netns.enter().expect("enter isp");
        let listener = TcpListener::bind(ECHO).expect("bind bench echo");
        tx.send(()).expect("echo ready");
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = s.write_all(format!("{peer}\n").as_bytes());
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("echo server");
    Echo
}

#[derive(Debug, Default, Serialize)]
pub struct CniResults {
    pub wgexit_add_ms: Vec<f64>,
    /// wgexit's ADD with `spareLinks` 0 (userspace backend only): no warm spare to take.
    pub cold_add_ms: Vec<f64>,
    pub cold_add_errors: Vec<String>,
    pub wgexit_del_ms: Vec<f64>,
    pub ptp_add_ms: Vec<f64>,
    pub ptp_del_ms: Vec<f64>,
    /// Per wgexit container: the first request's latency, or None when it failed.
    pub first_request_ms: Vec<Option<f64>>,
    pub first_request_errors: Vec<String>,
    pub wgexit_add: Summary,
    pub cold_add: Summary,
    pub wgexit_del: Summary,
    pub ptp_add: Summary,
    pub ptp_del: Summary,
    pub first_request: Summary,
    pub first_try_ok: usize,
}

/// One plugin invocation as a runtime makes it; returns its wall time.
pub fn invoke(
    plugin: &Path,
    cni_path: &str,
    command: &str,
    c: &Container,
    conf: &str,
) -> Result<Duration, String> {
    invoke_traced(plugin, cni_path, command, c, conf, "")
}

/// [`invoke`], its ADD's steps gathered (with `--trace`) under names prefixed by `label`.
pub fn invoke_traced(
    plugin: &Path,
    cni_path: &str,
    command: &str,
    c: &Container,
    conf: &str,
    label: &str,
) -> Result<Duration, String> {
    let traced = steps::enabled();
    let start = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &c.id)
        .env("CNI_NETNS", &c.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env("WGEXIT_TRACE", if traced { "1" } else { "" })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(conf.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let took = start.elapsed();
    if out.status.success() {
        if command == "ADD" && traced {
            steps::gather(label, &String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    } else {
        Err(format!(
            "{} {command} failed: {}{}",
            plugin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The container's first request to the echo server: its latency if it succeeded at once.
pub fn first_request(c: &Container) -> Result<Duration, String> {
    in_ns(&c.netns, || {
        let start = Instant::now();
        let addr: SocketAddr = ECHO.parse().map_err(|e| format!("{e}"))?;
        let mut s = TcpStream::connect_timeout(&addr, FIRST_TRY).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(FIRST_TRY))
            .map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        let took = start.elapsed();
        if buf.trim() == crate::world::EGRESS_IP {
            Ok(took)
        } else {
            Err(format!("echo saw {:?}, not the egress IP", buf.trim()))
        }
    })
}

pub fn ptp_conf(world: &World) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bench-ptp",
        "type": "ptp",
        "ipMasq": false,
        "mtu": 1500,
        "ipam": {
            "type": "host-local",
            "subnet": "100.100.0.0/16",
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": world.path("ipam"),
        }
    })
    .to_string()
}

pub fn run(world: &mut World, _echo: &Echo, n: usize) -> CniResults {
    let wg_conf = world.net_conf("acme").to_string();
    // The same ADD without a warm spare (`spareLinks` 0), interleaved, where spares exist.
    let cold_conf = (world.backend == "userspace").then(|| {
        let mut conf = world.net_conf("acme");
        conf["spareLinks"] = serde_json::json!(0);
        conf.to_string()
    });
    let ptp_conf = ptp_conf(world);
    let wg_containers: Vec<Container> = (0..n).map(|i| world.container(&format!("w{i}"))).collect();
    let cold_containers: Vec<Container> = match cold_conf {
        Some(_) => (0..n).map(|i| world.container(&format!("c{i}"))).collect(),
        None => Vec::new(),
    };
    let ptp_containers: Vec<Container> =
        (0..n).map(|i| world.container(&format!("p{i}"))).collect();
    let first = world.container("w-first");
    let data_dir = world.data_dir().display().to_string();
    let plugins = Plugins {
        wgexit: PathBuf::from(crate::world::bin("wgexit")),
        ptp: Path::new(REFERENCE_PLUGINS).join("ptp"),
        wg_conf,
        cold_conf,
        ptp_conf,
        data_dir,
    };

    let host = world.host.clone();
    let mut r = in_ns(&host, || {
        // As on a host where a container started before: its ADD paid the `wireguard-go`
        // start and left a warm spare link for the next one (the plugin's `spareLinks`).
        let wg = (&plugins.wgexit, &plugins.wg_conf);
        invoke(wg.0, "/opt/cni/bin", "ADD", &first, wg.1).expect("first wgexit ADD");
        invoke(wg.0, "/opt/cni/bin", "DEL", &first, wg.1).expect("first wgexit DEL");
        crate::world::wait_for_refills(&plugins.data_dir);
        let mut r = CniResults::default();
        // Interleaved, so all see the same machine load.
        for (i, (w, p)) in wg_containers.iter().zip(&ptp_containers).enumerate() {
            plugins.add_round(&mut r, w, cold_containers.get(i), p);
        }
        for (i, (w, p)) in wg_containers.iter().zip(&ptp_containers).enumerate() {
            let t = invoke(wg.0, "/opt/cni/bin", "DEL", w, wg.1).expect("wgexit DEL");
            r.wgexit_del_ms.push(ms(t));
            if let (Some(c), Some(conf)) = (cold_containers.get(i), &plugins.cold_conf) {
                invoke(wg.0, "/opt/cni/bin", "DEL", c, conf).expect("wgexit DEL");
            }
            let t = invoke(&plugins.ptp, REFERENCE_PLUGINS, "DEL", p, &plugins.ptp_conf)
                .expect("ptp DEL");
            r.ptp_del_ms.push(ms(t));
        }
        r
    });
    r.wgexit_add = Summary::of(&r.wgexit_add_ms);
    r.cold_add = Summary::of(&r.cold_add_ms);
    r.wgexit_del = Summary::of(&r.wgexit_del_ms);
    r.ptp_add = Summary::of(&r.ptp_add_ms);
    r.ptp_del = Summary::of(&r.ptp_del_ms);
    let firsts: Vec<f64> = r.first_request_ms.iter().flatten().copied().collect();
    r.first_request = Summary::of(&firsts);
    r
}

/// The plugins row 1 compares and their configs.
struct Plugins {
    wgexit: PathBuf,
    ptp: PathBuf,
    wg_conf: String,
    /// wgexit's config with `spareLinks` 0, for the userspace backend.
    cold_conf: Option<String>,
    ptp_conf: String,
    data_dir: String,
}

impl Plugins {
    /// One round: wgexit's ADD (and its container's first request), wgexit's ADD without a
    /// spare, `ptp`'s ADD.
    fn add_round(
        &self,
        r: &mut CniResults,
        w: &Container,
        cold: Option<&Container>,
        p: &Container,
    ) {
        let t = invoke(&self.wgexit, "/opt/cni/bin", "ADD", w, &self.wg_conf).expect("wgexit ADD");
        r.wgexit_add_ms.push(ms(t));
        match first_request(w) {
            Ok(t) => {
                r.first_request_ms.push(Some(ms(t)));
                r.first_try_ok += 1;
            }
            Err(e) => {
                r.first_request_ms.push(None);
                r.first_request_errors.push(e);
            }
        }
        // The refill this ADD started (a new spare: ~7 ms of `wireguard-go` start) is over
        // before the others are timed, so it does not load their ADDs.
        crate::world::wait_for_refills(&self.data_dir);
        if let (Some(c), Some(conf)) = (cold, &self.cold_conf) {
            // Its failures are counted, not fatal: the row measures the ADDs with a spare.
            match invoke_traced(
                &self.wgexit,
                "/opt/cni/bin",
                "ADD",
                c,
                conf,
                "without a spare",
            ) {
                Ok(t) => r.cold_add_ms.push(ms(t)),
                Err(e) => r.cold_add_errors.push(e),
            }
        }
        let t = invoke(&self.ptp, REFERENCE_PLUGINS, "ADD", p, &self.ptp_conf).expect("ptp ADD");
        r.ptp_add_ms.push(ms(t));
    }
}
