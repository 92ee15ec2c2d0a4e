//! Row 6's resolvers: wgexitd's and Debian's `dnsmasq`, on the same path, under `dnsperf`.
//!
//! A member's tunnel reaches one port of the gateway: the resolver's (`<prefix>::3`, 53);
//! the exit node's firewall drops anything else a member sends to the gateway, so a second
//! resolver cannot be put behind the same tunnel. Both are therefore asked from inside the
//! gateway's namespace, over its loopback, from the address of a live member (`netq`, whose
//! /128 the bench adds to the gateway's `lo`, so wgexitd answers it as the member it is):
//! wgexitd on `[<prefix>::3]:53`, dnsmasq on the same address, port [`DNSMASQ_PORT`]. Same
//! address, path, load generator and records: dnsmasq has `web.internal` as a
//! `--host-record`, and both forward other names to the same upstream (a third resolver, a
//! dnsmasq in `isp`). dnsmasq's cache is off, as wgexitd has none: both forward every query.
//!
//! `dnsperf` keeps [`OUTSTANDING`] queries in flight from [`CLIENTS`] sockets for `secs`
//! seconds; queries per second counts NOERROR answers, latencies are dnsperf's own (`-v`).
//! Beside them, what each answer cost: the resolver's CPU time (user + system, from
//! `/proc`) per answer, and the queries the upstream received per answer (an nftables
//! counter in `isp`): both resolvers ask the upstream once per question in flight, not
//! once per asker.
//! Each round asks both resolvers, in an order that alternates, one name after the other;
//! then wgexitd alone as the member `neta` sees it, through its tunnel.
//!
//! ```text
//!  gateway (exit ns): dnsperf from netq's address ──lo──► wgexitd  [fdaa:0:b::3]:53 ──┐
//!                                                 ──lo──► dnsmasq [fdaa:0:b::3]:5353 ─┴► isp: dnsmasq 198.18.0.10:53
//!  member neta: dnsperf ──wgexit──► wgexitd [fdaa:0:b::3]:53
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::report::{paired_spread, ratio_with, verdict, with_range};
use crate::stats::{range, Summary};
use crate::world::{sh, try_sh, World};

/// dnsmasq's port on the resolver's address.
pub const DNSMASQ_PORT: &str = "5353";
/// The upstream both forward to: `isp`'s loopback address.
pub const UPSTREAM: &str = "198.18.0.10";
/// A name only the upstream knows, and its address.
const FORWARDED: (&str, &str) = ("www.bench.test", "2001:db8::80");
/// Queries in flight: a member's share of forwarded queries in wgexitd
/// (`FORWARDS_PER_MEMBER`), so neither resolver turns any away.
const OUTSTANDING: &str = "16";
const CLIENTS: &str = "4";

/// One dnsperf run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DnsRun {
    pub sent: u64,
    pub noerror: u64,
    /// NOERROR answers per second.
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The resolver's CPU time per NOERROR answer, µs.
    pub cpu_us: f64,
    /// Queries the upstream received per NOERROR answer.
    pub upstream_per_answer: f64,
}

/// One name asked of both resolvers, round by round.
#[derive(Debug, Default, Serialize)]
pub struct Pair {
    pub wgexitd: Vec<DnsRun>,
    pub dnsmasq: Vec<DnsRun>,
}

#[derive(Debug, Default, Serialize)]
pub struct ResolverResults {
    pub internal: Pair,
    pub forwarded: Pair,
    /// wgexitd asked from a member, through its tunnel.
    pub tunnel: Vec<DnsRun>,
}

struct Killed(Child);

impl Killed {
    /// `ip netns exec` execs the command: the child's pid is dnsmasq's.
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// The isp's count of queries to the upstream, by a table of the bench's own.
struct UpstreamCounter {
    isp: String,
    table: String,
}

impl UpstreamCounter {
    fn new(world: &World) -> UpstreamCounter {
        let counter = UpstreamCounter {
            isp: world.isp.clone(),
            table: format!("{}upstream", world.id),
        };
        let rules = world.path("bench-upstream.nft");
        let ruleset = format!(
            "table inet {} {{\n chain pre {{\n  type filter hook prerouting priority -300;\n  \
             ip daddr {UPSTREAM} udp dport 53 counter\n }}\n}}\n",
            counter.table
        );
        std::fs::write(&rules, ruleset).expect("nftables rules");
        let rules = rules.display().to_string();
        sh(&["ip", "netns", "exec", &counter.isp, "nft", "-f", &rules]);
        counter
    }

