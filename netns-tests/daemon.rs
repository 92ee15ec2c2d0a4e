//! `wgexitd` itself: config checking, the API's auth and error shape, teardown.

use std::process::Command;

use crate::world::{require_root, Settings, World, EGRESS_IP, OTHER_TOKEN, TOKEN};

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &path,
        text.replace("/nonexistent/wgexitd-test", &state.display().to_string()),
    )
    .unwrap();
    let out = Command::new(crate::world::bin("wgexitd"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn malformed_configs_are_refused_naming_the_key() {
    require_root();
    let base = r#"state_dir = "/nonexistent/wgexitd-test"
[api]
listen = "198.51.100.2:7443"
[[egress]]
name = "acme"
ip = "203.0.113.77"
interface = "isp0"
pool = "100.96.0.0/20"
wg_interface = "wgx-acme"
listen_port = 51820
endpoint = "198.51.100.2:51820"
token_file = "/nonexistent/acme.tokens"
"#;
    for (from, to, key) in [
        (
            "ip = \"203.0.113.77\"",
            "ip = \"203.0.113\"",
            "egress[0].ip",
        ),
        (
            "pool = \"100.96.0.0/20\"",
            "pool = \"100.96.0.0\"",
            "egress[0].pool",
        ),
        (
            "listen = \"198.51.100.2:7443\"",
            "listen = \"198.51.100.2\"",
            "api.listen",
        ),
        (
            "listen_port = 51820",
            "listen_port = \"many\"",
            "listen_port",
        ),
        ("name = \"acme\"", "nmae = \"acme\"", "nmae"),
    ] {
        let (ok, stderr) = check_config(&base.replace(from, to));
        assert!(!ok, "{to:?} accepted");
        assert!(stderr.contains(key), "{to:?}: {stderr:?} should name {key}");
    }
    // Valid TOML, but the token file is missing: named too.
    let (ok, stderr) = check_config(base);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/acme.tokens"), "{stderr}");
    assert!(!std::path::Path::new("/nonexistent").exists());
}

#[test]
fn api_is_tls_only_scoped_per_egress_and_answers_json_errors() {
    let w = World::new();
    // A token of egress "other" cannot list or lease in "acme", and vice versa.
    let (code, body) = w.api_raw("GET", "/v1/egress/acme/leases", Some(OTHER_TOKEN));
    assert_eq!(code, 401, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"], "unauthorized");
    assert!(err["message"].as_str().unwrap().contains("acme"));
    assert_eq!(w.api_raw("GET", "/v1/egress/acme/leases", None).0, 401);
    assert_eq!(
        w.api_raw("GET", "/v1/egress/other/leases", Some(OTHER_TOKEN))
            .0,
        200
    );
    assert_eq!(
        w.api_raw("GET", "/v1/egress/acme/leases", Some(TOKEN)).0,
        200
    );
    // A malformed lease request is a JSON 400.
    let (code, body) = w.api_raw("POST", "/v1/egress/acme/leases", Some(TOKEN));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("bad_request"));
    // Plain HTTP gets no API.
    let out = crate::world::try_sh(&[
        "ip",
        "netns",
        "exec",
        &w.host,
        "curl",
        "-s",
        "-m",
        "3",
        "http://198.51.100.2:7443/healthz",
    ]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ok"));
    // Metrics are on their own listener, not on the API.
    assert_eq!(w.api_raw("GET", "/metrics", None).0, 404);
    assert!(w.metrics().contains("wgexit_auth_failures_total"));
}

#[test]
fn teardown_removes_interfaces_and_table_and_sigterm_leaves_them() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("c");
    w.cni("ADD", &c, &conf).ok();
    w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    // After a clean stop the tunnel stays up, and so do the fail-closed routing rules.
    assert!(w.links(&w.exit).contains(&w.wg_interface));
    let mine = |w: &World| {
        let iif = format!("iif {} ", w.wg_interface);
        guard_rules(w).iter().filter(|r| r.contains(&iif)).count()
    };
    assert_eq!(mine(&w), 2, "one per family: {:?}", guard_rules(&w));
    assert_eq!(w.echo_from(&c).unwrap(), crate::world::EGRESS_IP);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &w.exit,
            crate::world::bin("wgexitd"),
            "teardown",
            "--config",
        ])
        .arg(w.daemon_config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!w.links(&w.exit).contains(&w.wg_interface));
    let nft = crate::world::try_sh(&[
        "ip", "netns", "exec", &w.exit, "nft", "list", "table", "inet", "wgexitd",
    ]);
    assert!(!nft.status.success(), "table still there");
    assert_eq!(guard_rules(&w), Vec::<String>::new());
    assert!(w.echo_from(&c).is_err());
}

