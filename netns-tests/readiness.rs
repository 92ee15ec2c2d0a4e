//! The scripts' wait for servers they start in the background (`scripts/lib/wait-for-port.sh`,
//! used by `scripts/demo`): it outlasts a server that is slow to bind, as Python is on a fresh
//! machine, and fails with a message naming what it waited for when nothing ever answers or
//! the server exits.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::world::{require_root, sh, try_sh};

const WAIT_LIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lib/wait-for-port.sh");

/// A namespace of its own with only `lo` up, removed when dropped; its server, if any, is
/// killed first.
struct Scratch {
    netns: String,
    server: Option<Child>,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        require_root();
        let netns = format!("wx{:x}{tag}", std::process::id() & 0xffff);
        sh(&["ip", "netns", "add", &netns]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        Scratch {
            netns,
            server: None,
        }
    }

    /// Starts `python3 -c script` in the namespace; returns its pid (`ip netns exec` execs it).
    fn start_python(&mut self, script: &str) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "python3", "-c", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3");
        let pid = child.id();
        self.server = Some(child);
        pid
    }

    /// Runs `wait_for_port ARGS` from the shell library; returns its output and how long it took.
    fn wait_for_port(&self, args: &[&str]) -> (Output, Duration) {
        let start = Instant::now();
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("source {WAIT_LIB} && wait_for_port \"$@\""))
            .arg("wait")
            .args(["-n", &self.netns])
            .args(args)
            .output()
            .expect("run bash");
        (out, start.elapsed())
    }

    /// Connects to 127.0.0.1:`port` in the namespace and reads what the server says.
    fn ask(&self, port: u16) -> Output {
        try_sh(&[
            "ip",
            "netns",
            "exec",
            &self.netns,
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/127.0.0.1/{port} && cat <&3"),
        ])
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = try_sh(&["ip", "netns", "del", &self.netns]);
    }
}

/// An echo server that sleeps 2 s before it binds, then answers each connection with the
/// caller's address.
const SLOW_ECHO: &str = r#"
import socket, time
time.sleep(2)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080))
s.listen(16)
while True:
    c, a = s.accept()
    c.sendall((a[0] + "\n").encode())
    c.close()
"#;

#[test]
fn the_wait_outlasts_an_echo_server_slow_to_bind() {
    let mut ns = Scratch::new("rdslow");
    let pid = ns.start_python(SLOW_ECHO);
    // What a script that does not wait meets: connection refused.
    let early = ns.ask(8080);
    assert!(
        !early.status.success(),
        "answered before it bound: {early:?}"
    );

    let (out, took) = ns.wait_for_port(&["-p", &pid.to_string(), "-t", "20", "127.0.0.1", "8080"]);
    assert!(
        out.status.success(),
        "the wait failed after {took:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It waited for the bind, and returned soon after it (event-driven, not a fixed sleep).
    assert!(
        took >= Duration::from_millis(1500),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(10), "returned after {took:?}");
    let answer = ns.ask(8080);
    assert!(answer.status.success(), "{answer:?}");
    assert_eq!(String::from_utf8_lossy(&answer.stdout).trim(), "127.0.0.1");
}

#[test]
fn the_wait_fails_clearly_when_nothing_binds() {
    let ns = Scratch::new("rdnone");
    let (out, took) = ns.wait_for_port(&["-t", "0.3", "127.0.0.1", "8081"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "nothing answered on 127.0.0.1:8081 in network namespace {} within 0.3 s",
            ns.netns
        )),
        "{stderr}"
    );
    assert!(took >= Duration::from_millis(300), "gave up after {took:?}");
    assert!(took < Duration::from_secs(3), "gave up after {took:?}");
}

#[test]
fn the_wait_stops_at_once_when_the_server_exits() {
    let mut ns = Scratch::new("rdexit");
    // Exits without binding; it stays a zombie until this test reaps it.
    let pid = ns.start_python("import sys; sys.exit(3)");
    let (out, took) = ns.wait_for_port(&["-p", &pid.to_string(), "-t", "20", "127.0.0.1", "8082"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the server (pid {pid}) exited before 127.0.0.1:8082"
        )),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
}