    fn packets(&self) -> u64 {
        let listing = sh(&[
            "ip",
            "netns",
            "exec",
            &self.isp,
            "nft",
            "list",
            "table",
            "inet",
            &self.table,
        ]);
        listing
            .split_once("packets ")
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for UpstreamCounter {
    fn drop(&mut self) {
        let _ = try_sh(&[
            "ip",
            "netns",
            "exec",
            &self.isp,
            "nft",
            "delete",
            "table",
            "inet",
            &self.table,
        ]);
    }
}

/// What one dnsperf run cost: the resolver's CPU (`pid`) and the upstream's queries.
fn costed(pid: Option<u32>, upstream: &UpstreamCounter, run: impl FnOnce() -> DnsRun) -> DnsRun {
    let (cpu, asked) = (crate::leases::cpu_ms(pid), upstream.packets());
    let mut r = run();
    let answers = r.noerror.max(1) as f64;
    r.cpu_us = (crate::leases::cpu_ms(pid) - cpu) * 1000.0 / answers;
    r.upstream_per_answer = upstream.packets().saturating_sub(asked) as f64 / answers;
    r
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dnsmasq(ns: &str, pid: &Path, args: &[String]) -> Killed {
    Killed(
        Command::new("ip")
            .args(["netns", "exec", ns, "dnsmasq", "--keep-in-foreground"])
            .args(["--no-resolv", "--no-hosts", "--conf-file=/dev/null"])
            .args(["--user=root", "--bind-interfaces"])
            .arg(format!("--pid-file={}", pid.display()))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian dnsmasq-base)"),
    )
}

/// Waits until `server` answers `name` AAAA with `expected` when asked from `from`:
/// the server is up and both resolvers answer the same.
fn wait_answer(ns: &str, from: &str, server: &str, port: &str, name: &str, expected: &str) {
    let start = Instant::now();
    let at = format!("@{server}");
    loop {
        let out = try_sh(&[
            "ip", "netns", "exec", ns, "dig", "+short", "+tries=1", "+time=1", "-b", from, "-p",
            port, &at, name, "AAAA",
        ]);
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if got == expected {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{name} AAAA from {server} port {port}: {got:?}, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `dnsperf` in `ns` against `[server]:port` for `secs` seconds, asking `data`'s questions.
fn dnsperf(
    ns: &str,
    from: Option<&str>,
    server: &str,
    port: &str,
    data: &Path,
    secs: u32,
) -> DnsRun {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "dnsperf", "-s", server, "-p", port])
        .args([
            "-c",
            CLIENTS,
            "-q",
            OUTSTANDING,
            "-l",
            &secs.to_string(),
            "-v",
        ])
        .arg("-d")
        .arg(data);
    if let Some(from) = from {
        cmd.args(["-a", from]);
    }
    let out = cmd.output().expect("dnsperf (Debian dnsperf)");
    assert!(
        out.status.success(),
        "dnsperf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// dnsperf's verbose output: a line per answer (`> NOERROR name type seconds`), then totals.
fn parse(out: &str) -> DnsRun {
    let (mut latencies, mut noerror, mut sent, mut secs) = (Vec::new(), 0u64, 0u64, f64::NAN);
    for line in out.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [">", "NOERROR", _, _, seconds] => {
                noerror += 1;
                if let Ok(s) = seconds.parse::<f64>() {
                    latencies.push(s * 1e6);
                }
            }
            ["Queries", "sent:", n, ..] => sent = n.parse().unwrap_or(0),
            ["Run", "time", "(s):", s, ..] => secs = s.parse().unwrap_or(f64::NAN),
            _ => {}
        }
    }
    let summary = Summary::of(&latencies);
    DnsRun {
        sent,
        noerror,
        per_second: noerror as f64 / secs,
        p50_us: summary.median,
        p99_us: summary.p99,
        ..DnsRun::default()
    }
}

/// `perf record` of wgexitd while `f` runs, to `out`, if asked.
fn recorded<T>(world: &World, out: Option<PathBuf>, f: impl FnOnce() -> T) -> T {
    let _recording = out.and_then(|out| crate::perf::record(world, &out));
    f()
}

/// Who asks in row 6.
pub struct Askers<'a> {
    /// The resolver's address (`<prefix>::3`).
    pub resolver: &'a str,
    /// The namespace of the member that asks through its tunnel, and its address.
    pub member_ns: &'a str,
    pub member: &'a str,
    /// The address of the member whose address asks inside the gateway.
    pub inside: &'a str,
    /// What `web.internal` answers.
    pub web: &'a str,
}

/// The member's address on the gateway's loopback, removed when dropped.
struct Borrowed<'a>(&'a str, String);

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        let _ = try_sh(&["ip", "-n", self.0, "addr", "del", &self.1, "dev", "lo"]);
    }
}