/// The exit node's `prohibit` routing rules (both families), as `ip rule` prints them.
fn guard_rules(w: &World) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let listing = crate::world::sh(&["ip", family, "-n", &w.exit, "rule"]);
        out.extend(
            listing
                .lines()
                .filter(|l| l.contains("prohibit"))
                .map(str::to_owned),
        );
    }
    out
}

/// Counts, in `ns`, packets arriving with a source in `net`.
/// Counts packets whose source lies in `net` arriving in namespace `ns`.
pub fn capture_sources(ns: &str, net: &str) -> impl Fn() -> u64 {
    let nft = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", ns, "nft"];
        all.extend_from_slice(args);
        crate::world::sh(&all)
    };
    nft(&["add", "table", "inet", "capture"]);
    nft(&["add chain inet capture in { type filter hook prerouting priority -300; }"]);
    nft(&[
        "add", "rule", "inet", "capture", "in", "ip", "saddr", net, "counter",
    ]);
    let ns = ns.to_owned();
    move || {
        let listing = crate::world::sh(&[
            "ip", "netns", "exec", &ns, "nft", "list", "chain", "inet", "capture", "in",
        ]);
        let at = listing.find("packets ").expect("a counter") + "packets ".len();
        listing[at..].split(' ').next().unwrap().parse().unwrap()
    }
}

#[test]
fn a_flushed_ruleset_is_restored_within_a_reconcile_interval_and_nothing_leaks_meanwhile() {
    let mut w = World::with(Settings {
        daemon_extra: "reconcile_interval = 3\n".into(),
        ..Settings::default()
    });
    let conf = w.net_conf("acme");
    let c = w.container("c");
    w.cni("ADD", &c, &conf).ok();
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    let leaked = capture_sources(&w.isp, crate::world::POOL);
    let mine = |w: &World| {
        let iif = format!("iif {} ", w.wg_interface);
        guard_rules(w).iter().filter(|r| r.contains(&iif)).count()
    };
    assert_eq!(mine(&w), 2, "one per family: {:?}", guard_rules(&w));

    crate::world::sh(&["ip", "netns", "exec", &w.exit, "nft", "flush", "ruleset"]);
    let flushed = std::time::Instant::now();
    let during = w.echo_from(&c);
    let still_missing = !crate::world::try_sh(&[
        "ip", "netns", "exec", &w.exit, "nft", "list", "table", "inet", "wgexitd",
    ])
    .status
    .success();
    if still_missing {
        assert!(during.is_err(), "{during:?} while the table was gone");
    }
    assert_eq!(
        leaked(),
        0,
        "packets with an overlay source reached the isp"
    );

    // Back within one interval (plus a request's time), from the egress IP again.
    let restored = loop {
        if let Ok(ip) = w.echo_from(&c) {
            break ip;
        }
        assert!(
            flushed.elapsed() < std::time::Duration::from_secs(10),
            "{}",
            w.daemon_log()
        );
    };
    assert_eq!(restored, EGRESS_IP);
    assert!(flushed.elapsed() < std::time::Duration::from_secs(8));
    assert_eq!(leaked(), 0);
    assert!(
        w.daemon_log().contains("firewall had drifted"),
        "{}",
        w.daemon_log()
    );
}
