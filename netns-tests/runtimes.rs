//! Real runtimes: runc through `wgexit oci-hook`, podman through its CNI backend (containerd
//! is in `containerd.rs`). Both run in the world's host namespace (`nsenter --net`, which
//! leaves mounts alone), exactly as on a container host whose root namespace that is; the
//! machine's own root namespace is not touched. Each container prints what the echo server
//! saw: the egress IP.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::world::{World, ECHO, EGRESS_IP, TOKEN};

/// A busybox rootfs: the static binary and the applets the tests use.
pub(crate) fn busybox_rootfs(dir: &Path) -> PathBuf {
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
pub(crate) fn http_request() -> Vec<String> {
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
    cmd.arg(format!("--net=/var/run/netns/{}", w.host))
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub(crate) fn text(out: &Output) -> String {
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
            "path": crate::world::bin("wgexit"),
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
    assert_eq!(
        body.lines().last().map(str::trim),
        Some(EGRESS_IP),
        "{}",
        text(&out)
    );
    // The poststop hook released everything.
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    assert_eq!(w.links(&w.host), vec!["lo", "up0"]);
}

/// A private podman: its own storage, state, containers.conf and CNI config dir, so nothing
/// of the machine's podman set-up is read or changed.
struct Podman {
    dir: PathBuf,
    conf: PathBuf,
}

impl Podman {
    fn new(w: &World, network_dir: &Path) -> Podman {
        let dir = w.path("podman");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let plugin_dir = Path::new(crate::world::bin("wgexit")).parent().unwrap();
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "{tmp}"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugins}", "/usr/lib/cni"]
network_config_dir = "{net}"
"#,
                tmp = dir.join("tmp").display(),
                plugins = plugin_dir.display(),
                net = network_dir.display(),
            ),
        )
        .unwrap();
        Podman { dir, conf }
    }

    fn run(&self, w: &World, args: &[&str]) -> Output {
        let root = self.dir.join("root");
        let runroot = self.dir.join("runroot");
        let mut full = vec![
            "podman",
            "--root",
            root.to_str().unwrap(),
            "--runroot",
            runroot.to_str().unwrap(),
            "--storage-driver",
            "vfs",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
        ];
        full.extend_from_slice(args);
        in_host(w, &full, &[("CONTAINERS_CONF", &self.conf)])
    }
}

#[test]
fn podman_container_leaves_through_the_egress_ip() {
    let w = World::new();
    let network = format!("{}-net", w.id);
    let net_dir = w.path("cni-net.d");
    std::fs::create_dir_all(&net_dir).unwrap();
    // The example conflist of plugin-configs/ (the README's minimal plugin config, no
    // `reportMac`), pointed at this world: podman 4.3 refuses an interface without a MAC,
    // which the plugin reports by default.
    let example: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/plugin-configs/podman/wgexit.conflist"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut plugin = example["plugins"][0].clone();
    assert!(plugin.get("reportMac").is_none(), "{plugin}");
    let world = w.net_conf("acme");
    for key in ["servers", "tokenFile", "caFile", "dataDir", "backend"] {
        plugin[key] = world[key].clone();
    }
    let list = json!({"cniVersion": example["cniVersion"], "name": network, "plugins": [plugin]});
    std::fs::write(
        net_dir.join(format!("{network}.conflist")),
        list.to_string(),
    )
    .unwrap();

    let podman = Podman::new(&w, &net_dir);
    let bundle = w.path("image");
    let rootfs = busybox_rootfs(&bundle);
    let tar = bundle.join("rootfs.tar");
    let tarred = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .unwrap();
    assert!(tarred.status.success(), "{}", text(&tarred));
    let image = format!("localhost/{}-busybox", w.id);
    let out = podman.run(&w, &["import", tar.to_str().unwrap(), &image]);
    assert!(out.status.success(), "{}", text(&out));

    let name = format!("{}-ctr", w.id);
    let mut args = vec!["run", "--name", &name, "--network", &network, &image];
    let request = http_request();
    args.extend(request.iter().map(String::as_str));
    let ran = podman.run(&w, &args);
    let body = String::from_utf8_lossy(&ran.stdout).into_owned();
    let removed = podman.run(&w, &["rm", "--force", &name]);
    let _ = podman.run(&w, &["rmi", "--force", &image]);
    assert!(ran.status.success(), "{}\n{}", text(&ran), w.daemon_log());
    println!("podman: the echo server saw {}", body.trim());
    assert_eq!(
        body.lines().last().map(str::trim),
        Some(EGRESS_IP),
        "{}",
        text(&ran)
    );
    assert!(removed.status.success(), "{}", text(&removed));
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
}
