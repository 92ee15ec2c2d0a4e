//! Warm spare links (userspace backend): an ADD leaves a `wireguard-go` serving a spare TUN
//! in the host namespace, the next ADD takes it instead of starting one, concurrent ADDs
//! share one spare safely, a dead spare is passed over, DEL, GC and the stale sweep keep
//! spares, and `wgexit spares clear` removes them.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::world::{bin, sh, wait_for_refills, Container, World, EGRESS_IP};

/// A spare as `wgexit spares list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spare {
    name: String,
    pid: u32,
    serving: bool,
}

fn spares(w: &World) -> Vec<Spare> {
    let data_dir = w.data_dir().display().to_string();
    let out = sh(&[bin("wgexit"), "spares", "list", "--data-dir", &data_dir]);
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?.to_string();
            let pid = words.next()?.strip_prefix("pid=")?.parse().ok()?;
            let serving = words.next()? == "serving";
            Some(Spare { name, pid, serving })
        })
        .collect()
}

/// Waits (bounded; the refill ADD started is done in tens of ms) for a serving spare other
/// than those in `not`, and returns it.
fn wait_for_spare(w: &World, not: &[&str]) -> Spare {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = spares(w)
            .into_iter()
            .find(|s| s.serving && !not.contains(&s.name.as_str()));
        if let Some(spare) = found {
            return spare;
        }
        assert!(Instant::now() < deadline, "no new spare within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every link of the host namespace, spares included.
fn host_links(w: &World) -> Vec<String> {
    let v: Value = serde_json::from_str(&sh(&["ip", "-n", &w.host, "-j", "link", "show"])).unwrap();
    let links = v.as_array().cloned().unwrap_or_default();
    links
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

fn socket(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/var/run/wireguard/{name}.sock"))
}

/// ADD of `c`, its link's host-side name as recorded, and the container's traffic leaving
/// through the egress IP.
fn add_and_check(w: &World, c: &Container, conf: &Value) -> String {
    w.cni("ADD", c, conf).ok();
    assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP);
    c.host_ifname("eth0")
}

#[test]
fn the_next_add_takes_the_spare_and_clear_leaves_nothing() {
    let mut w = World::with_backend("userspace");
    let mut conf = w.net_conf("acme");
    // Every ADD sweeps for stale attachments first: the sweep must not take a spare for one.
    conf["staleSweepInterval"] = json!(0);
    let (c1, c2) = (w.container("sp1"), w.container("sp2"));

    // The first ADD starts wireguard-go itself, then leaves a spare serving in the host.
    let first = add_and_check(&w, &c1, &conf);
    assert!(first.starts_with("wgx"), "{first}");
    let spare = wait_for_spare(&w, &[]);
    assert!(
        spare.name.starts_with("wgs") && spare.name.len() == 15,
        "{spare:?}"
    );
    assert!(host_links(&w).contains(&spare.name));
    assert!(socket(&spare.name).exists());

    // The next ADD takes it: its link is the spare, moved into the container, and works.
    let second = add_and_check(&w, &c2, &conf);
    assert_eq!(second, spare.name);
    assert!(!host_links(&w).contains(&spare.name));
    assert_eq!(
        wgexit::wg::userspace::pid_of(&second),
        Some(spare.pid),
        "the spare's wireguard-go serves the attachment"
    );
    let show = sh(&["wg", "show", &second, "latest-handshakes"]);
    assert!(!show.trim().is_empty(), "no peer on {second}: {show}");
    // And a new spare replaces it.
    let next = wait_for_spare(&w, &[&spare.name]);
    assert_eq!(spares(&w).len(), 1, "{:?}", spares(&w));

    // DEL leaves nothing but the spare.
    for c in [&c1, &c2] {
        w.cni("DEL", c, &conf).ok_empty();
    }
    for name in [&first, &second] {
        assert_eq!(
            wgexit::wg::userspace::pid_of(name),
            None,
            "{name} still served"
        );
        assert!(!socket(name).exists(), "{name}'s socket left behind");
    }
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    assert_eq!(host_links(&w), ["lo", "up0", next.name.as_str()]);
    // GC keeps a serving spare: it belongs to no container.
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    w.cni("GC", &c1, &gc).ok_empty();
    assert_eq!(spares(&w), vec![next.clone()]);

    // `wgexit spares clear` removes the spare, its wireguard-go, socket and log.
    let data_dir = w.data_dir().display().to_string();
    let out = sh(&[bin("wgexit"), "spares", "clear", "--data-dir", &data_dir]);
    assert!(out.contains(&next.name), "{out}");
    assert_eq!(host_links(&w), ["lo", "up0"]);
    assert_eq!(wgexit::wg::userspace::pid_of(&next.name), None);
    assert!(!socket(&next.name).exists());
    assert!(spares(&w).is_empty());
    let left: Vec<_> = std::fs::read_dir("/var/run/wireguard")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&next.name))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn two_concurrent_adds_share_one_spare() {
    let mut w = World::with_backend("userspace");
    let conf = w.net_conf("acme");
    let c0 = w.container("sc0");
    let racers = [w.container("sc1"), w.container("sc2")];
    add_and_check(&w, &c0, &conf);
    let spare = wait_for_spare(&w, &[]);

    let w = &w;
    let names: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = racers
            .iter()
            .map(|c| {
                let conf = conf.clone();
                s.spawn(move || add_and_check(w, c, &conf))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took: Vec<&String> = names.iter().filter(|n| **n == spare.name).collect();
    assert_eq!(took.len(), 1, "exactly one ADD takes the spare: {names:?}");
    assert_ne!(names[0], names[1]);
    for c in [&c0].into_iter().chain(&racers) {
        w.cni("DEL", c, &conf).ok_empty();
    }
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
}

#[test]
fn a_dead_spare_is_passed_over_and_gc_removes_one() {
    let mut w = World::with_backend("userspace");
    let conf = w.net_conf("acme");
    let (c0, c1) = (w.container("sd0"), w.container("sd1"));
    add_and_check(&w, &c0, &conf);

    // A spare whose wireguard-go died: ADD does not take it, and starts its own.
    let dead = wait_for_spare(&w, &[]);
    sh(&["kill", "-KILL", &dead.pid.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while spares(&w).iter().any(|s| s.serving) {
        assert!(Instant::now() < deadline, "{:?} still serving", dead);
        std::thread::sleep(Duration::from_millis(5));
    }
    let name = add_and_check(&w, &c1, &conf);
    assert!(name.starts_with("wgx"), "took the dead spare: {name}");
    assert!(!socket(&dead.name).exists(), "the dead spare's socket");
    let fresh = wait_for_spare(&w, &[&dead.name]);
    assert_eq!(spares(&w), vec![fresh.clone()]);

    // GC removes a dead spare's record and socket, and keeps the serving one.
    sh(&["kill", "-KILL", &fresh.pid.to_string()]);
    while wgexit::wg::userspace::is_wireguard_go_for(fresh.pid, &fresh.name) {
        assert!(Instant::now() < deadline + Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    w.cni("GC", &c0, &gc).ok_empty();
    assert!(spares(&w).is_empty(), "{:?}", spares(&w));
    assert!(!socket(&fresh.name).exists());
    for c in [&c0, &c1] {
        w.cni("DEL", c, &conf).ok_empty();
    }
}

#[test]
fn spare_links_0_keeps_none() {
    let mut w = World::with_backend("userspace");
    let mut conf = w.net_conf("acme");
    conf["spareLinks"] = json!(0);
    let c = w.container("sn0");
    add_and_check(&w, &c, &conf);
    // A refill would have been started before the plugin exited.
    wait_for_refills(&w.data_dir().display().to_string());
    assert!(spares(&w).is_empty());
    assert_eq!(host_links(&w), ["lo", "up0"]);
    w.cni("DEL", &c, &conf).ok_empty();
}

#[test]
fn a_failed_refill_goes_to_the_plugins_log() {
    let t = tempfile::tempdir().unwrap();
    // Where the spares' records would go is a file: the refill cannot record any.
    std::fs::write(t.path().join("spares"), b"").unwrap();
    let log = t.path().join("wgexit.log");
    let (data_dir, log_file) = (t.path().display().to_string(), log.display().to_string());
    let out = crate::world::try_sh(&[
        bin("wgexit"),
        "spares",
        "refill",
        "--data-dir",
        &data_dir,
        "--count",
        "1",
        "--log-file",
        &log_file,
    ]);
    assert!(!out.status.success());
    let line = std::fs::read_to_string(&log).unwrap();
    assert!(line.contains(" SPARES result=error msg=\""), "{line}");
    assert!(line.contains(&data_dir), "{line}");
}
