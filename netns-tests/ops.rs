//! Operating an exit node: `/metrics` on its own listener, checked by Prometheus' own
//! `promtool`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::world::{World, EGRESS_IP, OTHER_TOKEN};

/// The value of the sample `name` whose labels include `labels`.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

fn promtool_check(body: &str) -> Output {
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
