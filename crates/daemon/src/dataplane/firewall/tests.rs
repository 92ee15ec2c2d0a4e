//! The firewall against the kernel, in network namespaces each test makes (and removes, even
//! when it fails). A veth stands in for the WireGuard interface: the rules only see its name.
//! Needs root.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;
use crate::config::policy::Rule;
use wgexit::net::Netlink;

/// A network namespace made for one test and removed when dropped, even on failure.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("wgx-fw-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Moves the calling thread (and so every `nft` it starts) into the namespace.
    fn enter(&self) {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let want = file.metadata().unwrap().ino();
        let have = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        assert_eq!(want, have, "thread did not enter {path}");
    }

    fn try_run(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs a command inside the namespace and returns its stdout; panics on failure.
    fn run(&self, args: &[&str]) -> String {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn nft_list(&self, table: &str) -> String {
        self.run(&["nft", "-a", "list", "table", "inet", table])
    }

    /// Runs `f` on a new thread inside the namespace.
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }

    fn on<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn acme() -> EgressRules {
    EgressRules {
        name: "acme".into(),
        wg_interface: "wgx-acme".into(),
        uplink: "isp0".into(),
        pools: vec![net("100.64.0.0/10")],
        overlay_ips: vec![ip("100.64.0.1")],
        snat: vec![(net("100.64.0.0/10"), ip("203.0.113.77"))],
        policy: Policy::default(),
        exit_addresses: Vec::new(),
    }
}

fn globex() -> EgressRules {
    EgressRules {
        name: "globex".into(),
        wg_interface: "wgx-globex".into(),
        uplink: "isp1".into(),
        pools: vec![net("198.18.16.0/20"), net("fd77:0:1::/64")],
        overlay_ips: vec![ip("198.18.16.1"), ip("fd77:0:1::1")],
        snat: vec![
            (net("198.18.16.0/20"), ip("203.0.113.78")),
            (net("fd77:0:1::/64"), ip("2001:db8:77::78")),
        ],
        policy: Policy {
            allow: vec!["198.18.9.0/24 tcp/443".parse().unwrap()],
            deny: [
                "tcp/25",
                "198.18.7.0/24",
                "2001:db8:bad::/48",
                "198.18.8.0/24 udp/5000-5100",
            ]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect(),
            ..Policy::default()
        },
        exit_addresses: vec![
            ip("198.51.100.2"),
            ip("203.0.113.78"),
            ip("2001:db8:77::78"),
        ],
    }
}

/// Drops the `# handle N` annotations nft -a adds.
fn without_handles(listing: &str) -> String {
    listing
        .lines()
        .map(|l| l.split(" # handle").next().unwrap_or(l).trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_has(listing: &str, want: &str) {
    assert!(
        without_handles(listing).contains(want),
        "missing {want:?} in:\n{listing}"
    );
}

/// The packet counter of the rule with this comment.
fn counter(listing: &str, comment: &str) -> u64 {
    let line = listing
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .unwrap_or_else(|| panic!("no rule {comment:?} in:\n{listing}"));
    let rest = &line[line.find("packets ").unwrap() + "packets ".len()..];
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn apply_writes_the_rules() {
    let ns = Netns::new("apply");
    ns.enter();
    let fw = Firewall::new(DEFAULT_TABLE);
    assert!(!fw.exists().unwrap());
    fw.apply(&[acme(), globex()]).unwrap();
    assert!(fw.exists().unwrap());
    assert_eq!(
        fw.verify(&[acme(), globex()]).unwrap(),
        Verification::Matches
    );

    let listing = ns.nft_list("wgexitd");
    println!("{listing}");
    for want in [
        "type filter hook prerouting priority mangle; policy accept;",
        "iifname \"wgx-acme\" meta mark set meta mark | 0x10000000 comment \"acme: mark from the tunnel\"",
        "iifname \"isp0\" meta mark set meta mark | 0x10000000 comment \"acme: mark from the uplink\"",
        "type nat hook postrouting priority srcnat; policy accept;",
        "oifname \"isp0\" ip saddr @pools4_acme counter packets 0 bytes 0 snat ip to ip saddr map @snat4_acme comment \"acme: snat\"",
        "oifname \"isp0\" ip saddr @pools4_acme counter packets 0 bytes 0 drop comment \"acme: no egress IP\"",
        "elements = { 100.64.0.0/10 : 203.0.113.77 }",
        "oifname \"isp1\" ip6 saddr @pools6_globex counter packets 0 bytes 0 snat ip6 to ip6 saddr map @snat6_globex comment \"globex: snat\"",
        "elements = { fd77:0:1::/64 : 2001:db8:77::78 }",
        "type filter hook forward priority mangle; policy accept;",
        "iifname \"wgx-acme\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu comment \"acme: mss clamp in\"",
        "oifname \"wgx-acme\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu comment \"acme: mss clamp out\"",
        "type filter hook forward priority filter; policy accept;",
        "iifname \"wgx-acme\" ip saddr != @pools4_acme counter packets 0 bytes 0 drop comment \"acme: anti-spoof\"",
        "iifname \"wgx-globex\" ip6 saddr != @pools6_globex counter packets 0 bytes 0 drop comment \"globex: anti-spoof ipv6\"",
        "iifname \"wgx-acme\" oifname \"isp0\" meta nfproto ipv4 goto policy_acme comment \"acme: to uplink\"",
        "iifname \"wgx-globex\" oifname \"isp1\" meta nfproto { ipv4, ipv6 } goto policy_globex",
        "iifname \"isp0\" oifname \"wgx-acme\" ct state established,related accept comment \"acme: replies\"",
        "iifname \"wgx-acme\" counter packets 0 bytes 0 drop comment \"acme: no other forwarding in\"",
        "oifname \"wgx-acme\" counter packets 0 bytes 0 drop comment \"acme: no other forwarding out\"",
        "type filter hook input priority filter; policy accept;",
        "iifname \"wgx-acme\" ip daddr 100.64.0.1 icmp type echo-request accept comment \"acme: ping\"",
        "iifname \"wgx-globex\" ip6 daddr fd77:0:1::1 icmpv6 type echo-request accept comment \"globex: ping\"",
        "iifname \"wgx-acme\" counter packets 0 bytes 0 goto refuse_acme comment \"acme: no access to the exit node\"",
        "ip daddr @private4 goto refuse_acme comment \"acme: private\"",
        "accept comment \"acme: default\"",
        "counter name \"refused_acme\"",
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx admin-prohibited",
        "ip daddr . meta l4proto . th dport @allowp4_globex ct mark set 0x",
        "ct state established ct mark 0x",
        "accept comment \"globex: allowed before\"",
        "ip daddr @deny4_globex goto refuse_globex",
        "ip6 daddr @deny6_globex goto refuse_globex",
        "meta l4proto . th dport @denyp_globex goto refuse_globex",
        "ip daddr . meta l4proto . th dport @denyp4_globex goto refuse_globex",
        "elements = { 198.18.8.0/24 . udp . 5000-5100 }",
        "iifname \"wgx-globex\" ip daddr @exit4_globex goto refuse_globex comment \"globex: exit node addresses\"",
        "iifname \"wgx-globex\" ip6 daddr @exit6_globex goto refuse_globex comment \"globex: exit node addresses\"",
        "elements = { 2001:db8:77::78 }",
    ] {
        assert_has(&listing, want);
    }
    // Forward rules in the documented order.
    let text = without_handles(&listing);
    let pos = |s: &str| text.find(s).unwrap();
    assert!(pos("acme: anti-spoof") < pos("acme: to uplink"));
    assert!(pos("globex: exit node addresses") < pos("globex: to uplink"));
    assert!(!text.contains("exit4_acme"));
    assert!(pos("acme: to uplink") < pos("acme: replies"));
    assert!(pos("acme: replies") < pos("acme: no other forwarding in"));
    assert!(pos("acme: no other forwarding in") < pos("acme: no other forwarding out"));
    assert!(pos("acme: invalid") < pos("acme: allowed before"));
    assert!(pos("globex: allowed before") < pos("globex: exit node addresses"));
    assert!(pos("@allowp4_globex ct mark set") < pos("@deny4_globex goto"));
    assert!(pos("@deny4_globex goto") < pos("globex: private"));
    assert!(pos("globex: private") < pos("globex: default"));
}

#[test]
fn apply_twice_leaves_the_table_alone() {
    let ns = Netns::new("idem");
    ns.enter();
    let fw = Firewall::new(DEFAULT_TABLE);
    fw.apply(&[acme(), globex()]).unwrap();
    let before = ns.nft_list("wgexitd");
    fw.apply(&[acme(), globex()]).unwrap();
    let after = ns.nft_list("wgexitd");
    assert_eq!(before, after, "handles changed: the table was rewritten");
}

#[test]
fn verify_tells_missing_changed_and_matching_tables_apart() {
    let ns = Netns::new("verify");
    ns.enter();
    let fw = Firewall::new(DEFAULT_TABLE);
    let rules = [acme(), globex()];
    assert_eq!(fw.verify(&rules).unwrap(), Verification::Missing);
    fw.apply(&rules).unwrap();
    assert_eq!(fw.verify(&rules).unwrap(), Verification::Matches);

    // Someone flushes everything.
    ns.run(&["nft", "flush", "ruleset"]);
    assert_eq!(fw.verify(&rules).unwrap(), Verification::Missing);
    fw.apply(&rules).unwrap();
    assert_eq!(fw.verify(&rules).unwrap(), Verification::Matches);

    // Hand-made changes of every kind are seen, and undone by apply.
    let tamper: [&[&str]; 5] = [
        &[
            "nft", "insert", "rule", "inet", "wgexitd", "forward", "accept",
        ],
        &[
            "nft",
            "add",
            "element",
            "inet",
            "wgexitd",
            "snat4_acme",
            "{ 198.51.100.0/24 : 203.0.113.9 }",
        ],
        &["nft", "flush", "chain", "inet", "wgexitd", "input"],
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "wgexitd",
            "deny4_globex",
            "{ 198.18.7.0/24 }",
        ],
        &["nft", "add", "chain", "inet", "wgexitd", "extra"],
    ];
    for args in tamper {
        ns.run(args);
        match fw.verify(&rules).unwrap() {
            Verification::Differs(what) => println!("{args:?}: {what}"),
            other => panic!("{args:?}: {other:?}"),
        }
        fw.apply(&rules).unwrap();
        assert_eq!(
            fw.verify(&rules).unwrap(),
            Verification::Matches,
            "{args:?}"
        );
    }
    // Counters counting is no difference.
    ns.run(&["nft", "reset", "counters"]);
    assert_eq!(fw.verify(&rules).unwrap(), Verification::Matches);
    // A different config is.
    assert!(matches!(
        fw.verify(&[acme()]).unwrap(),
        Verification::Differs(_)
    ));
}

#[test]
fn apply_replaces_a_changed_table() {
    let ns = Netns::new("replace");
    ns.enter();
    let fw = Firewall::new(DEFAULT_TABLE);
    fw.apply(&[acme()]).unwrap();
    let first = ns.nft_list("wgexitd");

    let mut moved = acme();
    moved.snat = vec![(net("100.64.0.0/10"), ip("203.0.113.99"))];
    fw.apply(&[moved.clone()]).unwrap();
    let second = ns.nft_list("wgexitd");
    assert_ne!(first, second);
    assert_has(&second, "100.64.0.0/10 : 203.0.113.99");
    assert!(!second.contains("203.0.113.77"), "{second}");

    fw.apply(&[moved.clone(), globex()]).unwrap();
    let third = ns.nft_list("wgexitd");
    assert_has(&third, "oifname \"isp1\" ip saddr @pools4_globex");
    assert_has(&third, "iifname \"wgx-globex\" ip saddr != @pools4_globex");

    // A deleted chain comes back too.
    ns.run(&["nft", "flush", "chain", "inet", "wgexitd", "input"]);
    ns.run(&["nft", "delete", "chain", "inet", "wgexitd", "input"]);
    fw.apply(&[moved.clone(), globex()]).unwrap();
    assert_eq!(
        without_handles(&third),
        without_handles(&ns.nft_list("wgexitd"))
    );

    // No egress: the chains stay, without rules.
    fw.apply(&[]).unwrap();
    let empty = ns.nft_list("wgexitd");
    assert!(!empty.contains("acme"), "{empty}");
    assert_has(&empty, "chain forward");
}

#[test]
fn teardown_removes_the_table_and_may_repeat() {
    let ns = Netns::new("teardown");
    ns.enter();
    let fw = Firewall::new("wgexitd-test");
    fw.teardown().unwrap();
    fw.apply(&[acme()]).unwrap();
    assert!(fw.exists().unwrap());
    fw.teardown().unwrap();
    assert!(!fw.exists().unwrap());
    assert!(!ns.run(&["nft", "list", "tables"]).contains("wgexitd-test"));
    fw.teardown().unwrap();
    assert!(!fw.exists().unwrap());
    assert_eq!(fw.verify(&[acme()]).unwrap(), Verification::Missing);
    assert!(fw.refused_counts().unwrap().is_empty());
}

#[test]
fn bad_rules_are_refused_before_touching_the_kernel() {
    let fw = Firewall::new(DEFAULT_TABLE).with_nft("/nonexistent/nft");
    let refused = |e: EgressRules, says: &str| {
        let err = fw.apply(&[e]).unwrap_err();
        assert!(matches!(err, FirewallError::Invalid(_)), "{err}");
        assert!(err.to_string().contains(says), "{err}");
    };
    let mut long = acme();
    long.wg_interface = "wgx-a-very-long-name".into();
    refused(long, "wgx-a-very-long-name");
    let mut slash = acme();
    slash.uplink = "isp/0".into();
    refused(slash, "isp/0");
    let mut name = acme();
    name.name = "a b".into();
    refused(name, "\"a b\"");
    let mut overlap = acme();
    overlap
        .snat
        .push((net("100.64.0.0/24"), ip("203.0.113.78")));
    refused(overlap, "overlap");
    let mut mixed = acme();
    mixed.snat = vec![(net("100.64.0.0/10"), ip("2001:db8::1"))];
    refused(mixed, "families");
    let err = Firewall::new("bad\0table").apply(&[acme()]).unwrap_err();
    assert!(matches!(err, FirewallError::Invalid(_)), "{err}");
    // Without nft the error says what to install.
    let err = fw.exists().unwrap_err();
    assert!(err.to_string().contains("install nftables"), "{err}");
}

#[test]
fn a_refused_transaction_names_it_and_changes_nothing() {
    let ns = Netns::new("reject");
    ns.enter();
    let fw = Firewall::new("wgexitd-reject");
    let mut batch = fw.recreate_table();
    let table = NfListObject::Table(Table {
        family: NfFamily::INet,
        name: "wgexitd-reject".into(),
        handle: None,
    });
    batch.add(table);
    // A nat chain on the forward hook is refused by the kernel.
    batch.add(NfListObject::Chain(nftables::schema::Chain {
        family: NfFamily::INet,
        table: "wgexitd-reject".into(),
        name: "bogus".into(),
        _type: Some(nftables::types::NfChainType::NAT),
        hook: Some(nftables::types::NfHook::Forward),
        prio: Some(0),
        ..Default::default()
    }));
    let err = fw.run_batch(batch, "the bogus chain").unwrap_err();
    assert!(matches!(err, FirewallError::Nft { .. }), "{err:?}");
    assert!(err.to_string().contains("the bogus chain"), "{err}");
    // All or nothing: the table of the same transaction was not created either.
    assert!(!fw.exists().unwrap());
}

#[test]
fn without_cap_net_admin_the_error_says_so() {
    let ns = Netns::new("perm");
    ns.enter();
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("nft");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nexec setpriv --inh-caps=-all --bounding-set=-net_admin nft \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let fw = Firewall::new(DEFAULT_TABLE).with_nft(&wrapper);
    let err = fw.apply(&[acme()]).unwrap_err();
    assert!(
        matches!(err, FirewallError::PermissionDenied { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("run wgexitd as root"), "{err}");
}

#[test]
fn many_egresses_fit_in_one_transaction() {
    let ns = Netns::new("many");
    ns.enter();
    let egresses: Vec<EgressRules> = (0..300u32)
        .map(|i| {
            let pool =
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + (i << 8)), 24).unwrap());
            EgressRules {
                name: format!("tenant-{i}"),
                wg_interface: format!("wgx-e{i}"),
                uplink: "isp0".into(),
                pools: vec![pool],
                overlay_ips: vec![IpAddr::V4(Ipv4Addr::from(0x6440_0001 + (i << 8)))],
                snat: vec![(pool, IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + (i % 250))))],
                policy: Policy::default(),
                exit_addresses: vec![ip("198.51.100.2"), ip("203.0.113.77")],
            }
        })
        .collect();
    let fw = Firewall::new(DEFAULT_TABLE);
    fw.apply(&egresses).unwrap();
    let listing = ns.nft_list(DEFAULT_TABLE);
    assert_has(
        &listing,
        "comment \"tenant-299: no access to the exit node\"",
    );
    assert_eq!(fw.verify(&egresses).unwrap(), Verification::Matches);
    fw.apply(&egresses).unwrap();
    assert_eq!(listing, ns.nft_list(DEFAULT_TABLE));
    fw.apply(&egresses[..10]).unwrap();
    assert!(!ns.nft_list(DEFAULT_TABLE).contains("tenant-10:"));
}