/// Row 6's resolver comparison: `rounds` rounds of `secs` seconds per resolver and name;
/// `perf`: where to write a `perf record` of wgexitd during the first round (`.internal`
/// and `.forwarded` appended).
pub fn run(
    world: &World,
    who: &Askers,
    secs: u32,
    rounds: usize,
    perf: Option<&Path>,
) -> ResolverResults {
    let isp = world.isp.as_str();
    let _upstream = dnsmasq(
        isp,
        &world.path("bench-upstream.pid"),
        &[
            format!("--listen-address={UPSTREAM}"),
            format!("--host-record={},{}", FORWARDED.0, FORWARDED.1),
        ],
    );
    wait_answer(isp, UPSTREAM, UPSTREAM, "53", FORWARDED.0, FORWARDED.1);
    let exit = world.exit.as_str();
    let inside = format!("{}/128", who.inside);
    sh(&[
        "ip", "-n", exit, "addr", "add", &inside, "dev", "lo", "nodad",
    ]);
    let _borrowed = Borrowed(exit, inside);
    let _dnsmasq = dnsmasq(
        exit,
        &world.path("bench-dnsmasq.pid"),
        &[
            format!("--listen-address={}", who.resolver),
            format!("--port={DNSMASQ_PORT}"),
            format!("--host-record=web.internal,{}", who.web),
            "--local=/internal/".into(),
            "--local-ttl=5".into(),
            format!("--server={UPSTREAM}"),
            "--cache-size=0".into(),
        ],
    );
    let names = [("web.internal", who.web), FORWARDED];
    for port in ["53", DNSMASQ_PORT] {
        for (name, expected) in names {
            wait_answer(exit, who.inside, who.resolver, port, name, expected);
        }
    }
    wait_answer(
        who.member_ns,
        who.member,
        who.resolver,
        "53",
        names[0].0,
        who.web,
    );

    let upstream = UpstreamCounter::new(world);
    let data = names.map(|(name, _)| {
        let path = world.path(&format!("bench-dns-{name}"));
        std::fs::write(&path, format!("{name} AAAA\n")).expect("dnsperf input");
        path
    });
    let mut r = ResolverResults::default();
    for round in 0..rounds {
        for (i, pair) in [&mut r.internal, &mut r.forwarded].into_iter().enumerate() {
            let tag = ["internal", "forwarded"][i];
            let out = perf
                .filter(|_| round == 0)
                .map(|p| PathBuf::from(format!("{}.{tag}", p.display())));
            let ours = || {
                recorded(world, out, || {
                    costed(world.daemon_pid(), &upstream, || {
                        dnsperf(exit, Some(who.inside), who.resolver, "53", &data[i], secs)
                    })
                })
            };
            let theirs = || {
                costed(Some(_dnsmasq.pid()), &upstream, || {
                    dnsperf(
                        exit,
                        Some(who.inside),
                        who.resolver,
                        DNSMASQ_PORT,
                        &data[i],
                        secs,
                    )
                })
            };
            let (o, t) = if round % 2 == 0 {
                let o = ours();
                (o, theirs())
            } else {
                let t = theirs();
                (ours(), t)
            };
            eprintln!(
                "  {}: wgexitd {:.0}/s p99 {:.0} µs {:.1} µs CPU {:.2} upstream/answer, \
                 dnsmasq {:.0}/s p99 {:.0} µs {:.1} µs CPU {:.2} upstream/answer",
                names[i].0,
                o.per_second,
                o.p99_us,
                o.cpu_us,
                o.upstream_per_answer,
                t.per_second,
                t.p99_us,
                t.cpu_us,
                t.upstream_per_answer
            );
            pair.wgexitd.push(o);
            pair.dnsmasq.push(t);
        }
        let t = dnsperf(who.member_ns, None, who.resolver, "53", &data[0], secs);
        eprintln!(
            "  web.internal through the tunnel: wgexitd {:.0}/s p99 {:.0} µs",
            t.per_second, t.p99_us
        );
        r.tunnel.push(t);
    }
    r
}

