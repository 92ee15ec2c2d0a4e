//! Backends against the real thing: `wireguard-go` in network namespaces made (and
//! removed) by each test. Needs root; skipped with a message otherwise.

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use super::userspace::{is_wireguard_go_for, log_path, pid_of};
use super::*;
use crate::wg::uapi::socket_path;

fn unique(prefix: &str) -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).unwrap();
    format!("{prefix}{}", hex::encode(bytes))
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("skipped: needs root to make network namespaces");
        false
    }
}

/// Runs `ip ARGS`, failing the test when it fails; returns stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wg_show(name: &str, what: &str) -> String {
    let out = Command::new("wg")
        .args(["show", name, what])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg show {name} {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn link_exists(netns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", "dev", name])
        .output()
        .unwrap()
        .status
        .success()
}

/// Namespaces and userspace devices of one test, removed on drop even when it fails.
struct World {
    namespaces: Vec<String>,
    devices: Vec<String>,
}

impl World {
    fn new() -> World {
        World {
            namespaces: Vec::new(),
            devices: Vec::new(),
        }
    }

    fn netns(&mut self) -> String {
        let name = unique("wgx-wg-");
        ip(&["netns", "add", &name]);
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    fn device(&mut self) -> String {
        let name = unique("wgt");
        self.devices.push(name.clone());
        name
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for dev in &self.devices {
            if let Some(pid) = pid_of(dev) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = std::fs::remove_file(socket_path(dev));
            let _ = std::fs::remove_file(log_path(dev));
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Moves the calling thread into namespace `name`.
fn enter(name: &str) {
    let file = File::open(format!("/var/run/netns/{name}")).unwrap();
    setns(file, CloneFlags::CLONE_NEWNET).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn peer(key: &Key, endpoint: Option<&str>, allowed: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: key.public(),
        endpoint: endpoint.map(|e| e.parse::<SocketAddr>().unwrap()),
        allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
        persistent_keepalive: None,
    }
}

fn new_key() -> Key {
    Key::generate_private().unwrap()
}

/// The backend of the tests that run on either: `$WGEXIT_TEST_BACKEND` ("kernel" in the VM
/// test, see netns-tests/vm/), else userspace.
fn backend_under_test() -> BackendKind {
    match std::env::var("WGEXIT_TEST_BACKEND").as_deref() {
        Ok("kernel") => BackendKind::Kernel,
        Ok("auto") => BackendKind::Auto,
        _ => BackendKind::Userspace,
    }
}

/// Sends "ping" from `client_ip` in namespace `client_ns` to `server` (bound in the calling
/// thread's namespace), which checks it and answers "pong"; returns the answer and its source.
fn udp_echo(client_ns: &str, client_ip: &str, server: &str) -> (Vec<u8>, std::net::SocketAddr) {
    let socket = UdpSocket::bind(server).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (ns, ip, to) = (
        client_ns.to_string(),
        client_ip.to_string(),
        server.to_string(),
    );
    let client = std::thread::spawn(move || {
        enter(&ns);
        let socket = UdpSocket::bind(format!("{ip}:0")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            let _ = socket.send_to(b"ping", &to);
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    });
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"ping");
            assert_eq!(from.ip(), client_ip.parse::<std::net::IpAddr>().unwrap());
            socket.send_to(b"pong", from).unwrap();
            break;
        }
    }
    client.join().unwrap().expect("no echo through the tunnel")
}

#[test]
fn two_devices_handshake_and_ping_across_namespaces() {
    if !is_root() {
        return;
    }
    let mut world = World::new();
    let host = world.netns();
    let container = world.netns();
    let (a, b) = (world.device(), world.device());
    enter(&host);
    runtime().block_on(async {
        let backend = Backend::open(BackendKind::Userspace).unwrap();
        assert_eq!(backend.kind(), BackendKind::Userspace);

        let started = Instant::now();
        backend.create(&a).await.unwrap();
        eprintln!("create took {:?}", started.elapsed());
        backend.create(&b).await.unwrap();
        assert!(pid_of(&a).is_some() && pid_of(&b).is_some());
        assert!(backend.exists(&a).await);

        // Like the plugin: b's UDP socket stays in `host`, its interface goes to `container`.
        ip(&["-n", &host, "link", "set", &b, "netns", &container]);

        let (ka, kb) = (new_key(), new_key());
        backend
            .configure(
                &a,
                &DeviceConfig {
                    private_key: ka,
                    listen_port: Some(51820),
                    peers: vec![peer(&kb, Some("127.0.0.1:51821"), &["100.64.0.2/32"])],
                },
            )
            .await
            .unwrap();
        backend
            .configure(
                &b,
                &DeviceConfig {
                    private_key: kb,
                    listen_port: Some(51821),
                    peers: vec![PeerConfig {
                        persistent_keepalive: Some(1),
                        ..peer(&ka, Some("127.0.0.1:51820"), &["100.64.0.1/32"])
                    }],
                },
            )
            .await
            .unwrap();
        ip(&["-n", &host, "addr", "add", "100.64.0.1/24", "dev", &a]);
        ip(&["-n", &host, "link", "set", &a, "up"]);
        ip(&["-n", &container, "addr", "add", "100.64.0.2/24", "dev", &b]);
        ip(&["-n", &container, "link", "set", &b, "up"]);

        // A UDP echo through the tunnel: `container` sends from 100.64.0.2 to 100.64.0.1
        // (in `host`, the test thread's namespace), which answers.
        let (reply, from) = udp_echo(&container, "100.64.0.2", "100.64.0.1:7777");
        assert_eq!(reply, b"pong");
        assert_eq!(from, "100.64.0.1:7777".parse().unwrap());

        let status = backend.status(&a).await.unwrap();
        assert_eq!(status.public_key, Some(ka.public()));
        assert_eq!(status.listen_port, 51820);
        assert_eq!(status.peers.len(), 1);
        let p = &status.peers[0];
        assert_eq!(p.public_key, kb.public());
        assert!(p.last_handshake.is_some(), "no handshake: {p:?}");
        assert!(p.rx_bytes > 0 && p.tx_bytes > 0);
        assert_eq!(p.endpoint, Some("127.0.0.1:51821".parse().unwrap()));
        assert_eq!(
            p.allowed_ips,
            vec!["100.64.0.2/32".parse::<IpNet>().unwrap()]
        );

        // b's interface lives in another namespace: delete still stops its wireguard-go,
        // which takes the interface with it.
        let pid_b = pid_of(&b).unwrap();
        backend.delete(&b).await.unwrap();
        assert!(!is_wireguard_go_for(pid_b, &b));
        assert!(!socket_path(&b).exists());
        assert!(!link_exists(&container, &b));
        backend.delete(&a).await.unwrap();
    });
}

/// Runs `test` with a new device of the backend under test, in a namespace of its own.
fn with_device(test: impl AsyncFnOnce(&Backend, &str)) {
    if !is_root() {
        return;
    }
    let mut world = World::new();
    let ns = world.netns();
    let dev = world.device();
    enter(&ns);
    runtime().block_on(async {
        let backend = Backend::open(backend_under_test()).unwrap();
        backend.create(&dev).await.unwrap();
        test(&backend, &dev).await;
    });
}

#[test]
fn set_and_remove_peer_touch_one_peer() {
    with_device(async |backend, dev| {
        let (k1, k2, k3) = (new_key(), new_key(), new_key());
        let p1 = peer(&k1, Some("198.18.0.1:1000"), &["100.64.1.1/32"]);
        let p2 = peer(&k2, Some("198.18.0.2:2000"), &["100.64.1.2/32"]);
        backend
            .configure(
                dev,
                &DeviceConfig {
                    private_key: new_key(),
                    listen_port: None,
                    peers: vec![p1.clone(), p2.clone()],
                },
            )
            .await
            .unwrap();

        let p3 = PeerConfig {
            persistent_keepalive: Some(25),
            ..peer(
                &k3,
                Some("198.18.0.3:3000"),
                &["100.64.1.3/32", "100.64.2.0/24"],
            )
        };
        backend.set_peer(dev, &p3).await.unwrap();
        let peers = wg_show(dev, "peers");
        assert_eq!(peers.lines().count(), 3, "{peers}");
        assert!(wg_show(dev, "persistent-keepalive").contains(&format!("{}\t25", k3.public())));

        // Updating p2 replaces its allowed IPs and endpoint, and nothing of p1.
        let p2b = peer(&k2, Some("198.18.0.22:2222"), &["100.64.1.22/32"]);
        backend.set_peer(dev, &p2b).await.unwrap();
        let allowed = wg_show(dev, "allowed-ips");
        assert!(
            allowed.contains(&format!("{}\t100.64.1.22/32", k2.public())),
            "{allowed}"
        );
        assert!(!allowed.contains("100.64.1.2/32"), "{allowed}");
        assert!(
            allowed.contains(&format!("{}\t100.64.1.1/32", k1.public())),
            "{allowed}"
        );
        let endpoints = wg_show(dev, "endpoints");
        assert!(
            endpoints.contains(&format!("{}\t198.18.0.1:1000", k1.public())),
            "{endpoints}"
        );
        assert!(
            endpoints.contains(&format!("{}\t198.18.0.22:2222", k2.public())),
            "{endpoints}"
        );

        backend.remove_peer(dev, &k1.public()).await.unwrap();
        let peers = wg_show(dev, "peers");
        assert_eq!(peers.lines().count(), 2, "{peers}");
        assert!(!peers.contains(&k1.public().to_base64()));
        // Removing an absent peer is fine and changes nothing.
        backend.remove_peer(dev, &k1.public()).await.unwrap();
        assert_eq!(wg_show(dev, "peers").lines().count(), 2);

        let status = backend.status(dev).await.unwrap();
        let mut keys: Vec<Key> = status.peers.iter().map(|p| p.public_key).collect();
        keys.sort();
        let mut want = vec![k2.public(), k3.public()];
        want.sort();
        assert_eq!(keys, want);
        let s3 = status
            .peers
            .iter()
            .find(|p| p.public_key == k3.public())
            .unwrap();
        assert_eq!(s3.allowed_ips, p3.allowed_ips);
        assert_eq!(s3.last_handshake, None);
        backend.delete(dev).await.unwrap();
    });
}

#[test]
fn configure_replaces_the_whole_peer_set() {
    with_device(async |backend, dev| {
        let before = peer(&new_key(), None, &["100.64.1.1/32"]);
        backend.set_peer(dev, &before).await.unwrap();
        let k4 = new_key();
        backend
            .configure(
                dev,
                &DeviceConfig {
                    private_key: new_key(),
                    listen_port: Some(40000),
                    peers: vec![peer(&k4, None, &["100.64.1.4/32"])],
                },
            )
            .await
            .unwrap();
        assert_eq!(wg_show(dev, "peers").trim(), k4.public().to_base64());
        assert_eq!(wg_show(dev, "listen-port").trim(), "40000");

        backend.delete(dev).await.unwrap();
    });
}

#[test]
fn many_peers_and_allowed_ips_go_in_and_come_back() {
    // More than one netlink message's worth, with one peer whose allowed IPs alone need
    // several: what an exit node with many containers configures on a restart.
    let ip = |i: usize| format!("100.{}.{}.{}/32", 64 + i / 65536, (i / 256) % 256, i % 256);
    let mut peers: Vec<PeerConfig> = (0..300)
        .map(|i| PeerConfig {
            persistent_keepalive: Some(25),
            ..peer(&new_key(), Some("198.18.0.1:51820"), &[&ip(i)])
        })
        .collect();
    let wide: Vec<String> = (1000..1700).map(ip).collect();
    let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
    peers.push(peer(&new_key(), None, &wide));
    with_device(async |backend, dev| {
        let private_key = new_key();
        backend
            .configure(
                dev,
                &DeviceConfig {
                    private_key,
                    listen_port: Some(40001),
                    peers: peers.clone(),
                },
            )
            .await
            .unwrap();
        let status = backend.status(dev).await.unwrap();
        assert_eq!(status.public_key, Some(private_key.public()));
        assert_eq!(status.listen_port, 40001);
        // Compared as sets: the kernel lists allowed IPs in its own order.
        let sorted = |mut ips: Vec<IpNet>| {
            ips.sort();
            ips
        };
        let mut got: Vec<(Key, Vec<IpNet>)> = status
            .peers
            .into_iter()
            .map(|p| (p.public_key, sorted(p.allowed_ips)))
            .collect();
        let mut want: Vec<(Key, Vec<IpNet>)> = peers
            .iter()
            .map(|p| (p.public_key, sorted(p.allowed_ips.clone())))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "the device's peers differ from those configured"
        );
        assert_eq!(wg_show(dev, "peers").lines().count(), peers.len());
        backend.delete(dev).await.unwrap();
    });
}

#[test]
fn delete_removes_link_process_and_socket() {
    if !is_root() {
        return;
    }
    let mut world = World::new();
    let home = world.netns();
    let elsewhere = world.netns();
    let dev = world.device();
    enter(&home);
    runtime().block_on(async {
        let backend = Backend::open(BackendKind::Userspace).unwrap();
        // Called from a thread in another namespace, the device still lands in `home`.
        enter(&elsewhere);
        let pid = match &backend {
            Backend::Userspace(u) => u.create_device(&dev).await.unwrap(),
            Backend::Kernel(_) => unreachable!(),
        };
        assert_eq!(pid_of(&dev), Some(pid));
        assert!(is_wireguard_go_for(pid, &dev));
        // It outlives its starter: a process group of its own (a signal to the starter's
        // group misses it), in the starter's session (a session of its own would be a
        // scheduling group of its own), output to a file, not a pipe.
        let raw = nix::unistd::Pid::from_raw(pid as i32);
        assert_eq!(nix::unistd::getpgid(Some(raw)).unwrap(), raw);
        assert_eq!(
            nix::unistd::getsid(Some(raw)).unwrap(),
            nix::unistd::getsid(None).unwrap()
        );
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap(),
            std::fs::canonicalize(log_path(&dev)).unwrap()
        );
        assert!(link_exists(&home, &dev));
        assert!(!link_exists(&elsewhere, &dev));
        assert!(socket_path(&dev).exists());

        assert!(matches!(
            backend.create(&dev).await,
            Err(WgError::AlreadyExists(_))
        ));

        backend.delete(&dev).await.unwrap();
        assert!(!link_exists(&home, &dev));
        assert!(!is_wireguard_go_for(pid, &dev));
        // Reaped, not left as a zombie of this long-running process.
        let deadline = Instant::now() + Duration::from_secs(1);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "wireguard-go {pid} not reaped");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!socket_path(&dev).exists());
        assert!(!log_path(&dev).exists());
        assert_eq!(pid_of(&dev), None);
        assert!(!backend.exists(&dev).await);

        // Idempotent, and errors for the other operations name the problem.
        backend.delete(&dev).await.unwrap();
        assert!(matches!(
            backend.status(&dev).await,
            Err(WgError::NoSuchDevice(_))
        ));
        assert!(matches!(
            backend.create("this-name-is-too-long").await,
            Err(WgError::InvalidName(_))
        ));
        assert!(matches!(
            backend.create("../etc").await,
            Err(WgError::InvalidName(_))
        ));
    });
}