#[test]
fn a_thousand_policy_rules_and_64_snat_blocks_apply_in_one_fast_transaction() {
    let ns = Netns::new("scale");
    ns.enter();
    let mut e = acme();
    e.pools = vec![net("100.64.0.0/16"), net("fd77:0:2::/64")];
    e.snat = (0..64u32)
        .map(|i| {
            let block = ipnet::Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + (i << 10)), 22).unwrap();
            (
                IpNet::V4(block),
                IpAddr::V4(Ipv4Addr::from(0xcb00_7140 + i)),
            )
        })
        .collect();
    // Overlapping address, port and address-and-port rules of both families.
    let rule = |i: u32| -> Rule {
        let text = match i % 5 {
            0 => format!("198.18.{}.0/24", i % 256),
            1 => format!("tcp/{}-{}", 1000 + i, 1010 + i),
            2 => format!("198.18.{}.{}/30 udp/{}", i % 256, (i * 4) % 256, 2000 + i),
            3 => format!("2001:db8:{:x}::/48 tcp/{}", i, 3000 + i % 50),
            _ => format!("198.18.{}.0/23 tcp/80-{}", (i % 128) * 2, 81 + i % 7),
        };
        text.parse().unwrap()
    };
    e.policy.deny = (0..1000).map(rule).collect();
    e.policy.allow = (0..20).map(|i| rule(i * 7)).collect();
    let fw = Firewall::new(DEFAULT_TABLE);
    let started = Instant::now();
    fw.apply(std::slice::from_ref(&e)).unwrap();
    let took = started.elapsed();
    println!("1000 rules, 64 blocks: applied in {took:?}");
    assert!(took < Duration::from_millis(800), "{took:?}");
    let started = Instant::now();
    assert_eq!(
        fw.verify(std::slice::from_ref(&e)).unwrap(),
        Verification::Matches
    );
    println!("verified in {:?}", started.elapsed());
    // The rule count does not grow with the policy.
    let listed: serde_json::Value =
        serde_json::from_str(&ns.run(&["nft", "-j", "list", "table", "inet", DEFAULT_TABLE]))
            .unwrap();
    let rules = listed["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("rule").is_some())
        .count();
    assert!(rules < 40, "{rules} rules");
}

