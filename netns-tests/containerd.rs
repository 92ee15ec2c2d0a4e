//! containerd for real: Debian's `containerd` started by the test with its own root, state,
//! socket and config, and `ctr run --cni`, which goes through `go-cni`, the library the CRI
//! plugin uses. `ctr` reads `/etc/cni/net.d` and `/opt/cni/bin`, so containerd and ctr run in
//! a private mount namespace where those are the test's own directories; both run in the
//! world's host network namespace, as on a container host. The image is imported from a
//! busybox rootfs packed as an OCI image layout (no registry).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::runtimes::{busybox_rootfs, http_request, text};
use crate::world::{sh, World, EGRESS_IP, TOKEN};

/// containerd's namespace for the test's images and containers.
const NAMESPACE: &str = "wgexit-test";

/// Writes `data` as a blob of the OCI layout `dir`; returns its digest and size.
fn blob(dir: &Path, data: &[u8]) -> (String, usize) {
    let digest = hex::encode(Sha256::digest(data));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(&digest), data).unwrap();
    (format!("sha256:{digest}"), data.len())
}

/// `rootfs` as a one-layer OCI image archive named `name`, for `ctr image import`.
fn oci_image(dir: &Path, rootfs: &Path, name: &str) -> PathBuf {
    let layout = dir.join("oci");
    let layer_tar = dir.join("layer.tar");
    sh(&[
        "tar",
        "-C",
        rootfs.to_str().unwrap(),
        "-cf",
        layer_tar.to_str().unwrap(),
        ".",
    ]);
    let (layer, layer_size) = blob(&layout, &std::fs::read(&layer_tar).unwrap());
    let config = json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer]}});
    let (config, config_size) = blob(&layout, config.to_string().as_bytes());
    let manifest = json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}]});
    let (manifest, manifest_size) = blob(&layout, manifest.to_string().as_bytes());
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest, "size": manifest_size,
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = dir.join("image.tar");
    sh(&[
        "tar",
        "-C",
        layout.to_str().unwrap(),
        "-cf",
        archive.to_str().unwrap(),
        ".",
    ]);
    archive
}

/// A containerd of the test's own, in a private mount namespace whose `/etc/cni/net.d` and
/// `/opt/cni/bin` are `net_d` and `bin`.
struct Containerd {
    dir: PathBuf,
    child: Child,
    host: String,
}

impl Containerd {
    fn start(w: &World, net_d: &Path, bin: &Path) -> Containerd {
        let dir = w.path("containerd");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
            ),
        )
        .unwrap();
        let script = format!(
            "mount -t tmpfs wgexit-test /opt && mkdir -p /opt/cni/bin \
             && mount --bind {bin} /opt/cni/bin && mount --bind {net_d} /etc/cni/net.d \
             && exec containerd --config {config}",
            bin = bin.display(),
            net_d = net_d.display(),
            config = config.display(),
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        // unshare and nsenter exec (they fork for neither option), so the child is containerd.
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "nsenter"])
            .arg(format!("--net=/var/run/netns/{}", w.host))
            .args(["sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian package containerd; scripts/deps installs it)");
        let mut c = Containerd {
            dir,
            child,
            host: w.host.clone(),
        };
        c.wait_ready();
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        while !(self.socket().exists() && self.ctr(&["version"]).status.success()) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("containerd exited ({status}): {}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd not ready: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ctr ARGS` in containerd's mount namespace and the world's host network namespace.
    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.child.id().to_string())
            .arg("--mount")
            .arg(format!("--net=/var/run/netns/{}", self.host))
            .arg("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", NAMESPACE])
            .args(args);
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().unwrap()
    }

    /// Pids of the runc shims this containerd started (their command line names its socket).
    fn shims(&self) -> Vec<i32> {
        let socket = self.socket().display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&socket))
            })
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let shims = self.shims();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in shims {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn containerd_container_leaves_through_the_egress_ip_and_removal_releases_the_lease() {
    let w = World::new();
    let net_d = w.path("cni-net.d");
    let bin = w.path("cni-bin");
    std::fs::create_dir_all(&net_d).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(crate::world::bin("wgexit"), bin.join("wgexit")).unwrap();
    // The example conflist of plugin-configs/containerd, pointed at this world.
    let mut list: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/plugin-configs/containerd/10-wgexit.conflist"
        ))
        .unwrap(),
    )
    .unwrap();
    let world = w.net_conf("acme");
    for key in ["servers", "tokenFile", "caFile", "dataDir", "backend"] {
        list["plugins"][0][key] = world[key].clone();
    }
    std::fs::write(net_d.join("10-wgexit.conflist"), list.to_string()).unwrap();

    let containerd = Containerd::start(&w, &net_d, &bin);
    let image_dir = w.path("image");
    let rootfs = busybox_rootfs(&image_dir);
    let image = format!("localhost/{}-busybox:latest", w.id);
    let archive = oci_image(&image_dir, &rootfs, &image);
    let out = containerd.ctr(&[
        "image",
        "import",
        "--snapshotter",
        "native",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), containerd.log());

    // The container makes its request, then waits for a line on stdin (ctr passes its own).
    let id = format!("{}-ctr", w.id);
    let request = http_request();
    let script = format!("{}; read done", request[2]);
    let mut run = containerd
        .ctr_command(&[
            "run",
            "--rm",
            "--cni",
            "--snapshotter",
            "native",
            &image,
            &id,
            "/bin/sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    let seen = lines
        .by_ref()
        .map_while(Result::ok)
        .map(|l| l.trim().to_string())
        .find(|l| l == EGRESS_IP || l.starts_with("HTTP/1.0 5"));
    println!(
        "containerd: the echo server saw {}",
        seen.as_deref().unwrap_or("nothing")
    );
    // While it runs, the lease is there, made for this container.
    let leases = w.leases("acme", TOKEN);
    let _ = run.stdin.take().unwrap().write_all(b"done\n");
    let ran = run.wait_with_output().unwrap();
    assert_eq!(
        seen.as_deref(),
        Some(EGRESS_IP),
        "{}\n{}\n{}",
        text(&ran),
        containerd.log(),
        w.daemon_log()
    );
    assert!(ran.status.success(), "{}", text(&ran));
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert!(
        leases[0]["attachment"]["container_id"]
            .as_str()
            .unwrap()
            .contains(&id),
        "{leases:?}"
    );
    assert_eq!(leases[0]["attachment"]["ifname"], "eth0");
    // `--rm` removed the container, and with it (CNI DEL) the lease, peer and state.
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    let _ = containerd.ctr(&["image", "rm", &image]);
}
