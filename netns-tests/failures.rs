//! ADD failures: a CNI error JSON with the spec code and a message naming the cause, and
//! nothing left behind (no link, no state file, no lease, no WireGuard process or socket).

use std::path::Path;

use serde_json::json;

use crate::world::{Container, World, TOKEN};

fn assert_nothing_left(w: &World, c: &Container) {
    assert_eq!(w.links(&c.netns), vec!["lo"], "container links");
    assert_eq!(w.links(&w.host), vec!["lo", "up0"], "host links");
    assert!(
        w.state_files().is_empty(),
        "state files: {:?}",
        w.state_files()
    );
    assert!(w.leases("acme", TOKEN).is_empty(), "leases");
    assert!(w.exit_peers().is_empty(), "exit peers");
    let sock = format!("/var/run/wireguard/{}.sock", c.host_ifname("eth0"));
    assert!(!Path::new(&sock).exists(), "{sock} left behind");
    let procs = crate::world::try_sh(&[
        "pgrep",
        "-f",
        &format!("wireguard-go {}", c.host_ifname("eth0")),
    ]);
    assert!(!procs.status.success(), "wireguard-go left running");
}

#[test]
fn add_failures_are_cni_errors_and_leave_nothing() {
    let mut w = World::new();
    let good = w.net_conf("acme");

    // A token the exit node does not know.
    std::fs::write(w.path("wrong.token"), "not-a-known-token-at-all\n").unwrap();
    let mut wrong_token = good.clone();
    wrong_token["tokenFile"] = json!(w.path("wrong.token"));
    // A token of another egress.
    let mut other_egress_token = good.clone();
    other_egress_token["tokenFile"] = json!(w.path("other.token"));
    // Nobody listens there.
    let mut unreachable = good.clone();
    unreachable["servers"] = json!(["https://198.51.100.99:7443"]);
    // A CA that did not sign the server's certificate.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(
        w.path("stranger-ca.pem"),
        params.self_signed(&key).unwrap().pem(),
    )
    .unwrap();
    let mut wrong_ca = good.clone();
    wrong_ca["caFile"] = json!(w.path("stranger-ca.pem"));
    // Malformed configs.
    let mut no_egress = good.clone();
    no_egress.as_object_mut().unwrap().remove("egress");
    let mut bad_mtu = good.clone();
    bad_mtu["mtu"] = json!("large");
    let mut missing_ca = good.clone();
    missing_ca["caFile"] = json!(w.path("no-such-ca.pem"));

    let cases: Vec<(&str, Vec<u8>, u64, &str)> = vec![
        (
            "wrong token",
            wrong_token.to_string().into_bytes(),
            100,
            "token",
        ),
        (
            "token of another egress",
            other_egress_token.to_string().into_bytes(),
            100,
            "token",
        ),
        (
            "unreachable server",
            unreachable.to_string().into_bytes(),
            11,
            "198.51.100.99:7443",
        ),
        (
            "certificate not from caFile",
            wrong_ca.to_string().into_bytes(),
            101,
            "caFile",
        ),
        ("not JSON", b"{ this is not json".to_vec(), 6, "JSON"),
        (
            "missing egress",
            no_egress.to_string().into_bytes(),
            7,
            "egress",
        ),
        (
            "mtu not a number",
            bad_mtu.to_string().into_bytes(),
            7,
            "mtu",
        ),
        (
            "caFile missing",
            missing_ca.to_string().into_bytes(),
            7,
            "caFile",
        ),
    ];
    for (i, (what, stdin, want_code, names)) in cases.into_iter().enumerate() {
        let c = w.container(&format!("f{i}"));
        let out = w.cni_raw("ADD", &c.id, Some(&c.netns_path), "eth0", &stdin);
        let (code, msg) = out.err();
        assert_eq!(code, want_code, "{what}: {out:?}");
        assert!(
            msg.contains(names),
            "{what}: message {msg:?} should name {names:?}"
        );
        assert_nothing_left(&w, &c);
    }
}

#[test]
fn add_into_a_missing_netns_fails_cleanly() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let c = w.container("ghost");
    crate::world::sh(&["ip", "netns", "del", &c.netns]);
    let (code, msg) = w.cni("ADD", &c, &conf).err();
    assert_eq!(code, 103);
    assert!(msg.contains(&c.netns), "{msg}");
    assert!(w.state_files().is_empty());
    assert!(w.leases("acme", TOKEN).is_empty());
}
