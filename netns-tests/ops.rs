//! Operating an exit node: `/metrics` on its own listener (checked by Prometheus' own
//! `promtool`), and `wgexitd status` (text and JSON) from the running daemon.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::world::{World, EGRESS_IP, OTHER_TOKEN, TOKEN};

/// The value of the sample `name` whose labels include `labels`.
pub(crate) fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            return None;
        }
        let have: BTreeMap<&str, &str> = rest
            .trim_end_matches('}')
            .split("\",")
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
        labels
            .iter()
            .all(|(k, v)| have.get(k) == Some(v))
            .then(|| value.parse().ok())?
    })
}

pub(crate) fn promtool_check(body: &str) -> Output {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/deps installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn metrics_after_a_few_leases_pass_promtool_and_stay_off_the_api() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let cs: Vec<_> = (0..3).map(|i| w.container(&format!("m{i}"))).collect();
    for c in &cs {
        w.cni("ADD", c, &conf).ok();
    }
    w.cni("DEL", &cs[2], &conf).ok_empty();
    assert_eq!(w.echo_from(&cs[0]).unwrap(), EGRESS_IP);
    // One refused token.
    assert_eq!(
        w.api_raw("GET", "/v1/egress/acme/leases", Some(OTHER_TOKEN))
            .0,
        401
    );

    let body = w.metrics();
    let acme = [("egress", "acme")];
    let expect = [
        ("wgexit_leases", &acme[..], 2.0),
        ("wgexit_pool_capacity", &acme[..], 253.0),
        (
            "wgexit_egress_ip_leases",
            &[("egress", "acme"), ("ip", EGRESS_IP)][..],
            2.0,
        ),
        (
            "wgexit_peers",
            &[("egress", "acme"), ("handshake_age", "0-30s")][..],
            2.0,
        ),
        (
            "wgexit_peers",
            &[("egress", "acme"), ("handshake_age", "never")][..],
            0.0,
        ),
        ("wgexit_leases_granted_total", &acme[..], 3.0),
        ("wgexit_leases_released_total", &acme[..], 1.0),
        (
            "wgexit_reconcile_repairs_total",
            &[("egress", "acme"), ("repair", "device_created")][..],
            1.0,
        ),
        ("wgexit_firewall_applies_total", &[][..], 1.0),
        (
            "wgexit_leader",
            &[("kind", "egress"), ("name", "acme")][..],
            1.0,
        ),
        ("wgexit_auth_failures_total", &[][..], 1.0),
        (
            "wgexit_api_requests_total",
            &[
                ("route", "/v1/egress/{egress}/leases"),
                ("method", "POST"),
                ("status", "200"),
            ][..],
            3.0,
        ),
        (
            "wgexit_api_requests_total",
            &[
                ("route", "/v1/egress/{egress}/leases"),
                ("method", "GET"),
                ("status", "401"),
            ][..],
            1.0,
        ),
        (
            "wgexit_api_request_duration_seconds_count",
            &[
                ("route", "/v1/egress/{egress}/leases/{key}"),
                ("method", "DELETE"),
            ][..],
            1.0,
        ),
    ];
    for (name, labels, value) in expect {
        assert_eq!(
            sample(&body, name, labels),
            Some(value),
            "{name} {labels:?} in\n{body}"
        );
    }
    // The curl through the tunnel moved bytes both ways.
    for name in [
        "wgexit_tunnel_received_bytes_total",
        "wgexit_tunnel_transmitted_bytes_total",
    ] {
        assert!(
            sample(&body, name, &acme).unwrap_or(0.0) > 0.0,
            "{name}: {body}"
        );
    }
    let checked = promtool_check(&body);
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    println!(
        "promtool check metrics accepted {} lines",
        body.lines().count()
    );

    // Not on the API port; nothing but /metrics on the metrics port.
    let (code, answer) = w.api_raw("GET", "/metrics", None);
    assert_eq!(code, 404, "{answer}");
    assert_eq!(w.metrics_raw("/v1/egress/acme/leases").0, 404);
    for c in &cs[..2] {
        w.cni("DEL", c, &conf).ok_empty();
    }
}

fn status(w: &World, args: &[&str]) -> Output {
    Command::new(crate::world::bin("wgexitd"))
        .arg("status")
        .arg("--config")
        .arg(w.daemon_config())
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "wgexitd status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn status_shows_the_egress_its_leases_and_peers() {
    use std::os::unix::fs::PermissionsExt;
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let cs: Vec<_> = (0..2).map(|i| w.container(&format!("s{i}"))).collect();
    for c in &cs {
        w.cni("ADD", c, &conf).ok();
    }
    assert_eq!(w.echo_from(&cs[0]).unwrap(), EGRESS_IP);
    let socket = w.state_dir().join("control.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", socket.display());

    let report: Value = serde_json::from_str(&stdout(&status(&w, &["--json"]))).unwrap();
    let acme = report["egress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "acme")
        .unwrap_or_else(|| panic!("no egress acme in {report}"));
    assert_eq!(acme["ips"], serde_json::json!([EGRESS_IP]));
    assert_eq!(acme["leases"], 2);
    assert_eq!(acme["capacity"], 253);
    assert_eq!(acme["peers"]["total"], 2);
    assert_eq!(acme["peers"]["live"], 2);
    assert_eq!(acme["peers"]["never"], 0);
    assert!(
        acme["peers"]["newest_handshake_age_seconds"]
            .as_u64()
            .unwrap()
            < 30
    );
    assert!(acme["peers"]["received_bytes"].as_u64().unwrap() > 0);
    assert!(acme.get("peer_list").is_none(), "rows only with --peers");

    let with_rows: Value =
        serde_json::from_str(&stdout(&status(&w, &["--json", "--peers"]))).unwrap();
    let rows = with_rows["egress"][0]["peer_list"].as_array().unwrap();
    let mut containers: Vec<&str> = rows
        .iter()
        .map(|r| r["container_id"].as_str().unwrap())
        .collect();
    containers.sort();
    assert_eq!(containers, [cs[0].id.as_str(), cs[1].id.as_str()]);

    let text = stdout(&status(&w, &[]));
    println!("{text}");
    assert!(text.contains("egress acme"), "{text}");
    assert!(text.contains("2 of 253 leased"), "{text}");
    assert!(text.contains("2: 2 live, 0 idle"), "{text}");

    for c in &cs {
        w.cni("DEL", c, &conf).ok_empty();
    }
    let after: Value = serde_json::from_str(&stdout(&status(&w, &["--json"]))).unwrap();
    assert_eq!(after["egress"][0]["leases"], 0);
    assert!(w.leases("acme", TOKEN).is_empty());

    // With the daemon gone, status says so.
    w.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    let out = status(&w, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach wgexitd"), "{err}");
}
