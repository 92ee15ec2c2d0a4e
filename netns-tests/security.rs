//! Nobody let in: containers cannot spoof, reach the exit node, the host or each other
//! through the tunnel; tokens are scoped, owners checked, failures rate limited, secrets
//! never logged, and state owner-only.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;

use crate::world::{
    sh, try_sh, Container, Settings, World, EGRESS_IP, OTHER_TOKEN, SECOND_TOKEN, TOKEN,
};

/// TCP from inside `c` to `url` with curl (optionally from `source`): whether it got an answer.
fn curl_from(c: &Container, url: &str, source: Option<&str>) -> bool {
    let mut args = vec!["ip", "netns", "exec", &c.netns, "curl", "-sk", "-m", "1"];
    if let Some(s) = source {
        args.extend(["--interface", s]);
    }
    args.push(url);
    try_sh(&args).status.success()
}

/// Packets counted on `c`'s eth0: (rx, tx).
fn eth0_packets(c: &Container) -> (u64, u64) {
    let v: Value = serde_json::from_str(&sh(&[
        "ip", "-n", &c.netns, "-j", "-s", "link", "show", "eth0",
    ]))
    .unwrap();
    let s = &v[0]["stats64"];
    (
        s["rx"]["packets"].as_u64().unwrap(),
        s["tx"]["packets"].as_u64().unwrap(),
    )
}

fn address_of(r: &Value) -> String {
    r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_string()
}

#[test]
fn containers_cannot_spoof_or_reach_the_exit_the_host_or_each_other() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let a = w.container("a");
    let b = w.container("b");
    w.cni("ADD", &a, &conf).ok();
    let rb = w.cni("ADD", &b, &conf).ok();
    let echo = format!("http://{}/", crate::world::ECHO);
    assert!(curl_from(&a, &echo, None));

    // Spoofing: A sends from B's address, from another pool address and from outside the
    // pool. The packets leave A through the tunnel and die at the exit node (WireGuard's
    // cryptokey routing: a peer may only use its own address).
    for spoofed in [address_of(&rb), "100.96.0.200".into(), "198.18.5.5".into()] {
        sh(&[
            "ip",
            "-n",
            &a.netns,
            "addr",
            "add",
            &format!("{spoofed}/32"),
            "dev",
            "eth0",
        ]);
        let (_, tx) = eth0_packets(&a);
        assert!(
            !curl_from(&a, &echo, Some(&spoofed)),
            "{spoofed} got through"
        );
        assert!(eth0_packets(&a).1 > tx, "nothing was sent from {spoofed}");
        sh(&[
            "ip",
            "-n",
            &a.netns,
            "addr",
            "del",
            &format!("{spoofed}/32"),
            "dev",
            "eth0",
        ]);
    }

    // The exit node itself (its API, on its uplink address and its overlay address): the
    // input drop counts them.
    let input = "acme: no access to the exit node";
    let before = w.nft_counter(input);
    assert!(!curl_from(&a, "https://198.51.100.2:7443/healthz", None));
    assert!(!curl_from(&a, "https://100.96.0.1:7443/healthz", None));
    assert!(w.nft_counter(input) >= before + 2);
    // (ping of the overlay gateway is the one thing allowed, for diagnostics)
    let ping = try_sh(&[
        "ip",
        "netns",
        "exec",
        &a.netns,
        "ping",
        "-c1",
        "-W2",
        "100.96.0.1",
    ]);
    assert!(
        ping.status.success(),
        "{ping:?}\n{}",
        sh(&["ip", "netns", "exec", &w.exit, "nft", "list", "table", "inet", "wgexitd"])
    );

    // The host and the other container: not forwarded, counted, and B sees nothing.
    let forward = "acme: no other forwarding in";
    let before = w.nft_counter(forward);
    let (b_rx, _) = eth0_packets(&b);
    assert!(!curl_from(
        &a,
        &format!("http://{}:8080/", crate::world::HOST_IP),
        None
    ));
    assert!(!curl_from(
        &a,
        &format!("http://{}:8080/", address_of(&rb)),
        None
    ));
    assert!(w.nft_counter(forward) >= before + 2);
    assert_eq!(eth0_packets(&b).0, b_rx, "B received packets from A");

    // And the real thing still works.
    assert_eq!(w.echo_from(&a).unwrap(), EGRESS_IP);
    assert_eq!(w.echo_from(&b).unwrap(), EGRESS_IP);
}

