//! The WireGuard backends: what `auto` chooses, what `kernel` says where there is no module,
//! and a restart of the daemon on whichever backend the world uses (the VM test runs these
//! with the kernel's WireGuard, see `netns-tests/vm/`).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::world::{sh, try_sh, World, EGRESS_IP, TOKEN};

/// Whether this kernel has WireGuard: loaded, built in, or a module modprobe can find.
fn kernel_has_wireguard() -> bool {
    Path::new("/sys/module/wireguard").exists()
        || try_sh(&["modprobe", "-n", "-q", "wireguard"])
            .status
            .success()
}

/// The link kind of `name` in `ns`: "wireguard" for the kernel's, "tun" for wireguard-go's.
fn link_kind(ns: &str, name: &str) -> String {
    let v: Value = serde_json::from_str(&sh(&[
        "ip", "-n", ns, "-d", "-j", "link", "show", "dev", name,
    ]))
    .unwrap();
    v[0]["linkinfo"]["info_kind"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn auto_chooses_the_kernel_module_when_there_is_one_else_wireguard_go() {
    let expected = if kernel_has_wireguard() {
        "wireguard"
    } else {
        "tun"
    };
    let mut w = World::with_backend("auto");
    let conf = w.net_conf("acme");
    let c = w.container("auto");
    w.cni("ADD", &c, &conf).ok();
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    assert_eq!(link_kind(&w.exit, &w.wg_interface), expected, "exit node");
    assert_eq!(link_kind(&c.netns, "eth0"), expected, "container");
    w.cni("DEL", &c, &conf).ok_empty();
    assert_eq!(w.links(&c.netns), vec!["lo"]);
}

#[test]
fn backend_kernel_without_the_module_is_refused_by_plugin_and_daemon() {
    if kernel_has_wireguard() {
        eprintln!("skipped: this kernel has WireGuard (the VM test covers backend \"kernel\")");
        return;
    }
    let mut w = World::with_backend("userspace");
    let mut conf = w.net_conf("acme");
    conf["backend"] = "kernel".into();
    let c = w.container("nokmod");
    let (code, msg) = w.cni("ADD", &c, &conf).err();
    assert_eq!(code, 7, "{msg}");
    assert!(
        msg.contains("backend \"kernel\"") && msg.contains("no WireGuard module"),
        "{msg}"
    );
    assert_eq!(w.links(&c.netns), vec!["lo"]);
    assert_eq!(w.links(&w.host), vec!["lo", "up0"]);
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());

    // The daemon refuses to start, saying why.
    w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    let config = std::fs::read_to_string(w.daemon_config()).unwrap();
    let kernel_config = w.path("kernel.toml");
    std::fs::write(
        &kernel_config,
        config.replace("backend = \"userspace\"", "backend = \"kernel\""),
    )
    .unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &w.exit, crate::world::bin("wgexitd")])
        .args(["serve", "--config"])
        .arg(&kernel_config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "wgexitd started: {stderr}");
    assert!(
        stderr.contains("backend \"kernel\"") && stderr.contains("no WireGuard module"),
        "{stderr}"
    );
}

#[test]
fn a_daemon_restart_drops_no_tunnel() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("before");
    w.cni("ADD", &c, &conf).ok();
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    let peers = w.exit_peers();

    w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    w.start_daemon();
    // The tunnel made before the restart still carries traffic, with the same peer.
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP, "{}", w.daemon_log());
    assert_eq!(w.exit_peers(), peers);
    assert_eq!(w.leases("acme", TOKEN).len(), 1);
    // And the restarted daemon serves new containers and DEL.
    let c2 = w.container("after");
    w.cni("ADD", &c2, &conf).ok();
    assert_eq!(w.echo_from(&c2).unwrap(), EGRESS_IP);
    for c in [&c, &c2] {
        w.cni("DEL", c, &conf).ok_empty();
        assert_eq!(w.links(&c.netns), vec!["lo"]);
    }
    assert!(w.exit_peers().is_empty());
    assert!(w.leases("acme", TOKEN).is_empty());
}