#[test]
fn wireguard_go_failure_and_stale_socket() {
    if !is_root() {
        return;
    }
    let mut world = World::new();
    let ns = world.netns();
    let dev = world.device();
    // A non-TUN link already has the name.
    ip(&[
        "-n",
        &ns,
        "link",
        "add",
        &dev,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{dev}p"),
    ]);
    enter(&ns);
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("wireguard-go");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"boom: cannot create $1\" >&2\nexit 1\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&fake)
        .status()
        .unwrap();
    runtime().block_on(async {
        let backend = Backend::open(BackendKind::Userspace).unwrap();
        assert!(matches!(
            backend.create(&dev).await,
            Err(WgError::AlreadyExists(_))
        ));
        ip(&["-n", &ns, "link", "del", &dev]);

        let Backend::Userspace(real) = backend else {
            unreachable!()
        };
        let broken = userspace::UserspaceBackend::open()
            .unwrap()
            .with_binary(fake.clone());
        let started = Instant::now();
        match broken.create(&dev).await {
            Err(WgError::WireguardGoFailed { detail, .. }) => {
                assert!(detail.contains("boom: cannot create"), "{detail}");
            }
            other => panic!("expected WireguardGoFailed, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!log_path(&dev).exists());

        // A stale, unserved socket left by a crash does not hold up a new device.
        std::fs::create_dir_all(uapi::SOCKET_DIR).unwrap();
        drop(std::os::unix::net::UnixListener::bind(socket_path(&dev)).unwrap());
        assert!(!real.exists(&dev).await);
        let pid = real.create_device(&dev).await.unwrap();
        assert!(is_wireguard_go_for(pid, &dev));
        real.delete(&dev).await.unwrap();
        assert!(!socket_path(&dev).exists());
    });
}

#[test]
fn kernel_backend_needs_the_module() {
    if !is_root() {
        return;
    }
    if std::path::Path::new("/sys/module/wireguard").exists() {
        eprintln!("skipped: this kernel has the WireGuard module");
        return;
    }
    let mut world = World::new();
    let ns = world.netns();
    enter(&ns);
    runtime().block_on(async {
        match Backend::open(BackendKind::Kernel) {
            Err(WgError::KernelModuleMissing(why)) => {
                let message = WgError::KernelModuleMissing(why).to_string();
                assert!(message.contains("no WireGuard module"), "{message}");
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("kernel backend opened without the module"),
        }
        let auto = Backend::open(BackendKind::Auto).unwrap();
        assert_eq!(auto.kind(), BackendKind::Userspace);
    });
}

#[test]
fn open_outside_a_runtime_fails_cleanly() {
    assert!(matches!(
        Backend::open(BackendKind::Userspace),
        Err(WgError::NoRuntime) | Err(WgError::WireguardGoMissing(_))
    ));
}

#[test]
fn names_are_validated() {
    assert!(validate_name("wgt0123abcd").is_ok());
    assert!(validate_name("a23456789012345").is_ok());
    for bad in ["", "a234567890123456", ".", "..", "a/b", "a b", "a:b"] {
        assert!(validate_name(bad).is_err(), "{bad:?}");
    }
}