#[test]
fn tokens_are_scoped_per_egress_and_owner_and_never_logged() {
    let mut w = World::with(Settings {
        log_filter: Some("debug".into()),
        ..Settings::default()
    });
    let conf = w.net_conf("acme");
    let c = w.container("c");
    w.cni("ADD", &c, &conf).ok();
    let leases = w.leases("acme", TOKEN);
    let key = leases[0]["public_key"].as_str().unwrap().to_string();
    let path = format!(
        "/v1/egress/acme/leases/{}",
        key.replace('+', "-").replace('/', "_")
    );
    let body = serde_json::json!({ "public_key": key, "attachment": { "container_id": "x", "ifname": "eth0", "host": "h" } }).to_string();

    // A token of egress "other" can do nothing in "acme": 401 for lease, list, release, info.
    assert_eq!(
        w.api_with(
            "POST",
            "/v1/egress/acme/leases",
            Some(OTHER_TOKEN),
            Some(&body),
            &[]
        )
        .0,
        401
    );
    assert_eq!(
        w.api_raw("GET", "/v1/egress/acme/leases", Some(OTHER_TOKEN))
            .0,
        401
    );
    assert_eq!(w.api_raw("DELETE", &path, Some(OTHER_TOKEN)).0, 401);
    assert_eq!(
        w.api_raw("GET", "/v1/egress/acme", Some(OTHER_TOKEN)).0,
        401
    );
    // ...and the lease is not in "other" either.
    let other_path = path.replace("/acme/", "/other/");
    assert_eq!(w.api_raw("DELETE", &other_path, Some(OTHER_TOKEN)).0, 404);

    // Another token of the same egress may list, but not release or take over the lease.
    assert_eq!(
        w.api_raw("GET", "/v1/egress/acme/leases", Some(SECOND_TOKEN))
            .0,
        200
    );
    let (code, msg) = w.api_raw("DELETE", &path, Some(SECOND_TOKEN));
    assert_eq!(code, 403, "{msg}");
    assert!(msg.contains("another token"), "{msg}");
    assert_eq!(
        w.api_with(
            "POST",
            "/v1/egress/acme/leases",
            Some(SECOND_TOKEN),
            Some(&body),
            &[]
        )
        .0,
        403
    );

    // A wrong token leaves no trace: no lease, no peer.
    let stranger = wgexit::keys::Key::generate_private().unwrap().public();
    let body2 = body.replace(&key, &stranger.to_base64());
    let wrong = "not-a-token-of-anything-at-all";
    assert_eq!(
        w.api_with(
            "POST",
            "/v1/egress/acme/leases",
            Some(wrong),
            Some(&body2),
            &[]
        )
        .0,
        401
    );
    assert_eq!(w.leases("acme", TOKEN), leases);
    assert_eq!(w.exit_peers().len(), 1);
    // The lease is intact and still works; its owner releases it.
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    w.cni("DEL", &c, &conf).ok_empty();
    assert!(w.leases("acme", TOKEN).is_empty());

    // No token appears in the daemon's log, even at debug level.
    let log = w.daemon_log();
    assert!(log.contains("DEBUG"), "log level not applied");
    for t in [TOKEN, SECOND_TOKEN, OTHER_TOKEN, wrong] {
        assert!(!log.contains(t), "token {t} logged");
    }
}

#[test]
fn failed_authentication_is_rate_limited_per_source_and_valid_tokens_pass() {
    let mut w = World::new();
    let c = w.container("rl");
    let headers = w.path("headers");
    let h = headers.display().to_string();
    let guess = |extra: &[&str]| {
        w.api_with(
            "GET",
            "/v1/egress/acme/leases",
            Some("guess-guess-guess-guess"),
            None,
            extra,
        )
        .0
    };
    // The burst: ten failures are answered 401; then 429 (the bucket refills at one try per
    // 2 s, so a slow machine may see a few more 401s first).
    let mut codes: Vec<u16> = (0..10).map(|_| guess(&[])).collect();
    assert!(codes.iter().all(|&c| c == 401), "{codes:?}");
    // While limited, this source's guesses get 429, but a right token from the same address
    // (a neighbour sharing a NAT, a host whose other tenant misconfigured its token) is
    // served: a 429 on a guess followed by a 200 on the right token. (If a refill slipped in
    // between, the two are tried again.)
    let mut shown = false;
    for _ in 0..20 {
        let code = guess(&["-D", &h]);
        codes.push(code);
        if code == 429 && w.api_raw("GET", "/v1/egress/acme/leases", Some(TOKEN)).0 == 200 {
            shown = true;
            break;
        }
    }
    assert!(shown, "{codes:?}");
    let head = std::fs::read_to_string(&headers).unwrap().to_lowercase();
    assert!(head.contains("retry-after: "), "{head}");
    // ...but other sources are not affected (here: the exit node's own namespace).
    let out = try_sh(&[
        "ip",
        "netns",
        "exec",
        &w.exit,
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        &w.ca_file().display().to_string(),
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        "https://198.51.100.2:7443/v1/egress/acme/leases",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    // The plugin hears "try again later" (CNI code 11). It uses a wrong token too, so a
    // refill slipping in shows as 100 (refused token), never as an attachment; then again.
    std::fs::write(w.path("guess.token"), "guess-guess-guess-guess\n").unwrap();
    let mut conf = w.net_conf("acme");
    conf["tokenFile"] = w.path("guess.token").display().to_string().into();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let (code, msg) = w.cni("ADD", &c, &conf).err();
        if code == 11 {
            assert!(msg.contains("429") || msg.contains("too many"), "{msg}");
            break;
        }
        seen.push(code);
        guess(&[]);
    }
    assert!(seen.len() < 5, "{seen:?}");
}

fn assert_owner_only(root: &Path, public: &[&str]) {
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        if entry.file_type().unwrap().is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            assert_owner_only(&path, public);
        } else if public.iter().any(|p| path.ends_with(p)) {
            assert_eq!(mode & 0o022, 0, "{}", path.display());
        } else {
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
        }
    }
}

#[test]
fn keys_state_and_leases_are_owner_only() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("c");
    w.cni("ADD", &c, &conf).ok();
    let state = w.state_dir();
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Certificates are public; everything else (keys, leases) is owner-only.
    assert_owner_only(&state, &["tls/ca.pem", "tls/cert.pem"]);
    let data = w.data_dir();
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_owner_only(&data, &[]);
    assert!(std::fs::read_dir(&data).unwrap().count() >= 2);
}
