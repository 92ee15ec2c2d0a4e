//! The CNI spec, command by command and version by version, as a runtime sees it; GC; a real
//! chain with the reference plugins; concurrent ADDs and DELs on one host.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::world::{sh, CniOutput, Container, World, EGRESS_IP, OTHER_TOKEN, TOKEN};

const VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

fn conf_at(w: &World, version: &str) -> Value {
    let mut c = w.net_conf("acme");
    c["cniVersion"] = json!(version);
    c
}

fn with(conf: &Value, key: &str, v: Value) -> Value {
    let mut c = conf.clone();
    c[key] = v;
    c
}

fn run(w: &World, command: &str, c: &Container, conf: &Value) -> CniOutput {
    w.cni(command, c, conf)
}

#[test]
fn every_command_at_every_version_answers_as_the_spec_says() {
    let mut w = World::new();
    for version in VERSIONS {
        let conf = conf_at(&w, version);
        let c = w.container(&format!("v{}", version.replace('.', "")));

        // VERSION: the version asked for, and every version supported.
        let v = run(&w, "VERSION", &c, &json!({ "cniVersion": version })).ok();
        assert_eq!(v["cniVersion"], version);
        let supported: Vec<&str> = v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(supported, VERSIONS);

        // ADD: a result in the version asked for.
        let r = run(&w, "ADD", &c, &conf).ok();
        assert_eq!(r["cniVersion"], version, "{r}");
        let iface = &r["interfaces"][0];
        assert_eq!(iface["name"], "eth0");
        assert_eq!(iface["sandbox"], c.netns_path.display().to_string());
        // A pseudo MAC by default (reportMac), locally administered unicast.
        let mac = iface["mac"]
            .as_str()
            .unwrap_or_else(|| panic!("no mac: {r}"));
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!((mac.len(), first & 0x03), (17, 0x02), "{r}");
        assert_eq!(iface.get("mtu").is_some(), version == "1.1.0", "{r}");
        let ip = &r["ips"][0];
        assert_eq!(ip["interface"], 0);
        assert!(ip["address"].as_str().unwrap().ends_with("/32"));
        assert_eq!(
            ip.get("version").and_then(Value::as_str),
            (version == "0.4.0").then_some("4"),
            "ips[].version only in 0.x: {r}"
        );
        assert_eq!(r["routes"], json!([{ "dst": "0.0.0.0/0" }]));
        assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);

        // CHECK against the result: nothing printed, success.
        let checked = with(&conf, "prevResult", r.clone());
        run(&w, "CHECK", &c, &checked).ok_empty();
        // CHECK needs prevResult.
        assert_eq!(run(&w, "CHECK", &c, &conf).err().0, 7);

        // STATUS and GC exist from 1.1.0 on; older configs get code 1.
        let status = run(&w, "STATUS", &c, &conf);
        let gc = run(
            &w,
            "GC",
            &c,
            &with(
                &conf,
                "cni.dev/valid-attachments",
                json!([{ "containerID": c.id, "ifname": "eth0" }]),
            ),
        );
        if version == "1.1.0" {
            status.ok_empty();
            gc.ok_empty();
            let refused = with(&conf, "tokenFile", json!(w.path("other.token")));
            let (code, msg) = run(&w, "STATUS", &c, &refused).err();
            assert_eq!(code, 50, "{msg}");
            let gone = with(&conf, "servers", json!(["https://198.51.100.2:1"]));
            assert_eq!(run(&w, "STATUS", &c, &gone).err().0, 50);
        } else {
            for (out, name) in [(status, "STATUS"), (gc, "GC")] {
                let (code, msg) = out.err();
                assert_eq!(code, 1, "{name} at {version}: {msg}");
                assert!(msg.contains(name), "{msg}");
                assert_eq!(out.json()["cniVersion"], version);
            }
        }
        // The GC (where it exists) left the listed attachment alone.
        assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);

        // CHECK notices what is missing, and says what.
        sh(&["ip", "-n", &c.netns, "route", "del", "default"]);
        let (code, msg) = run(&w, "CHECK", &c, &checked).err();
        assert_eq!(code, 107, "{msg}");
        assert!(msg.contains("route 0.0.0.0/0"), "{msg}");
        sh(&["ip", "-n", &c.netns, "link", "set", "eth0", "down"]);
        let (_, msg) = run(&w, "CHECK", &c, &checked).err();
        assert!(msg.contains("down"), "{msg}");

        // DEL prints nothing; CHECK of a deleted attachment: unknown container.
        run(&w, "DEL", &c, &conf).ok_empty();
        assert_eq!(run(&w, "CHECK", &c, &checked).err().0, 3);
        run(&w, "DEL", &c, &conf).ok_empty();

        // Errors are in the version asked for; environment errors are code 4.
        let out = w.cni_raw("ADD", &c.id, None, "eth0", conf.to_string().as_bytes());
        assert_eq!(out.err().0, 4);
        assert_eq!(out.json()["cniVersion"], version);
        assert_eq!(run(&w, "FROB", &c, &conf).err().0, 4);
    }
    // A version the plugin does not speak: code 1.
    let c = w.container("old");
    let (code, _) = run(&w, "ADD", &c, &conf_at(&w, "0.3.1")).err();
    assert_eq!(code, 1);
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
}

