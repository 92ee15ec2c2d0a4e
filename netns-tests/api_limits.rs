//! The control API cannot be held open: idle TLS connections do not stop leases, the
//! connection cap answers 503, and idle connections are closed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::world::{try_sh, World, API, EGRESS_IP, TOKEN};

/// Python in the host namespace holding `n` TLS connections to the API open, idle: it
/// prints "ready" once all are up, "closed K" when K of them were closed by the server
/// (checked on "check"), and lets go when its stdin closes.
const HOLDER: &str = r#"
import socket, ssl, sys, select
host, port, ca, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
conns = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=10)
    conns.append(ctx.wrap_socket(s, server_hostname=host))
print("ready", flush=True)
for line in sys.stdin:
    closed = 0
    for c in conns:
        c.setblocking(False)
        try:
            if c.recv(1) == b"":
                closed += 1
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError):
            closed += 1
    print("closed %d" % closed, flush=True)
"#;

struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn open(w: &World, n: usize) -> Holder {
        let (host, port) = API.split_once(':').unwrap();
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", &w.host, "python3", "-c", HOLDER, host, port,
            ])
            .arg(w.ca_file())
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the idle connections did not open");
        Holder {
            child,
            stdin,
            stdout,
        }
    }

    /// How many of the connections the server has closed.
    fn closed(&mut self) -> usize {
        writeln!(self.stdin, "check").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix("closed ")
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /v1/egress/acme/leases` from the host: (status, body).
fn get_from_host(w: &World) -> (String, String) {
    let out = try_sh(&[
        "ip",
        "netns",
        "exec",
        &w.host,
        "curl",
        "-s",
        "-m",
        "5",
        "-w",
        "\n%{http_code}",
        "--cacert",
        &w.ca_file().display().to_string(),
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &format!("https://{API}/v1/egress/acme/leases"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

#[test]
fn two_hundred_idle_tls_connections_do_not_stop_a_lease() {
    let mut w = World::new();
    let _idle = Holder::open(&w, 200);
    let conf = w.net_conf("acme");
    let c = w.container("busy");
    w.cni("ADD", &c, &conf).ok();
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
}

#[test]
fn the_connection_cap_answers_503_and_idle_connections_are_closed() {
    let mut w = World::new();
    let path = w.daemon_config();
    let text = std::fs::read_to_string(&path).unwrap();
    let capped = text.replacen(
        &format!("listen = \"{API}\""),
        &format!("listen = \"{API}\"\nmax_connections = 5\nidle_timeout = 2"),
        1,
    );
    std::fs::write(&path, capped).unwrap();
    w.stop_daemon(Signal::SIGTERM);
    w.start_daemon();

    let mut idle = Holder::open(&w, 5);
    let (code, body) = get_from_host(&w);
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("over_capacity"), "{body}");

    // Idle for idle_timeout: the server closes them, and the API serves again.
    let deadline = Instant::now() + Duration::from_secs(6);
    while idle.closed() < 5 {
        assert!(
            Instant::now() < deadline,
            "idle connections were not closed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = get_from_host(&w);
    assert_eq!(code, "200", "{body}");
}
