//! Each attachment's state is its own, and so is its namespace: two attachments whose names
//! an earlier version ran together into one state file live side by side; records that
//! earlier version wrote are still found by CHECK, DEL and GC; DEL touches links only in the
//! namespace ADD attached to, even when the namespace's path now names another one.

use serde_json::{json, Value};

use crate::world::{sh, CniOutput, Container, World, EGRESS_IP, TOKEN};

/// Runs the plugin for container ID `id` on `ifname` in `c`'s namespace.
fn cni(w: &World, command: &str, id: &str, ifname: &str, c: &Container, conf: &Value) -> CniOutput {
    w.cni_raw(
        command,
        id,
        Some(&c.netns_path),
        ifname,
        conf.to_string().as_bytes(),
    )
}

fn with(conf: &Value, key: &str, v: Value) -> Value {
    let mut c = conf.clone();
    c[key] = v;
    c
}

#[test]
fn attachments_whose_old_file_names_collide_live_side_by_side() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    // Container "X.b" on interface "c" and container "X" on "b.c": an earlier version kept
    // both in "X.b.c.json".
    let base = format!("{}-col", w.id);
    let one = (w.container("one"), format!("{base}.b"), "c");
    let two = (w.container("two"), base.clone(), "b.c");
    for (c, id, ifname) in [&one, &two] {
        cni(&w, "ADD", id, ifname, c, &conf).ok();
    }
    for (c, _, ifname) in [&one, &two] {
        assert_eq!(w.echo_from(c).unwrap(), EGRESS_IP);
        assert_eq!(
            w.links(&c.netns),
            vec!["lo".to_string(), ifname.to_string()]
        );
    }
    let records: Vec<_> = w
        .state_files()
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(w.leases("acme", TOKEN).len(), 2);

    // DEL of one leaves the other working.
    let (c, id, ifname) = &one;
    cni(&w, "DEL", id, ifname, c, &conf).ok_empty();
    assert_eq!(w.links(&one.0.netns), vec!["lo"]);
    assert_eq!(w.echo_from(&two.0).unwrap(), EGRESS_IP);
    assert_eq!(w.links(&two.0.netns), vec!["lo", "b.c"]);
    assert_eq!(w.leases("acme", TOKEN).len(), 1);
    assert_eq!(w.exit_peers().len(), 1);

    let (c, id, ifname) = &two;
    cni(&w, "DEL", id, ifname, c, &conf).ok_empty();
    assert_eq!(w.links(&two.0.netns), vec!["lo"]);
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
}