/// An exit node (`wgx-t` stands in for its WireGuard interface, `up0` is its uplink) between
/// a client and an isp.
struct World {
    exit: Netns,
    client: Netns,
    isp: Netns,
}

fn world(tag: &str) -> World {
    let w = World {
        exit: Netns::new(&format!("{tag}-x")),
        client: Netns::new(&format!("{tag}-c")),
        isp: Netns::new(&format!("{tag}-i")),
    };
    let veth = |a: &str, b: &str, other: &Netns| {
        w.exit.run(&[
            "ip",
            "link",
            "add",
            a,
            "type",
            "veth",
            "peer",
            "name",
            b,
            "netns",
            &other.name,
        ]);
    };
    veth("wgx-t", "c0", &w.client);
    veth("up0", "i0", &w.isp);
    for cmd in [
        "ip addr add 100.64.0.1/24 dev wgx-t",
        "ip addr add fd77:0:9::1/64 dev wgx-t nodad",
        "ip addr add 203.0.113.1/24 dev up0",
        "ip addr add 203.0.113.77/32 dev up0",
        "ip addr add 203.0.113.78/32 dev up0",
        "ip addr add 2001:db8:77::1/64 dev up0 nodad",
        "ip addr add 2001:db8:77::77/128 dev up0 nodad",
        "ip link set wgx-t up",
        "ip link set up0 up",
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        // No reverse-path filter on the tunnel side, so the anti-spoof rule is what drops
        // spoofed sources; a strict one on the uplink, and src_valid_mark as wgexitd sets it.
        "sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.wgx-t.rp_filter=0",
        "sysctl -qw net.ipv4.conf.up0.rp_filter=1",
        "sysctl -qw net.ipv4.conf.wgx-t.src_valid_mark=1 net.ipv4.conf.up0.src_valid_mark=1",
    ] {
        w.exit.run(&cmd.split(' ').collect::<Vec<_>>());
    }
    for cmd in [
        // /32s, as a container's WireGuard address: the exit node is the way to everything.
        "ip addr add 100.64.0.2/32 dev c0",
        "ip addr add 100.64.0.130/32 dev c0",
        "ip addr add 198.18.5.2/32 dev c0",
        "ip addr add fd77:0:9::2/64 dev c0 nodad",
        "ip link set c0 up",
        "ip route add 100.64.0.1 dev c0",
        "ip route add default via 100.64.0.1",
        "ip -6 route add default via fd77:0:9::1",
    ] {
        w.client.run(&cmd.split(' ').collect::<Vec<_>>());
    }
    // The isp knows nothing of the overlay: only SNATed traffic can be answered.
    for cmd in [
        "ip addr add 203.0.113.50/24 dev i0",
        "ip addr add 2001:db8:77::50/64 dev i0 nodad",
        "ip link set i0 up",
    ] {
        w.isp.run(&cmd.split(' ').collect::<Vec<_>>());
    }
    w
}

