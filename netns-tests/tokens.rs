//! Tokens as operators use them: rotated without orphaning leases, a neighbour's bad
//! tokens locking nobody out, a per-owner quota, and each token seeing its own leases.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::world::{Settings, World, EGRESS_IP, SECOND_TOKEN, TOKEN};

const OLD: &str = "old-secret-0123456789abcdef";
const NEW: &str = "new-secret-0123456789abcdef";

/// Polls the API with `token` until it is accepted (the daemon re-reads token files on
/// SIGHUP; the signal is handled asynchronously).
fn wait_accepted(w: &World, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.api_raw("GET", "/v1/egress/acme/leases", Some(token)).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "token never accepted: {}",
            w.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_rotated_token_releases_the_leases_the_old_one_made() {
    let mut w = World::new();
    std::fs::write(w.path("acme.tokens"), format!("team-a:{OLD}\n")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.daemon_pid().unwrap() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    wait_accepted(&w, OLD);
    std::fs::write(w.path("acme.token"), format!("{OLD}\n")).unwrap();
    let conf = w.net_conf("acme");
    let c = w.container("rot");
    w.cni("ADD", &c, &conf).ok();
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);

    // Rotation: the file is edited (no signal; the daemon notices the change) and the host
    // gets the new token.
    std::fs::write(w.path("acme.tokens"), format!("team-a:{NEW}\n")).unwrap();
    wait_accepted(&w, NEW);
    // The old one is refused (401, or 429 after the polling above failed often).
    let refused = w.api_raw("GET", "/v1/egress/acme/leases", Some(OLD)).0;
    assert!(refused == 401 || refused == 429, "{refused}");
    std::fs::write(w.path("acme.token"), format!("{NEW}\n")).unwrap();
    assert_eq!(
        w.leases("acme", NEW).len(),
        1,
        "the new token sees the old token's lease"
    );
    w.cni("DEL", &c, &conf).ok_empty();
    assert!(w.leases("acme", NEW).is_empty());
    assert!(w.exit_peers().is_empty(), "{:?}", w.exit_peers());
}

#[test]
fn a_neighbours_bad_tokens_do_not_stop_a_host_from_leasing() {
    let mut w = World::new();
    for _ in 0..30 {
        w.api_raw(
            "GET",
            "/v1/egress/acme/leases",
            Some("guess-guess-guess-guess"),
        );
    }
    // The same host (source address) now is over the failure limit for wrong tokens...
    assert_eq!(
        w.api_raw(
            "GET",
            "/v1/egress/acme/leases",
            Some("guess-guess-guess-guess")
        )
        .0,
        429
    );
    // ...and a container with the right token is added all the same.
    let conf = w.net_conf("acme");
    let c = w.container("nb");
    w.cni("ADD", &c, &conf).ok();
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
}

#[test]
fn the_quota_refuses_one_lease_too_many_and_each_token_sees_its_own() {
    let mut w = World::with(Settings {
        daemon_extra: "max_leases_per_owner = 2\n".into(),
        ..Settings::default()
    });
    let conf = w.net_conf("acme");
    let cs: Vec<_> = (0..3).map(|i| w.container(&format!("q{i}"))).collect();
    w.cni("ADD", &cs[0], &conf).ok();
    w.cni("ADD", &cs[1], &conf).ok();
    let (code, msg) = w.cni("ADD", &cs[2], &conf).err();
    assert_eq!(code, 102, "{msg}");
    assert!(msg.contains("max_leases_per_owner"), "{msg}");
    // Nothing of the refused ADD is left: no link in the host, no state.
    assert!(!w.links(&w.host).contains(&cs[2].host_ifname("eth0")));
    assert_eq!(w.leases("acme", TOKEN).len(), 2);

    // Another token of the same egress has a quota of its own, and sees only its leases.
    std::fs::write(w.path("acme.token"), format!("{SECOND_TOKEN}\n")).unwrap();
    w.cni("ADD", &cs[2], &conf).ok();
    let mine: Vec<_> = w.leases("acme", SECOND_TOKEN);
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["attachment"]["container_id"], cs[2].id.as_str());
    let theirs = w.leases("acme", TOKEN);
    assert_eq!(theirs.len(), 2);
    assert!(theirs
        .iter()
        .all(|l| l["attachment"]["container_id"] != cs[2].id.as_str()));
}
