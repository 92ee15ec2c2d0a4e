//! Many ADD/DEL cycles on one host leave nothing behind: no link, no `wireguard-go`, no
//! socket, no state file, no lease, no peer, no nftables change.

use std::path::Path;

use crate::world::{sh, World, EGRESS_IP, TOKEN};

const THREADS: usize = 4;
const CYCLES_PER_THREAD: usize = 50;

/// The exit node's nftables table without its counters.
fn nft_rules(w: &World) -> String {
    let listing = sh(&[
        "ip", "netns", "exec", &w.exit, "nft", "list", "table", "inet", "wgexitd",
    ]);
    listing
        .lines()
        .map(|l| match l.find("counter packets") {
            Some(i) => {
                let rest = &l[i + "counter packets".len()..];
                let after = rest
                    .find(" drop")
                    .or_else(|| rest.find(" snat"))
                    .unwrap_or(rest.len());
                format!("{}counter{}", &l[..i], &rest[after..])
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn two_hundred_add_del_cycles_leave_nothing_behind() {
    let mut w = World::new();
    let conf = w.net_conf("acme");
    let containers: Vec<_> = (0..THREADS)
        .map(|t| w.container(&format!("cy{t}")))
        .collect();
    let host_links = w.links(&w.host);
    let rules = nft_rules(&w);
    let exit_links = w.links(&w.exit);

    let w = &w;
    let used: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = containers
            .iter()
            .map(|base| {
                let conf = conf.clone();
                s.spawn(move || {
                    let mut host_ifnames = Vec::new();
                    for i in 0..CYCLES_PER_THREAD {
                        // A new container id each cycle, in the same namespace.
                        let mut c = base.clone();
                        c.id = format!("{}-{i}", base.id);
                        w.cni("ADD", &c, &conf).ok();
                        // As recorded: a warm spare's name when ADD took one.
                        host_ifnames.push(c.host_ifname("eth0"));
                        if i % 10 == 0 {
                            assert_eq!(w.echo_from(&c).unwrap(), EGRESS_IP);
                        }
                        w.cni("DEL", &c, &conf).ok_empty();
                        assert_eq!(w.links(&c.netns), vec!["lo"]);
                    }
                    host_ifnames
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let names: Vec<String> = used.into_iter().flatten().collect();
    assert_eq!(names.len(), THREADS * CYCLES_PER_THREAD);
    for name in &names {
        assert!(
            wgexit::wg::userspace::pid_of(name).is_none(),
            "wireguard-go {name} left running"
        );
        let sock = format!("/var/run/wireguard/{name}.sock");
        assert!(!Path::new(&sock).exists(), "{sock} left behind");
    }
    assert_eq!(w.links(&w.host), host_links);
    assert_eq!(w.links(&w.exit), exit_links);
    for c in &containers {
        assert_eq!(w.links(&c.netns), vec!["lo"]);
    }
    assert!(w.state_files().is_empty(), "{:?}", w.state_files());
    assert!(w.leases("acme", TOKEN).is_empty());
    assert!(w.exit_peers().is_empty());
    assert_eq!(nft_rules(w), rules);
}