fn egress(snat: &[(&str, &str)], policy: Policy) -> EgressRules {
    EgressRules {
        name: "acme".into(),
        wg_interface: "wgx-t".into(),
        uplink: "up0".into(),
        pools: vec![net("100.64.0.0/24"), net("fd77:0:9::/64")],
        overlay_ips: vec![ip("100.64.0.1"), ip("fd77:0:9::1")],
        snat: snat.iter().map(|(b, i)| (net(b), ip(i))).collect(),
        policy,
        exit_addresses: Vec::new(),
    }
}

/// A UDP server in `ns` on `addr` answering each datagram with the source address it saw;
/// returns once it is bound. Stops after `stop`.
fn udp_echo(ns: &Netns, addr: &str) -> std::thread::JoinHandle<Vec<IpAddr>> {
    let addr: SocketAddr = addr.parse().unwrap();
    let (ready, bound) = std::sync::mpsc::channel();
    let server = ns.spawn(move || {
        let socket = UdpSocket::bind(addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        ready.send(()).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            if &buf[..n] == b"stop" {
                break;
            }
            seen.push(peer.ip());
            let _ = socket.send_to(peer.ip().to_string().as_bytes(), peer);
        }
        seen
    });
    bound.recv().unwrap();
    server
}

fn stop_udp_echo(
    ns: &Netns,
    addr: &str,
    server: std::thread::JoinHandle<Vec<IpAddr>>,
) -> Vec<IpAddr> {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.on(move || {
        let from: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .unwrap();
        UdpSocket::bind(from)
            .unwrap()
            .send_to(b"stop", addr)
            .unwrap();
    });
    server.join().unwrap()
}

