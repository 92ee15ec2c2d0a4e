//! Real runtimes: runc through `wgexit oci-hook`, podman through its CNI backend. Both run in
//! the world's host namespace (`nsenter --net`, which leaves mounts alone), exactly as on a
//! container host whose root namespace that is; the machine's own root namespace is not
//! touched. Each container prints what the echo server saw: the egress IP.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::world::{World, ECHO, EGRESS_IP, TOKEN};

/// A busybox rootfs: the static binary and the applets the tests use.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
    for applet in ["sh", "nc", "cat", "ip"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    rootfs
}

/// What the container runs: one HTTP request to the echo server with busybox `nc`.
fn http_request() -> Vec<String> {
    let (host, port) = ECHO.split_once(':').unwrap();
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {host} {port}"),
    ]
}

/// Runs `args` in the world's host network namespace.
fn in_host(w: &World, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", w.host)).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn runc_container_leaves_through_the_egress_ip_via_the_oci_hook() {
    let w = World::new();
    let bundle = w.path("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    busybox_rootfs(&bundle);
    let hook_conf = w.path("hook.conflist");
    let list = json!({"cniVersion": "1.0.0", "name": "egress", "plugins": [w.net_conf("acme")]});
    std::fs::write(&hook_conf, list.to_string()).unwrap();

    let spec = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(spec.status.success(), "{}", text(&spec));
    let path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["process"]["terminal"] = json!(false);
    config["process"]["args"] = json!(http_request());
    let hook = |phase: &str| {
        json!([{
            "path": env!("CARGO_BIN_EXE_wgexit"),
            "args": ["wgexit", "oci-hook", phase, "--config", hook_conf.display().to_string()],
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        }])
    };
    config["hooks"] = json!({ "createRuntime": hook("add"), "poststop": hook("del") });
    std::fs::write(&path, config.to_string()).unwrap();

    let id = format!("{}-runc", w.id);
    let root = w.path("runc-root");
    let out = in_host(
        &w,
        &[
            "runc",
            "--root",
            root.to_str().unwrap(),
            "run",
            "--bundle",
            bundle.to_str().unwrap(),
            &id,
        ],
        &[],
    );
    // Whatever happened, leave no container behind.
    let _ = Command::new("runc")
        .args(["--root", root.to_str().unwrap(), "delete", "--force", &id])
        .output();
    assert!(out.status.success(), "{}\n{}", text(&out), w.daemon_log());
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(body.lines().last().map(str::trim), Some(EGRESS_IP), "{}", text(&out));
    // The poststop hook released everything.
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    assert_eq!(w.links(&w.host), vec!["lo", "up0"]);
}