#[test]
fn run_by_hand_it_names_itself() {
    let out = Command::new(crate::world::bin("wgexit"))
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.starts_with(&format!(
            "CNI wgexit plugin v{}\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(
        text.contains("CNI protocol versions supported: 0.4.0, 1.0.0, 1.1.0"),
        "{text}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn gc_removes_what_the_runtime_no_longer_lists() {
    let mut w = World::new();
    let conf = conf_at(&w, "1.1.0");
    let keep = w.container("keep");
    let lost = w.container("lost");
    let kept = run(&w, "ADD", &keep, &conf).ok();
    run(&w, "ADD", &lost, &conf).ok();
    assert_eq!(w.leases("acme", TOKEN).len(), 2);

    let gc = with(
        &conf,
        "cni.dev/valid-attachments",
        json!([{ "containerID": keep.id, "ifname": "eth0" }]),
    );
    run(&w, "GC", &keep, &gc).ok_empty();

    // The unlisted attachment: lease, peer, link and state gone.
    let leases = w.leases("acme", TOKEN);
    assert_eq!(leases.len(), 1);
    assert_eq!(
        format!("{}/32", leases[0]["address"].as_str().unwrap()),
        kept["ips"][0]["address"].as_str().unwrap()
    );
    assert_eq!(w.exit_peers().len(), 1);
    assert_eq!(w.links(&lost.netns), vec!["lo"]);
    assert!(
        w.state_files().iter().all(|f| !f.starts_with(&lost.id)),
        "{:?}",
        w.state_files()
    );
    // The listed one is untouched.
    assert_eq!(w.echo_from(&keep).unwrap(), EGRESS_IP);
    run(&w, "CHECK", &keep, &with(&conf, "prevResult", kept)).ok_empty();

    // An empty list (under the older key) collects the rest.
    run(
        &w,
        "GC",
        &keep,
        &with(&conf, "cni.dev/attachments", json!([])),
    )
    .ok_empty();
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    assert_eq!(w.links(&keep.netns), vec!["lo"]);
}

#[test]
fn gc_without_the_valid_attachments_key_detaches_nothing() {
    let mut w = World::new();
    let conf = conf_at(&w, "1.1.0");
    let a = w.container("gca");
    let b = w.container("gcb");
    run(&w, "ADD", &a, &conf).ok();
    run(&w, "ADD", &b, &conf).ok();
    let files = w.state_files();

    // No list at all: every attachment stays, and GC says why on stderr.
    let out = run(&w, "GC", &a, &conf);
    out.ok_empty();
    for c in [&a, &b] {
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP);
        assert_eq!(w.links(&c.netns), vec!["lo", "eth0"]);
    }
    assert!(
        out.stderr.contains("no attachment detached"),
        "{}",
        out.stderr
    );
    assert_eq!(w.leases("acme", TOKEN).len(), 2);
    assert_eq!(w.exit_peers().len(), 2);
    assert_eq!(
        w.state_files().into_iter().collect::<BTreeSet<_>>(),
        files.into_iter().collect::<BTreeSet<_>>()
    );

    // An explicit empty list: every attachment goes.
    let out = run(
        &w,
        "GC",
        &a,
        &with(&conf, "cni.dev/valid-attachments", json!([])),
    );
    out.ok_empty();
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    for c in [&a, &b] {
        assert_eq!(w.links(&c.netns), vec!["lo"]);
    }
}

#[test]
fn gc_retries_a_release_that_failed_at_del() {
    let mut w = World::new();
    let conf = conf_at(&w, "1.1.0");
    let c = w.container("pending");
    run(&w, "ADD", &c, &conf).ok();
    // DEL while the exit node refuses our token: DEL succeeds, the release stays pending.
    let refused = with(&conf, "tokenFile", json!(w.path("other.token")));
    run(&w, "DEL", &c, &refused).ok_empty();
    assert_eq!(w.leases("acme", TOKEN).len(), 1);
    assert_eq!(w.links(&c.netns), vec!["lo"]);
    // GC, even with the attachment still listed, releases it.
    let gc = with(
        &conf,
        "cni.dev/valid-attachments",
        json!([{ "containerID": c.id, "ifname": "eth0" }]),
    );
    run(&w, "GC", &c, &gc).ok_empty();
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    let _ = OTHER_TOKEN;
}

/// Runs a reference plugin from /usr/lib/cni in the world's host namespace.
fn reference_plugin(
    w: &World,
    plugin: &str,
    command: &str,
    c: &Container,
    conf: &Value,
) -> CniOutput {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &w.host, &format!("/usr/lib/cni/{plugin}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &c.id)
        .env("CNI_NETNS", &c.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    CniOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn chained_between_reference_plugins() {
    // loopback → wgexit → tuning, as a runtime runs a conflist (the reference plugins here
    // speak up to 1.0.0).
    let mut w = World::new();
    for version in ["0.4.0", "1.0.0"] {
        let c = w.container(&format!("chain{}", version.replace('.', "")));
        let lo = json!({"cniVersion": version, "name": "egress", "type": "loopback"});
        let lo_result = reference_plugin(&w, "loopback", "ADD", &c, &lo).ok();
        let conf = with(&conf_at(&w, version), "prevResult", lo_result.clone());
        let r = run(&w, "ADD", &c, &conf).ok();
        // Our interface is appended to the previous result, which is passed on.
        let n = lo_result["interfaces"].as_array().map_or(0, Vec::len);
        assert_eq!(r["interfaces"].as_array().unwrap().len(), n + 1, "{r}");
        assert_eq!(r["interfaces"][n]["name"], "eth0");
        let ours = r["ips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|ip| ip["interface"] == n)
            .unwrap_or_else(|| panic!("no IP on our interface: {r}"));
        assert!(ours["address"].as_str().unwrap().starts_with("100.96.0."));
        for ip in lo_result["ips"].as_array().into_iter().flatten() {
            assert!(r["ips"].as_array().unwrap().contains(ip), "{r}");
        }
        // The next plugin takes our result as its prevResult and passes it on.
        let tuning = json!({"cniVersion": version, "name": "egress", "type": "tuning",
            "mtu": 1400, "prevResult": r});
        let tuned = reference_plugin(&w, "tuning", "ADD", &c, &tuning).ok();
        // (tuning re-encodes the result: compare what it carries, not its spelling.)
        let carried = |v: &Value| -> Vec<(Value, Value)> {
            v["ips"]
                .as_array()
                .unwrap()
                .iter()
                .map(|ip| (ip["address"].clone(), ip["interface"].clone()))
                .collect()
        };
        assert_eq!(carried(&tuned), carried(&r), "{tuned}");
        assert_eq!(tuned["interfaces"].as_array().unwrap().len(), n + 1);
        assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
        // CHECK with the chain's final result finds our interface in it.
        run(
            &w,
            "CHECK",
            &c,
            &with(&conf_at(&w, version), "prevResult", tuned),
        )
        .ok_empty();
        run(&w, "DEL", &c, &conf).ok_empty();
    }
    assert!(w.leases("acme", TOKEN).is_empty());
}

#[test]
fn twenty_concurrent_adds_and_dels() {
    let mut w = World::new();
    let conf = conf_at(&w, "1.1.0");
    let containers: Vec<Container> = (0..20).map(|i| w.container(&format!("p{i}"))).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = containers
            .iter()
            .map(|c| s.spawn(|| run(&w, "ADD", c, &conf).ok()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let addresses: BTreeSet<&str> = results
        .iter()
        .map(|r| r["ips"][0]["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses.len(), 20, "{addresses:?}");
    for c in &containers {
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP, "{}", c.id);
    }
    assert_eq!(w.leases("acme", TOKEN).len(), 20);
    assert_eq!(w.exit_peers().len(), 20);

    std::thread::scope(|s| {
        for c in &containers {
            let (w, conf) = (&w, &conf);
            s.spawn(move || run(w, "DEL", c, conf).ok_empty());
        }
    });
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    assert_eq!(w.links(&w.host), vec!["lo", "up0"]);
    for c in &containers {
        assert_eq!(w.links(&c.netns), vec!["lo"]);
    }
}

#[test]
fn gvisor_setup_split_routes_and_check_without_addresses() {
    let mut w = World::new();
    let mut conf = conf_at(&w, "1.1.0");
    conf["routes"] = json!("split");
    conf["gvisor"] = json!(true);
    let c = w.container("gvisor");
    let r = run(&w, "ADD", &c, &conf).ok();
    assert_eq!(
        r["routes"],
        json!([{ "dst": "0.0.0.0/1" }, { "dst": "128.0.0.0/1" }])
    );
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    // What runsc does to the interfaces it serves: their addresses go.
    sh(&["ip", "-n", &c.netns, "addr", "flush", "dev", "eth0"]);
    let checked = with(&conf, "prevResult", r);
    run(&w, "CHECK", &c, &checked).ok_empty();
    // Without the flag that is a failure, and the message says so.
    let strict = with(&checked, "gvisor", json!(false));
    let (code, msg) = run(&w, "CHECK", &c, &strict).err();
    assert_eq!(code, 107);
    assert!(msg.contains("address"), "{msg}");
    run(&w, "DEL", &c, &conf).ok_empty();
    assert!(w.leases("acme", TOKEN).is_empty());
}