/// Sends one UDP datagram from `from` and waits briefly for an answer; `Err` holds why none
/// came (a timeout or the error the kernel reported).
fn udp_exchange(from: &str, to: &str) -> Result<String, std::io::Error> {
    let socket = UdpSocket::bind((ip(from), 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    socket.connect(to).unwrap();
    socket.send(b"hello")?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn traffic_is_snatted_through_the_map_and_spoofed_sources_are_dropped() {
    let w = world("snat");
    w.exit.enter();
    let rules = egress(
        &[
            ("100.64.0.0/25", "203.0.113.77"),
            ("100.64.0.128/25", "203.0.113.78"),
            ("fd77:0:9::/64", "2001:db8:77::77"),
        ],
        Policy::default(),
    );
    Firewall::new(DEFAULT_TABLE)
        .apply(std::slice::from_ref(&rules))
        .unwrap();

    let v4 = udp_echo(&w.isp, "203.0.113.50:7777");
    let v6 = udp_echo(&w.isp, "[2001:db8:77::50]:7777");
    let answers = w.client.on(|| {
        [
            udp_exchange("100.64.0.2", "203.0.113.50:7777"),
            udp_exchange("100.64.0.130", "203.0.113.50:7777"),
            udp_exchange("fd77:0:9::2", "[2001:db8:77::50]:7777"),
            udp_exchange("198.18.5.2", "203.0.113.50:7777"),
            udp_exchange("100.64.0.2", "203.0.113.1:7777"),
            // Another container, behind the same tunnel interface.
            udp_exchange("100.64.0.2", "100.64.0.99:7777"),
        ]
        .map(|r| r.ok())
    });
    let seen4 = stop_udp_echo(&w.isp, "203.0.113.50:7777", v4);
    let seen6 = stop_udp_echo(&w.isp, "[2001:db8:77::50]:7777", v6);
    let listing = w.exit.nft_list(DEFAULT_TABLE);
    let seen = format!("isp saw {seen4:?} {seen6:?}\n{listing}");
    assert_eq!(
        answers[0].as_deref(),
        Some("203.0.113.77"),
        "first block: {seen}"
    );
    assert_eq!(
        answers[1].as_deref(),
        Some("203.0.113.78"),
        "second block: {seen}"
    );
    assert_eq!(
        answers[2].as_deref(),
        Some("2001:db8:77::77"),
        "IPv6: {seen}"
    );
    assert_eq!(answers[3], None, "spoofed source got through");
    assert_eq!(answers[4], None, "container reached the exit node itself");
    assert!(!seen4.contains(&ip("198.18.5.2")), "{seen}");
    assert_eq!(answers[5], None, "container reached another one");
    assert!(counter(&listing, "acme: anti-spoof") >= 1, "{listing}");
    assert!(
        counter(&listing, "acme: no other forwarding in") >= 1,
        "{listing}"
    );
    assert!(counter(&listing, "acme: snat") >= 2, "{listing}");
    assert!(
        counter(&listing, "acme: no access to the exit node") >= 1,
        "{listing}"
    );

    // The exit node answers pings to its overlay addresses, over both families.
    w.client.run(&["ping", "-c1", "-W2", "100.64.0.1"]);
    w.client.run(&["ping", "-6", "-c1", "-W2", "fd77:0:9::1"]);
}

/// A TCP server in `ns` on each address: accepts, writes "hi", closes.
fn tcp_servers(ns: &Netns, addrs: &[&str]) {
    let addrs: Vec<SocketAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
    let (ready, bound) = std::sync::mpsc::channel();
    let count = addrs.len();
    ns.spawn(move || {
        for addr in addrs {
            let listener = TcpListener::bind(addr).unwrap();
            let ready = ready.clone();
            std::thread::spawn(move || {
                ready.send(()).unwrap();
                for mut conn in listener.incoming().flatten() {
                    let _ = conn.write_all(b"hi");
                }
            });
        }
    });
    for _ in 0..count {
        bound.recv().unwrap();
    }
}

/// Connects and reads the greeting: `Ok("hi")`, or the error and how long it took.
fn tcp_get(to: &str) -> Result<String, (ErrorKind, Duration)> {
    let started = Instant::now();
    let fail = |e: std::io::Error| (e.kind(), started.elapsed());
    let mut conn =
        TcpStream::connect_timeout(&to.parse().unwrap(), Duration::from_secs(3)).map_err(fail)?;
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).map_err(fail)?;
    Ok(text)
}

#[test]
fn policy_rejects_fast_counts_and_lets_exceptions_through() {
    let w = world("policy");
    // Things no container should reach, placed behind the uplink.
    for cmd in [
        "ip addr add 169.254.169.254/32 dev i0",
        "ip addr add 10.20.0.5/32 dev i0",
        "ip addr add 10.20.0.6/32 dev i0",
    ] {
        w.isp.run(&cmd.split(' ').collect::<Vec<_>>());
    }
    for dst in ["169.254.169.254/32", "10.20.0.5/32", "10.20.0.6/32"] {
        w.exit.run(&["ip", "route", "add", dst, "dev", "up0"]);
    }
    tcp_servers(
        &w.isp,
        &[
            "203.0.113.50:8080",
            "203.0.113.50:8081",
            "169.254.169.254:80",
            "10.20.0.5:80",
            "10.20.0.6:80",
        ],
    );
    let policy = Policy {
        allow: vec!["10.20.0.5 tcp/80".parse().unwrap()],
        deny: vec!["tcp/8081".parse().unwrap()],
        ..Policy::default()
    };
    w.exit.enter();
    let fw = Firewall::new(DEFAULT_TABLE);
    let rules = [egress(&[("100.64.0.0/24", "203.0.113.77")], policy)];
    fw.apply(&rules).unwrap();
    assert_eq!(fw.refused_counts().unwrap().get("acme"), Some(&(0, 0)));

    // The exit node itself reaches all of them.
    assert_eq!(w.exit.on(|| tcp_get("169.254.169.254:80")), Ok("hi".into()));
    assert_eq!(w.exit.on(|| tcp_get("10.20.0.6:80")), Ok("hi".into()));

    let results = w.client.on(|| {
        [
            "203.0.113.50:8080",
            "203.0.113.50:8081",
            "169.254.169.254:80",
            "10.20.0.6:80",
            "10.20.0.5:80",
        ]
        .map(tcp_get)
    });
    assert_eq!(results[0], Ok("hi".into()), "8080 must pass");
    for (i, what) in [
        (1, "8081"),
        (2, "the metadata address"),
        (3, "an RFC 1918 address"),
    ] {
        match results[i] {
            Err((ErrorKind::ConnectionRefused, took)) => {
                assert!(
                    took < Duration::from_millis(500),
                    "{what}: refused after {took:?}"
                )
            }
            ref other => panic!("{what}: expected a fast reset, got {other:?}"),
        }
    }
    assert_eq!(results[4], Ok("hi".into()), "the allow exception must pass");

    // Not TCP: ICMP administratively prohibited, also fast.
    let started = Instant::now();
    let udp = w
        .client
        .on(|| udp_exchange("100.64.0.2", "169.254.169.254:53"));
    let err = udp.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{err} after {:?}",
        started.elapsed()
    );
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "{err}");

    let (packets, bytes) = fw.refused_counts().unwrap()["acme"];
    assert!(
        packets >= 4 && bytes > 0,
        "{packets} packets, {bytes} bytes"
    );
}

