//! A changed config never destroys leases: stored leases of a renamed egress are kept and
//! reported, restoring the name brings the same tunnels back, and `wgexitd leases prune`
//! removes them only when asked.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::world::{sh, Container, Settings, World, EGRESS_IP, TOKEN};

fn wgexitd(w: &World, args: &[&str]) -> String {
    let config = w.daemon_config();
    let mut all = vec!["ip", "netns", "exec", &w.exit, crate::world::bin("wgexitd")];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config.to_str().unwrap()]);
    sh(&all)
}

fn rename_acme(w: &World, from: &str, to: &str) {
    let path = w.daemon_config();
    let text = std::fs::read_to_string(&path).unwrap();
    let renamed = text.replace(&format!("name = \"{from}\""), &format!("name = \"{to}\""));
    assert_ne!(text, renamed);
    std::fs::write(&path, renamed).unwrap();
}

fn restart(w: &mut World) {
    w.stop_daemon(Signal::SIGTERM);
    w.start_daemon();
}

fn addresses(w: &World) -> HashMap<String, String> {
    w.leases("acme", TOKEN)
        .iter()
        .map(|l| {
            let id = l["attachment"]["container_id"].as_str().unwrap();
            (id.to_string(), l["address"].as_str().unwrap().to_string())
        })
        .collect()
}

fn reaches_the_echo_server_again(w: &World, c: &Container) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match w.echo_from_within(c, Duration::from_secs(2)) {
            Ok(ip) => return assert_eq!(ip, EGRESS_IP),
            Err(e) => assert!(
                Instant::now() < deadline,
                "{}: {e}\n{}",
                c.id,
                w.daemon_log()
            ),
        }
    }
}

#[test]
fn leases_of_a_renamed_egress_are_kept_reported_restored_and_pruned_on_request() {
    let mut w = World::with(Settings {
        daemon_extra: "collect_interval = 1\n".into(),
        ..Settings::default()
    });
    let conf = w.net_conf("acme");
    let cs: Vec<_> = (0..2).map(|i| w.container(&format!("g{i}"))).collect();
    for c in &cs {
        w.cni("ADD", c, &conf).ok();
    }
    // Long enough for the exit node to note where its peers are.
    std::thread::sleep(Duration::from_millis(2500));
    let before = addresses(&w);
    assert_eq!(before.len(), 2);

    // Renamed while stopped: check-config (reading the store itself) reports both.
    w.stop_daemon(Signal::SIGTERM);
    rename_acme(&w, "acme", "acme2");
    let checked = wgexitd(&w, &["check-config"]);
    assert_eq!(
        checked.matches("stored lease without a place").count(),
        2,
        "{checked}"
    );
    // Started so, the daemon reports them, and check-config asks it while it runs.
    w.start_daemon();
    assert_eq!(
        w.daemon_log().matches("does not fit the config").count(),
        2,
        "{}",
        w.daemon_log()
    );
    let checked = wgexitd(&w, &["check-config"]);
    assert_eq!(
        checked.matches("stored lease without a place").count(),
        2,
        "{checked}"
    );

    // The name restored: the same leases, the same addresses, the tunnels back.
    rename_acme(&w, "acme2", "acme");
    restart(&mut w);
    assert_eq!(addresses(&w), before);
    for c in &cs {
        reaches_the_echo_server_again(&w, c);
    }
    assert!(!w.daemon_log().contains("does not fit the config"));

    // Pruned on request only: through the running daemon.
    rename_acme(&w, "acme", "acme2");
    restart(&mut w);
    let pruned = wgexitd(&w, &["leases", "prune"]);
    assert!(pruned.contains("2 stored lease(s) pruned"), "{pruned}");
    rename_acme(&w, "acme2", "acme");
    restart(&mut w);
    assert!(addresses(&w).is_empty(), "{:?}", addresses(&w));
    // Nothing left to prune, and a stopped daemon's store is pruned directly.
    w.stop_daemon(Signal::SIGTERM);
    let pruned = wgexitd(&w, &["leases", "prune"]);
    assert!(pruned.contains("0 stored lease(s) pruned"), "{pruned}");
    w.start_daemon();
}