/// Turns the state of (`id`, eth0) into what the previous version wrote: the same record
/// without the namespace's identity, under the name `<id>.eth0.*`.
fn make_it_an_earlier_versions(w: &World, id: &str) {
    let escaped = id.replace('.', "%2E");
    let dir = w.data_dir();
    let record = dir.join(format!("{escaped}.eth0.json"));
    let mut state: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("netnsId");
    std::fs::write(
        dir.join(format!("{id}.eth0.json")),
        serde_json::to_vec_pretty(&state).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(&record).unwrap();
    std::fs::rename(
        dir.join(format!("{escaped}.eth0.key")),
        dir.join(format!("{id}.eth0.key")),
    )
    .unwrap();
    let _ = std::fs::remove_file(dir.join(format!("{escaped}.eth0.lock")));
}

#[test]
fn state_an_earlier_version_wrote_is_found_by_check_del_and_gc() {
    let mut w = World::new();
    let mut conf = w.net_conf("acme");
    conf["cniVersion"] = json!("1.1.0");
    let deleted = (w.container("olddel"), format!("{}-old.del", w.id));
    let collected = (w.container("oldgc"), format!("{}-old.gc", w.id));
    let mut results = Vec::new();
    for (c, id) in [&deleted, &collected] {
        results.push(cni(&w, "ADD", id, "eth0", c, &conf).ok());
        make_it_an_earlier_versions(&w, id);
    }
    let mut files = w.state_files();
    files.sort();
    assert!(
        files.contains(&format!("{}.eth0.json", deleted.1)),
        "{files:?}"
    );

    // CHECK and DEL find the record under its old name.
    let (c, id) = &deleted;
    let checked = with(&conf, "prevResult", results[0].clone());
    cni(&w, "CHECK", id, "eth0", c, &checked).ok_empty();
    cni(&w, "DEL", id, "eth0", c, &conf).ok_empty();
    assert_eq!(w.links(&c.netns), vec!["lo"]);
    assert_eq!(w.leases("acme", TOKEN).len(), 1);
    assert_eq!(w.echo_from(&collected.0).unwrap(), EGRESS_IP);

    // GC with the runtime listing nothing finds and collects the other.
    let gc = with(&conf, "cni.dev/valid-attachments", json!([]));
    cni(&w, "GC", &collected.1, "eth0", &collected.0, &gc).ok_empty();
    assert_eq!(w.links(&collected.0.netns), vec!["lo"]);
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
}

/// Makes `c`'s namespace path name a new namespace (as `/proc/<pid>/ns/net` does once the
/// PID is reused) holding a link of the attachment's name, `eth0`.
fn replace_namespace(c: &Container) {
    sh(&["ip", "netns", "del", &c.netns]);
    sh(&["ip", "netns", "add", &c.netns]);
    sh(&["ip", "-n", &c.netns, "link", "set", "lo", "up"]);
    sh(&[
        "ip", "-n", &c.netns, "link", "add", "eth0", "type", "bridge",
    ]);
}

#[test]
fn del_touches_no_link_in_a_namespace_that_replaced_the_attached_one() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("swap");
    let result = w.cni("ADD", &c, &conf).ok();
    assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
    replace_namespace(&c);

    // CHECK says the path names another namespace.
    let (code, msg) = w.cni("CHECK", &c, &with(&conf, "prevResult", result)).err();
    assert_eq!(code, 107, "{msg}");
    assert!(msg.contains("another network namespace"), "{msg}");

    // DEL leaves the newcomer's eth0 alone, and still releases the lease and the state.
    let out = w.cni("DEL", &c, &conf);
    out.ok_empty();
    assert_eq!(w.links(&c.netns), vec!["lo", "eth0"]);
    assert!(
        out.stderr.contains("now names another network namespace"),
        "{}",
        out.stderr
    );
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    let socket = format!("/var/run/wireguard/{}.sock", c.host_ifname("eth0"));
    assert!(!std::path::Path::new(&socket).exists(), "{socket} left");

    // A DEL whose CNI_NETNS names another namespace with an eth0: the attachment's own link
    // goes, that one stays.
    let d = w.container("other");
    w.cni("ADD", &d, &conf).ok();
    let out = w.cni_raw(
        "DEL",
        &d.id,
        Some(&c.netns_path),
        "eth0",
        conf.to_string().as_bytes(),
    );
    out.ok_empty();
    assert_eq!(w.links(&c.netns), vec!["lo", "eth0"]);
    assert_eq!(w.links(&d.netns), vec!["lo"]);
    assert!(w.leases("acme", TOKEN).is_empty());
}

#[test]
fn the_stale_sweep_counts_a_replaced_namespace_as_gone_and_leaves_its_links() {
    let mut w = World::new();
    let mut conf = w.net_conf("acme");
    conf["staleSweepInterval"] = json!(0);
    let reused = w.container("reused");
    let next = w.container("next");
    w.cni("ADD", &reused, &conf).ok();
    replace_namespace(&reused);

    // The next ADD sweeps: the replaced attachment's lease and state go, the link of the
    // namespace now at its path stays.
    let out = w.cni("ADD", &next, &conf);
    out.ok();
    assert!(
        out.stderr
            .contains(&format!("cleaned up {} eth0", reused.id)),
        "{}",
        out.stderr
    );
    assert_eq!(w.links(&reused.netns), vec!["lo", "eth0"]);
    assert_eq!(w.leases("acme", TOKEN).len(), 1);
    assert_eq!(w.echo_from(&next).unwrap(), EGRESS_IP);
    w.cni("DEL", &next, &conf).ok_empty();
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
}