/// Counts, in `ns`, packets arriving with a source in 100.64.0.0/10 or fd77::/16: a capture
/// of anything that left the exit node unNATed.
fn count_overlay_sources(ns: &Netns) -> impl Fn() -> u64 + '_ {
    ns.run(&["nft", "add", "table", "inet", "capture"]);
    ns.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "capture",
        "in",
        "{ type filter hook prerouting priority -300; }",
    ]);
    ns.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "capture",
        "in",
        "ip",
        "saddr",
        "100.64.0.0/10",
        "counter",
    ]);
    ns.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "capture",
        "in",
        "ip6",
        "saddr",
        "fd77::/16",
        "counter",
    ]);
    move || {
        let listing = ns.run(&["nft", "list", "chain", "inet", "capture", "in"]);
        listing
            .lines()
            .filter_map(|l| l.split("packets ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }
}

fn guard(wg: &str, remove: bool) {
    let wg = wg.to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let netlink = Netlink::current().unwrap();
        let guard = RoutingGuard::default();
        if remove {
            guard.remove(&netlink).await.unwrap();
            assert!(!guard.covers(&netlink, &[wg]).await.unwrap());
        } else {
            guard
                .ensure(&netlink, std::slice::from_ref(&wg))
                .await
                .unwrap();
            assert!(guard
                .covers(&netlink, std::slice::from_ref(&wg))
                .await
                .unwrap());
            // Again: nothing to add or remove.
            let (added, removed) = guard.ensure(&netlink, &[wg]).await.unwrap();
            assert!(added.is_empty() && removed.is_empty());
        }
    });
}

