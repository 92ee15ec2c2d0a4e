//! What a pool's etcd can and cannot do to it (see `docs/cluster-security.md`): etcd runs
//! with TLS and client-certificate authentication, and someone holding an administrator's
//! certificate still cannot get a lease programmed nor read a private key.

use std::time::{Duration, Instant};

use serde_json::Value;
use wgexit::keys::Key;

use crate::pool_world::{echo_once, Pool, EGRESS_IP};

fn new_public_key() -> Key {
    Key::generate_private().unwrap().public()
}

/// `etcdctl ARGS` with the administrator's certificate; its standard output.
fn etcdctl(p: &Pool, args: &[&str]) -> String {
    let out = p.etcdctl(p.live_etcd()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until both members program exactly `keys` as peers.
fn wait_peers(p: &Pool, keys: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    let mut want = keys.to_vec();
    want.sort();
    loop {
        let got: Vec<Vec<String>> = (0..2)
            .map(|i| {
                let mut v = p.peers(i);
                v.sort();
                v
            })
            .collect();
        if got.iter().all(|v| *v == want) {
            return;
        }
        assert!(Instant::now() < deadline, "peers {got:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A container's lease, as a member wrote it to etcd: copied to another key, and rewritten
/// by hand (plain JSON naming a key and address of the forger's choice), with the
/// administrator's certificate. Neither is programmed on any member, live (the watch) or
/// after a restart (the load), and both are logged.
#[test]
fn a_lease_record_forged_with_an_admin_certificate_is_never_programmed() {
    let mut p = Pool::new();
    let conf = p.net_conf();
    let c = p.container("c0");
    let out = p.cni(0, "ADD", &c, &conf);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
        EGRESS_IP
    );
    let real = p.peers(0);
    assert_eq!(real.len(), 1, "{real:?}");
    wait_peers(&p, &real, Duration::from_secs(5));
    let real_key = Key::from_base64(&real[0]).unwrap();

    let leases = format!("/wgexit/{}/leases/acme/", p.id);
    let record = etcdctl(
        &p,
        &[
            "get",
            "--print-value-only",
            &format!("{leases}{}", real_key.to_hex()),
        ],
    );
    let record = record.trim_end();
    // A member's record: signed, and the lease's JSON after the signature.
    let json = record.splitn(3, '.').nth(2).unwrap();
    let mut lease: Value = serde_json::from_str(json).unwrap();

    let copied = new_public_key();
    etcdctl(
        &p,
        &["put", &format!("{leases}{}", copied.to_hex()), record],
    );
    let crafted = new_public_key();
    lease["public_key"] = Value::String(crafted.to_base64());
    lease["address"] = Value::String("100.96.1.200".into());
    let addresses = format!("/wgexit/{}/addresses/acme/100.96.1.200", p.id);
    etcdctl(&p, &["put", &addresses, &crafted.to_hex()]);
    etcdctl(
        &p,
        &[
            "put",
            &format!("{leases}{}", crafted.to_hex()),
            &lease.to_string(),
        ],
    );

    // Watched live: never programmed (sampled for 3 s).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for i in 0..2 {
            assert_eq!(p.peers(i), real, "member {i} programmed a forged lease");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Loaded at start: a rebooted member serves the real lease only.
    p.kill_member(1);
    p.revive_member(1);
    wait_peers(&p, &real, Duration::from_secs(10));
    let served: Vec<String> = p
        .leases(1)
        .iter()
        .map(|l| l["public_key"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(served, real, "member 1 serves {served:?}");
    for forged in [copied, crafted] {
        for i in 0..2 {
            assert!(
                p.log(i).contains(&forged.to_hex()),
                "member {i} did not log {forged}: {}",
                p.log(i)
            );
        }
    }
    assert!(p.log(0).contains("fails its check"), "{}", p.log(0));
    assert_eq!(
        echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
        EGRESS_IP
    );
}

/// Everything under the pool's prefix, read with an administrator's certificate, holds
/// neither the egress's WireGuard private key nor the CA's, in any encoding.
#[test]
fn no_value_in_etcd_reveals_a_private_key() {
    let p = Pool::new();
    let prefix = format!("/wgexit/{}/", p.id);
    let dump = etcdctl(&p, &["get", "--prefix", &prefix]);
    let m = &p.members[0];
    let wg_private = crate::world::sh(&[
        "ip",
        "netns",
        "exec",
        &m.ns,
        "wg",
        "show",
        &m.wg,
        "private-key",
    ]);
    let wg_private = Key::from_base64(wg_private.trim()).unwrap();
    let ca_key = std::fs::read_to_string(p.state_dir(0).join("tls/ca-key.pem")).unwrap();
    // Both are there, sealed.
    for key in [format!("{prefix}identity/acme"), format!("{prefix}ca")] {
        let value = etcdctl(&p, &["get", "--print-value-only", &key]);
        assert!(value.starts_with("wgxs1."), "{key}: {value}");
    }
    for secret in [wg_private.to_base64(), wg_private.to_hex()] {
        assert!(
            !dump.contains(&secret),
            "the WireGuard private key is readable in etcd"
        );
    }
    let body: Vec<&str> = ca_key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    assert!(!body.is_empty(), "{ca_key}");
    for line in body {
        assert!(
            !dump.contains(line),
            "the CA's private key is readable in etcd"
        );
    }
}

/// `wgexitd serve` for member `i` run to its end (within `within`): its exit status and
/// what it wrote.
fn serve_to_the_end(p: &Pool, i: usize, within: Duration) -> (Option<i32>, String) {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &p.members[i].ns])
        .arg(crate::world::bin("wgexitd"))
        .args(["serve", "--config"])
        .arg(p.member_config(i))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `etcdctl del --prefix` of the whole pool: the members keep every tunnel instead of
/// mirroring the empty store, say what happened and what to do (log and `wgexitd status`),
/// and a member started against the emptied store refuses it without making a new
/// identity, egress key or CA.
#[test]
fn a_pool_deleted_with_etcdctl_is_not_mirrored_and_gets_no_new_identity() {
    let mut p = Pool::new();
    let conf = p.net_conf();
    let c = p.container("c0");
    let out = p.cni(0, "ADD", &c, &conf);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let real = p.peers(0);
    wait_peers(&p, &real, Duration::from_secs(5));

    let prefix = format!("/wgexit/{}/", p.id);
    etcdctl(&p, &["del", "--prefix", &prefix]);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for i in 0..2 {
            assert_eq!(p.peers(i), real, "member {i} mirrored the emptied store");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
        EGRESS_IP
    );
    for i in 0..2 {
        assert!(
            p.log(i).contains("has lost the pool's identity"),
            "member {i}: {}",
            p.log(i)
        );
    }
    let m = &p.members[0];
    let status = crate::world::sh(&[
        "ip",
        "netns",
        "exec",
        &m.ns,
        crate::world::bin("wgexitd"),
        "status",
        "--config",
        p.member_config(0).to_str().unwrap(),
    ]);
    assert!(
        status.contains("IDENTITY LOST") && status.contains("etcdctl snapshot restore"),
        "{status}"
    );

    // A member started again refuses the store and makes nothing in it.
    p.kill_member(1);
    p.set_links(1, true, false);
    let (code, said) = serve_to_the_end(&p, 1, Duration::from_secs(15));
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {said}");
    assert!(said.contains("has lost the pool's identity"), "{said}");
    let keys = etcdctl(&p, &["get", "--prefix", "--keys-only", &prefix]);
    for made in ["epoch", "identity/", "ca\n", "leases/"] {
        assert!(!keys.contains(&format!("{prefix}{made}")), "{keys}");
    }
    assert_eq!(p.peers(0), real);
    assert_eq!(
        echo_once(&c.netns_path, Duration::from_secs(2)).unwrap(),
        EGRESS_IP
    );
}