fn median(v: &[f64]) -> f64 {
    Summary::of(v).median
}

/// The table's lines for row 6's resolvers.
pub fn rows(r: &ResolverResults) -> Vec<[String; 5]> {
    let mut out = Vec::new();
    let pairs = [
        ("AAAA web.internal", &r.internal),
        ("AAAA www.bench.test (forwarded)", &r.forwarded),
    ];
    for (what, pair) in pairs {
        let of = |runs: &[DnsRun], f: fn(&DnsRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
        let (ours, theirs) = (
            of(&pair.wgexitd, |x| x.per_second),
            of(&pair.dnsmasq, |x| x.per_second),
        );
        let (o, t) = (median(&ours), median(&theirs));
        let sent: u64 = pair.wgexitd.iter().map(|x| x.sent).sum();
        let answered: u64 = pair.wgexitd.iter().map(|x| x.noerror).sum();
        out.push([
            format!("{what} answers/s, dnsperf {OUTSTANDING} in flight, same path ({answered} of {sent} answered)"),
            with_range(o, &ours),
            format!("dnsmasq {}", with_range(t, &theirs)),
            ratio_with(o, t, paired_spread(&ours, &theirs)),
            format!("≥ 1x: {}", verdict(o >= t)),
        ]);
        let (op, tp) = (
            of(&pair.wgexitd, |x| x.p99_us),
            of(&pair.dnsmasq, |x| x.p99_us),
        );
        let (o99, t99) = (median(&op), median(&tp));
        let p50 = |runs: &[DnsRun]| median(&of(runs, |x| x.p50_us));
        out.push([
            format!("{what} latency p50 / p99 (µs)"),
            format!("{:.0} / {o99:.0}", p50(&pair.wgexitd)),
            format!("dnsmasq {:.0} / {t99:.0}", p50(&pair.dnsmasq)),
            ratio_with(o99, t99, paired_spread(&op, &tp)),
            format!("p99 ≤ 2x: {}", verdict(o99 <= 2.0 * t99)),
        ]);
        let cost = |runs: &[DnsRun]| {
            format!(
                "{:.1} µs; {:.2}",
                median(&of(runs, |x| x.cpu_us)),
                median(&of(runs, |x| x.upstream_per_answer))
            )
        };
        let (oc, tc) = (
            median(&of(&pair.wgexitd, |x| x.cpu_us)),
            median(&of(&pair.dnsmasq, |x| x.cpu_us)),
        );
        out.push([
            format!("{what} per answer: resolver CPU; upstream queries"),
            cost(&pair.wgexitd),
            format!("dnsmasq {}", cost(&pair.dnsmasq)),
            format!("{:.2}x CPU", oc / tc),
            String::new(),
        ]);
    }
    let per_second: Vec<f64> = r.tunnel.iter().map(|x| x.per_second).collect();
    let p99: Vec<f64> = r.tunnel.iter().map(|x| x.p99_us).collect();
    let (lo, hi) = range(&p99);
    out.push([
        "AAAA web.internal from a member through its tunnel: answers/s; p99 (µs)".into(),
        format!(
            "{}; {:.0} ({lo:.0}–{hi:.0})",
            with_range(median(&per_second), &per_second),
            median(&p99)
        ),
        "—".into(),
        "—".into(),
        String::new(),
    ]);
    out
}