#[test]
fn after_a_flush_nothing_from_the_tunnel_is_forwarded() {
    let w = world("flush");
    let leaked = count_overlay_sources(&w.isp);
    w.exit.enter();
    let fw = Firewall::new(DEFAULT_TABLE);
    let rules = [egress(
        &[
            ("100.64.0.0/24", "203.0.113.77"),
            ("fd77:0:9::/64", "2001:db8:77::77"),
        ],
        Policy::default(),
    )];
    fw.apply(&rules).unwrap();
    guard("wgx-t", false);
    let echo4 = udp_echo(&w.isp, "203.0.113.50:7777");
    let echo6 = udp_echo(&w.isp, "[2001:db8:77::50]:7777");
    let send = || {
        w.client.on(|| {
            (
                udp_exchange("100.64.0.2", "203.0.113.50:7777").ok(),
                udp_exchange("fd77:0:9::2", "[2001:db8:77::50]:7777").ok(),
                tcp_get("203.0.113.50:9").map_err(|e| e.0),
            )
        })
    };
    let (v4, v6, _) = send();
    assert_eq!(
        (v4.as_deref(), v6.as_deref()),
        (Some("203.0.113.77"), Some("2001:db8:77::77"))
    );
    // With the guard, traffic between containers still reaches the forward chain's drop.
    assert_eq!(
        w.client
            .on(|| udp_exchange("100.64.0.2", "100.64.0.99:7777").ok()),
        None
    );
    let listing = w.exit.nft_list(DEFAULT_TABLE);
    assert_eq!(
        counter(&listing, "acme: no other forwarding in"),
        1,
        "{listing}"
    );

    // Someone flushes the ruleset: nothing from the tunnel leaves, NATed or not. (Routing
    // answers with ICMP administratively prohibited, but the kernel rate-limits those per
    // sender, so whether this sender hears of it at once is not asserted.)
    w.exit.run(&["nft", "flush", "ruleset"]);
    assert_eq!(fw.verify(&rules).unwrap(), Verification::Missing);
    let (v4, v6, tcp) = send();
    assert_eq!((v4, v6), (None, None));
    assert!(tcp.is_err(), "{tcp:?}");
    assert_eq!(
        leaked(),
        0,
        "packets with an overlay source reached the isp"
    );

    // The table back: traffic flows again, from the egress IP.
    fw.apply(&rules).unwrap();
    let (v4, _, _) = send();
    assert_eq!(v4.as_deref(), Some("203.0.113.77"));

    // Without the guard the same flush leaks the overlay addresses: the guard is what holds.
    guard("wgx-t", true);
    w.exit.run(&["nft", "flush", "ruleset"]);
    let _ = send();
    assert!(
        leaked() > 0,
        "the control leaked nothing: the capture does not work"
    );
    let seen = stop_udp_echo(&w.isp, "203.0.113.50:7777", echo4);
    stop_udp_echo(&w.isp, "[2001:db8:77::50]:7777", echo6);
    assert!(seen.contains(&ip("100.64.0.2")), "{seen:?}");
}

/// Sends `what` on `conn` and reads as many bytes back.
fn echo_over(conn: &mut TcpStream, what: &[u8]) -> std::io::Result<Vec<u8>> {
    conn.write_all(what)?;
    let mut back = vec![0; what.len()];
    conn.read_exact(&mut back)?;
    Ok(back)
}

