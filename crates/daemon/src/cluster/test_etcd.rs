//! A real single-member etcd for unit tests, on loopback ports of its own, removed when
//! dropped. Tests skip (saying so) only when the `etcd` binary is not installed.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::cluster::Float;
use crate::config::ClusterConfig;

pub struct TestEtcd {
    child: Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl TestEtcd {
    /// Starts etcd and waits until it serves; `None` (with a message) without etcd.
    pub fn start() -> Option<TestEtcd> {
        if Command::new("etcd").arg("--version").output().is_err() {
            eprintln!("SKIPPED: etcd is not installed (scripts/deps installs etcd-server)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("pool.secret");
        std::fs::write(&secret, "a test pool's secret, 32 bytes or more").expect("secret");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod secret");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let etcd = TestEtcd {
            child,
            _dir: dir,
            url,
        };
        etcd.wait_ready();
        Some(etcd)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let ok = Command::new("etcdctl")
                .args(["--endpoints", &self.url, "--dial-timeout", "1s"])
                .args(["endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd at {} did not become healthy", self.url);
    }

    /// A pool config naming this etcd; `name` keeps tests' keys apart.
    pub fn cluster(&self, name: &str, node: &str) -> ClusterConfig {
        ClusterConfig {
            name: name.into(),
            node: node.into(),
            etcd: vec![self.url.clone()],
            etcd_tls: None,
            secret_file: self._dir.path().join("pool.secret"),
            leader_ttl: Duration::from_secs(1),
            takeover_after: Duration::from_millis(500),
            float: Float::Address,
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
