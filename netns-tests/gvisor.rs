//! gVisor for real: a busybox container under Debian's `runsc`, its network namespace given
//! wgexit's link by `wgexit oci-hook` (`routes: split`, `gvisor: true`), its request leaving
//! from the egress IP. Without `gvisor: true` the link keeps generic segmentation offload on,
//! runsc sends segments whose checksums never get completed, and the request goes unanswered
//! (see `net/offload.rs` and docs/plugin.md, "gVisor").
//!
//! Debian's runsc (2022-12) takes the presence of `/proc/sys/net/core/rmem_default` to mean
//! "root network namespace" and refuses to run with networking there; kernels since 5.x show
//! that file in every namespace. The harness (only) runs runsc in a private mount namespace
//! with a tmpfs over `/proc/sys/net`, which gets past that check; current runsc releases need
//! no such thing. runsc runs in the world's host network namespace, so the hook makes the
//! WireGuard link there (its UDP socket stays on the host) and moves it into the namespace
//! the bundle names.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::runtimes::{busybox_rootfs, text};
use crate::world::{World, ECHO, EGRESS_IP, TOKEN};

/// A runsc bundle: busybox, `args`, the network namespace `netns`, and the hooks running
/// `wgexit oci-hook add` (prestart) and `del` (poststop) with `hook_conf`.
fn bundle(w: &World, netns: &Path, hook_conf: &Path, args: Vec<String>) -> PathBuf {
    let bundle = w.path("runsc-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let rootfs = busybox_rootfs(&bundle);
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/timeout")).unwrap();
    let spec = Command::new("runsc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .expect("runsc (Debian package runsc; scripts/deps installs it)");
    assert!(spec.status.success(), "{}", text(&spec));
    let path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["process"]["terminal"] = json!(false);
    config["process"]["args"] = json!(args);
    for ns in config["linux"]["namespaces"].as_array_mut().unwrap() {
        if ns["type"] == "network" {
            ns["path"] = json!(netns);
        }
    }
    let hook = |phase: &str| {
        json!([{
            "path": crate::world::bin("wgexit"),
            "args": ["wgexit", "oci-hook", phase, "--config", hook_conf.display().to_string()],
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        }])
    };
    config["hooks"] = json!({ "prestart": hook("add"), "poststop": hook("del") });
    std::fs::write(&path, config.to_string()).unwrap();
    bundle
}

/// `runsc ARGS` as the harness runs it: in the world's host network namespace, in a private
/// mount namespace with a tmpfs over `/proc/sys/net` (see the module's comment).
fn runsc(w: &World, root: &Path, logs: &Path, args: &[&str]) -> Output {
    let script = format!(
        "mount -t tmpfs wgexit-test /proc/sys/net && exec timeout 60 runsc --root {root} --debug --debug-log {logs}/ --pcap-log {logs}/sandbox.pcap --strace \"$@\"",
        root = root.display(),
        logs = logs.display(),
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "nsenter"])
        .arg(format!("--net=/var/run/netns/{}", w.host))
        .args(["sh", "-c", &script, "runsc"])
        .args(args)
        .output()
        .unwrap()
}

/// The runsc debug logs, for a failure's message.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let interesting: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("network.go") || l.contains("rror") || l.contains("hook"))
            .collect();
        out.push_str(&format!(
            "== {}\n{}\n",
            e.path().display(),
            interesting.join("\n")
        ));
    }
    out
}

/// One HTTP request to the echo server, given up after 5 s (busybox `nc -w` bounds only the
/// connect).
fn bounded_request() -> Vec<String> {
    let (host, port) = ECHO.split_once(':').unwrap();
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc {host} {port}"),
    ]
}

/// Runs the request in a runsc container whose plugin config has `gvisor` as given; returns
/// runsc's output and a digest of its logs. The sandbox's logs are also kept in
/// `target/tmp/runsc-logs/` for a look after a failure.
fn run_in_gvisor(w: &mut World, gvisor: bool) -> (Output, String) {
    let c = w.container("gvisor");
    let mut plugin = w.net_conf("acme");
    plugin["routes"] = json!("split");
    plugin["gvisor"] = json!(gvisor);
    let hook_conf = w.path("runsc.conflist");
    let list = json!({"cniVersion": "1.1.0", "name": "wgexit-gvisor", "plugins": [plugin]});
    std::fs::write(&hook_conf, list.to_string()).unwrap();
    let bundle = bundle(w, &c.netns_path, &hook_conf, bounded_request());

    let id = format!("{}-runsc", w.id);
    let root = w.path("runsc-root");
    let debug = w.path("runsc-logs");
    std::fs::create_dir_all(&debug).unwrap();
    let out = runsc(
        w,
        &root,
        &debug,
        &["run", "--bundle", bundle.to_str().unwrap(), &id],
    );
    // Whatever happened, leave no sandbox behind.
    let _ = runsc(w, &root, &debug, &["delete", "--force", &id]);
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runsc-logs");
    let _ = std::fs::remove_dir_all(&kept);
    let _ = Command::new("cp").arg("-r").arg(&debug).arg(&kept).status();
    (out, logs(&debug))
}

fn last_line(out: &Output) -> String {
    let body = String::from_utf8_lossy(&out.stdout);
    body.lines().last().unwrap_or("").trim().to_string()
}

/// Nothing of the attachment is left: the poststop hook released it.
fn nothing_left(w: &World) {
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
}

#[test]
fn runsc_container_leaves_through_the_egress_ip_over_split_routes() {
    let mut w = World::new();
    let (out, logs) = run_in_gvisor(&mut w, true);
    println!("runsc: the echo server saw {}", last_line(&out));
    assert_eq!(
        last_line(&out),
        EGRESS_IP,
        "{}\n{logs}\n{}",
        text(&out),
        w.daemon_log()
    );
    assert!(out.status.success(), "{}", text(&out));
    // runsc took the link over: its setup names eth0 with the leased address and split routes.
    assert!(logs.contains("Enabling interface \"eth0\""), "{logs}");
    assert!(logs.contains("0.0.0.0/1 nic"), "{logs}");
    nothing_left(&w);
}

#[test]
fn runsc_without_the_gvisor_flag_gets_no_answer() {
    let mut w = World::new();
    let leaked = crate::daemon::capture_sources(&w.isp, crate::world::POOL);
    let (out, logs) = run_in_gvisor(&mut w, false);
    // The SYN (never segmented) gets through; the rest carries bad checksums, which
    // conntrack calls invalid: the exit node drops them rather than let them out unNATed.
    assert_ne!(last_line(&out), EGRESS_IP, "{}\n{logs}", text(&out));
    assert_eq!(
        leaked(),
        0,
        "packets with an overlay source reached the isp"
    );
    nothing_left(&w);
}