#[test]
fn a_changed_policy_judges_open_flows_again() {
    let w = world("rejudge");
    let (ready, bound) = std::sync::mpsc::channel();
    w.isp.spawn(move || {
        let listener = TcpListener::bind("203.0.113.50:8082").unwrap();
        ready.send(()).unwrap();
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    bound.recv().unwrap();
    w.exit.enter();
    let fw = Firewall::new(DEFAULT_TABLE);
    let with = |policy| [egress(&[("100.64.0.0/24", "203.0.113.77")], policy)];
    fw.apply(&with(Policy::default())).unwrap();

    let mut conn = w
        .client
        .on(|| {
            TcpStream::connect_timeout(
                &"203.0.113.50:8082".parse().unwrap(),
                Duration::from_secs(3),
            )
        })
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(echo_over(&mut conn, b"one").unwrap(), b"one");
    // Its later packets pass on the flow's mark, without the policy's lookups.
    assert_eq!(echo_over(&mut conn, b"two").unwrap(), b"two");

    // The policy now denies the port: the open flow's next packet is judged again, refused.
    let deny = Policy {
        deny: vec!["tcp/8082".parse().unwrap()],
        ..Policy::default()
    };
    fw.apply(&with(deny)).unwrap();
    let after = echo_over(&mut conn, b"three");
    assert!(
        matches!(&after, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the open flow must be reset by the changed policy, got {after:?}"
    );
    assert_eq!(fw.refused_counts().unwrap()["acme"].0, 1);
}

#[test]
fn policy_generations_differ_with_the_policy_and_are_never_zero() {
    let open = egress(&[], Policy::default());
    let mut closed = open.clone();
    closed.policy.deny = vec!["tcp/25".parse().unwrap()];
    let mut moved = open.clone();
    moved.exit_addresses = vec![ip("198.51.100.2")];
    let g = ruleset::policy_generation(&open);
    assert_ne!(g, 0);
    assert_eq!(g, ruleset::policy_generation(&open.clone()));
    assert_ne!(g, ruleset::policy_generation(&closed));
    assert_ne!(g, ruleset::policy_generation(&moved));
}

fn network(name: &str, prefix: &str, wg: &str) -> NetworkRules {
    let prefix: ipnet::Ipv6Net = prefix.parse().unwrap();
    let host = |n: u128| std::net::Ipv6Addr::from(u128::from(prefix.network()) + n);
    NetworkRules {
        name: name.into(),
        wg_interface: wg.into(),
        prefix,
        gateway: host(1),
        resolver: host(3),
    }
}

#[test]
fn each_network_forwards_only_within_itself_in_the_one_table() {
    let ns = Netns::new("networks");
    ns.enter();
    let fw = Firewall::new(DEFAULT_TABLE);
    let networks = [
        network("acme", "fdaa:0:1::/48", "wgn-acme"),
        network("beta", "fdaa:0:2::/48", "wgn-beta"),
    ];
    let spaces = Spaces {
        egresses: &[acme()],
        networks: &networks,
    };
    fw.apply_spaces(spaces).unwrap();
    assert_eq!(fw.verify_spaces(spaces).unwrap(), Verification::Matches);
    // Without the networks' rules the same table differs: they are checked by content too.
    assert!(matches!(
        fw.verify(&[acme()]).unwrap(),
        Verification::Differs(_)
    ));
    let listing = ns.nft_list("wgexitd");
    for want in [
        "iifname \"wgn-acme\" meta mark set meta mark | 0x10000000 comment \"acme: mark from the tunnel\"",
        "iifname \"wgn-acme\" oifname \"wgn-acme\" ip6 daddr @net6_acme accept",
        "iifname \"wgn-beta\" counter packets 0 bytes 0 counter name \"dropped_beta\" reject with icmpx admin-prohibited",
        "iifname \"wgn-beta\" ip6 saddr != @net6_beta counter packets 0 bytes 0 counter name \"dropped_beta\" drop",
        "iifname \"wgn-beta\" ip6 daddr fdaa:0:2::3 udp dport 53 accept",
        "iifname \"wgn-acme\" ip6 daddr fdaa:0:1::1 icmpv6 type echo-request accept",
        "iifname \"wgn-acme\" ip6 daddr fdaa:0:1::3 icmpv6 type echo-request accept",
        "iifname \"wgn-acme\" counter packets 0 bytes 0 counter name \"dropped_acme\" drop comment \"acme: to the gateway\"",
        "elements = { fdaa:0:1::/48 }",
    ] {
        assert_has(&listing, want);
    }
    // Each network counts its drops in its own counter, apart from the egresses'.
    let dropped = fw.dropped_counts().unwrap();
    assert_eq!(dropped.keys().collect::<Vec<_>>(), ["acme", "beta"]);
    assert_eq!(dropped["acme"], (0, 0));
    let by_space: Vec<_> = fw.space_counts().unwrap().into_keys().collect();
    assert_eq!(
        by_space,
        [
            crate::space::Space::Egress("acme".into()),
            crate::space::Space::Network("acme".into()),
            crate::space::Space::Network("beta".into()),
        ]
    );
    // Every network's "leaves" rule comes before any "enters" rule, all after the egresses'.
    let text = without_handles(&listing);
    let pos = |s: &str| text.find(s).unwrap();
    assert!(pos("beta: leaves the network") < pos("acme: enters the network"));
    assert!(pos("acme: no other forwarding out") < pos("acme: spoofed source"));
    // Replaced whole, in one transaction; removed with the table.
    fw.apply(&[acme()]).unwrap();
    assert!(!ns.nft_list("wgexitd").contains("wgn-acme"));
    fw.teardown().unwrap();
    assert!(!fw.exists().unwrap());
}

#[test]
fn a_network_the_table_cannot_express_is_refused() {
    let mut bad = network("acme net", "fdaa:0:1::/48", "wgn-acme");
    let spaces = |n: &NetworkRules| {
        Firewall::new(DEFAULT_TABLE).desired(Spaces {
            egresses: &[],
            networks: std::slice::from_ref(n),
        })
    };
    assert!(
        matches!(spaces(&bad), Err(FirewallError::Invalid(m)) if m.contains("network \"acme net\""))
    );
    bad.name = "acme".into();
    bad.wg_interface = "wgn/acme".into();
    assert!(matches!(spaces(&bad), Err(FirewallError::Invalid(m)) if m.contains("wg_interface")));
}
