//! The table, the raw samples and the scale chart.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cni::CniResults;
use crate::leases::LeaseResults;
use crate::networks::NetworkResults;
use crate::stats::{range, ratio_spread};
use crate::tunnel::{TunnelResults, BIG_EGRESS_IPS, BIG_POLICY_RULES};
use crate::vm::VmResults;
use crate::Sizes;

/// vprox's published lease ("connect") rate, 4 vCPUs, P-256 TLS.
const VPROX_LEASES_PER_S: f64 = 1462.0;
const TARGET_LEASES_PER_S: f64 = 1500.0;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            memory_gib: mem_kib / 1024.0 / 1024.0,
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} x {}, Linux {}, {:.0} GiB RAM",
            self.cpus, self.cpu, self.kernel, self.memory_gib
        )
    }
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub date: String,
    pub machine: Machine,
    pub smoke: bool,
    pub sizes: SizesOut,
    pub seconds: f64,
    pub cni: Option<CniResults>,
    pub leases: Option<LeaseResults>,
    pub tunnel: Option<TunnelResults>,
    pub networks: Option<NetworkResults>,
    pub pool: Option<crate::pool::PoolResults>,
    pub attribution: Option<crate::attribution::AttributionResults>,
    pub vm: Option<VmResults>,
}

#[derive(Debug, Serialize)]
pub struct SizesOut {
    pub containers: usize,
    pub throughput_leases: usize,
    pub concurrency: usize,
    pub scale_points: Vec<usize>,
    pub iperf_secs: u32,
}

fn now_utc() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

struct Row {
    row: &'static str,
    metric: String,
    wgexit: String,
    comparison: String,
    ratio: String,
    target: String,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "—".into()
    }
}

/// A ratio with its spread over rounds: "2.05x (rounds 1.92x-2.21x)".
pub(crate) fn ratio_with(a: f64, b: f64, spread: Option<(f64, f64)>) -> String {
    match spread {
        Some((lo, hi)) if lo.is_finite() && hi.is_finite() => {
            format!("{} (rounds {lo:.2}x–{hi:.2}x)", ratio(a, b))
        }
        _ => ratio(a, b),
    }
}

/// A value with the range of its rounds: "474 (460–481)".
pub(crate) fn with_range(median: f64, rounds: &[f64]) -> String {
    let (lo, hi) = range(rounds);
    if rounds.len() > 1 {
        format!("{median:.0} ({lo:.0}–{hi:.0})")
    } else {
        format!("{median:.0}")
    }
}

/// Per-round ratios a/b of paired rounds.
pub(crate) fn paired_spread(a: &[f64], b: &[f64]) -> Option<(f64, f64)> {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    (ratios.len() > 1).then(|| range(&ratios))
}

/// Rounds the ADD samples are cut into for their spread.
const ADD_ROUNDS: usize = 3;

pub(crate) fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// Row 7's lines.
fn vm_rows(
    v: &VmResults,
    push: &mut impl FnMut(&'static str, String, String, String, String, String),
) {
    if let Some(why) = &v.error {
        push(
            "7",
            "kernel CNI ADD in a VM".into(),
            "not measured".into(),
            "—".into(),
            "—".into(),
            why.clone(),
        );
        return;
    }
    let (w, p) = (&v.wgexit_add, &v.ptp_add);
    push(
        "7",
        format!(
            "kernel CNI ADD median (ms), VM (QEMU TCG, Linux {}), {} containers",
            v.kernel, w.n
        ),
        format!("{:.1}", w.median),
        format!("ptp+host-local {:.1}", p.median),
        ratio_with(
            w.median,
            p.median,
            ratio_spread(&v.wgexit_add_ms, &v.ptp_add_ms, ADD_ROUNDS),
        ),
        format!("≤ 1.3x: {}", verdict(w.median / p.median <= 1.3)),
    );
    push(
        "7",
        "kernel: first request after ADD OK on first try".into(),
        format!("{}/{}", v.first_try_ok.0, v.first_try_ok.1),
        "—".into(),
        "—".into(),
        String::new(),
    );
}

impl Results {
    pub fn new(machine: Machine, smoke: bool, s: Sizes) -> Results {
        Results {
            date: now_utc(),
            machine,
            smoke,
            sizes: SizesOut {
                containers: s.containers,
                throughput_leases: s.throughput_leases,
                concurrency: s.concurrency,
                scale_points: s.scale_points,
                iperf_secs: s.iperf_secs,
            },
            seconds: 0.0,
            cni: None,
            leases: None,
            tunnel: None,
            networks: None,
            pool: None,
            attribution: None,
            vm: None,
        }
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut push = |row,
                        metric: String,
                        wgexit: String,
                        comparison: String,
                        ratio: String,
                        target: String| {
            rows.push(Row {
                row,
                metric,
                wgexit,
                comparison,
                ratio,
                target,
            })
        };
        if let Some(c) = &self.cni {
            let n = c.wgexit_add.n;
            let rounds = ratio_spread(&c.wgexit_add_ms, &c.ptp_add_ms, ADD_ROUNDS);
            // The target is every round's, not only the median's.
            let worst = rounds.map_or(c.wgexit_add.median / c.ptp_add.median, |(_, hi)| hi);
            push(
                "1",
                format!("CNI ADD median (ms), {n} containers"),
                format!("{:.1}", c.wgexit_add.median),
                format!("ptp+host-local {:.1}", c.ptp_add.median),
                ratio_with(c.wgexit_add.median, c.ptp_add.median, rounds),
                format!("every round ≤ 2x: {}", verdict(worst <= 2.0)),
            );
            if c.cold_add.n > 0 {
                push(
                    "1",
                    format!(
                        "CNI ADD median (ms) without a warm spare (spareLinks 0), same rounds{}",
                        match c.cold_add_errors.len() {
                            0 => String::new(),
                            n => format!(", {n} failed: {}", c.cold_add_errors[0].trim()),
                        }
                    ),
                    format!("{:.1}", c.cold_add.median),
                    format!("ptp+host-local {:.1}", c.ptp_add.median),
                    ratio_with(
                        c.cold_add.median,
                        c.ptp_add.median,
                        ratio_spread(&c.cold_add_ms, &c.ptp_add_ms, ADD_ROUNDS),
                    ),
                    String::new(),
                );
            }
            push(
                "1",
                "CNI ADD p95 (ms)".into(),
                format!("{:.1}", c.wgexit_add.p95),
                format!("ptp+host-local {:.1}", c.ptp_add.p95),
                ratio(c.wgexit_add.p95, c.ptp_add.p95),
                String::new(),
            );
            push(
                "1",
                "CNI DEL median (ms)".into(),
                format!("{:.1}", c.wgexit_del.median),
                format!("ptp+host-local {:.1}", c.ptp_del.median),
                ratio(c.wgexit_del.median, c.ptp_del.median),
                String::new(),
            );
            push(
                "1",
                "CNI DEL p95 (ms)".into(),
                format!("{:.1}", c.wgexit_del.p95),
                format!("ptp+host-local {:.1}", c.ptp_del.p95),
                ratio(c.wgexit_del.p95, c.ptp_del.p95),
                String::new(),
            );
            let total = c.first_request_ms.len();
            push(
                "2",
                "first request after ADD OK on first try".into(),
                format!(
                    "{}/{} ({:.0}%)",
                    c.first_try_ok,
                    total,
                    100.0 * c.first_try_ok as f64 / total.max(1) as f64
                ),
                "—".into(),
                "—".into(),
                format!("100%: {}", verdict(c.first_try_ok == total)),
            );
            push(
                "2",
                "first request latency median / p95 (ms)".into(),
                format!("{:.2} / {:.2}", c.first_request.median, c.first_request.p95),
                "—".into(),
                "—".into(),
                String::new(),
            );
        }
        if let Some(l) = &self.leases {
            let t = &l.throughput;
            push(
                "3",
                format!(
                    "leases/s, {} clients, new TLS connection each ({} leases)",
                    t.clients, t.leases
                ),
                with_range(t.per_second, &t.rounds_per_second),
                format!("vprox {VPROX_LEASES_PER_S:.0} (4 vCPU)"),
                ratio(t.per_second, VPROX_LEASES_PER_S),
                format!(
                    "≥ {TARGET_LEASES_PER_S:.0}/s: {}",
                    verdict(t.per_second >= TARGET_LEASES_PER_S && t.errors == 0)
                ),
            );
            push(
                "3",
                "lease latency p50 / p99 under that load (ms)".into(),
                format!("{:.1} / {:.1}", t.latency.median, t.latency.p99),
                "—".into(),
                "—".into(),
                if t.errors > 0 {
                    format!("{} errors", t.errors)
                } else {
                    String::new()
                },
            );
            let c = &t.cpu_ms_per_lease;
            push(
                "3",
                "CPU per lease: wgexitd / wireguard-go / clients (ms)".into(),
                format!(
                    "{:.2} / {:.2} / {:.2}",
                    c.wgexitd, c.wireguard_go, c.clients
                ),
                "—".into(),
                "—".into(),
                format!(
                    "server-only bound on {} cores: {:.0}/s",
                    self.machine.cpus,
                    1000.0 * self.machine.cpus as f64 / (c.wgexitd + c.wireguard_go).max(1e-9)
                ),
            );
            if let Some(first) = l.scale.first() {
                for p in &l.scale[1..] {
                    let r = p.latency.median / first.latency.median;
                    push(
                        "4",
                        format!("lease median / p99 at {} peers (ms)", p.peers),
                        format!("{:.1} / {:.1}", p.latency.median, p.latency.p99),
                        format!(
                            "first {} peers {:.1} / {:.1}",
                            first.peers, first.latency.median, first.latency.p99
                        ),
                        ratio(p.latency.median, first.latency.median),
                        format!("≤ 2x: {}", verdict(r <= 2.0)),
                    );
                }
                for p in &l.scale[1..] {
                    push(
                        "4",
                        format!("RSS at {} peers: wgexitd + wireguard-go (MiB)", p.peers),
                        format!(
                            "{:.0} + {:.0}",
                            p.wgexitd_rss_kib as f64 / 1024.0,
                            p.wireguard_go_rss_kib as f64 / 1024.0
                        ),
                        "—".into(),
                        "—".into(),
                        String::new(),
                    );
                }
                if let Some(last) = l.scale.last() {
                    let peers = last.peers.max(1) as f64;
                    let per =
                        |now: u64, idle: u64| now.saturating_sub(idle) as f64 * 1024.0 / peers;
                    push(
                        "4",
                        format!("memory per peer at {} peers (bytes)", last.peers),
                        format!(
                            "wgexitd {:.0}, wireguard-go {:.0}",
                            per(last.wgexitd_rss_kib, l.idle_rss_kib.0),
                            per(last.wireguard_go_rss_kib, l.idle_rss_kib.1)
                        ),
                        "—".into(),
                        "—".into(),
                        String::new(),
                    );
                }
            }
        }
        if let Some(t) = &self.tunnel {
            let w = TunnelResults::median(&t.wgexit);
            let q = TunnelResults::median(&t.wg_quick);
            let p = TunnelResults::median(&t.plain);
            push(
                "5",
                "iperf3 container → isp (Mbit/s, median; rounds' range)".into(),
                with_range(w, &t.wgexit),
                format!("wg-quick (wireguard-go) {}", with_range(q, &t.wg_quick)),
                ratio_with(w, q, paired_spread(&t.wgexit, &t.wg_quick)),
                format!("≥ 0.95x: {}", verdict(w / q >= 0.95)),
            );
            let m = TunnelResults::median(&t.moved);
            push(
                "5",
                "diagnosis: by hand with wgexit's topology (TUN moved out of the socket's namespace)"
                    .into(),
                format!("wgexit {}", with_range(w, &t.wgexit)),
                format!("by hand, moved {}", with_range(m, &t.moved)),
                ratio_with(w, m, paired_spread(&t.wgexit, &t.moved)),
                format!(
                    "moved / wg-quick: {}",
                    ratio_with(m, q, paired_spread(&t.moved, &t.wg_quick))
                ),
            );
            let b = TunnelResults::median(&t.big_egress);
            push(
                "5",
                format!(
                    "iperf3 through an egress with {BIG_EGRESS_IPS} IPs and {BIG_POLICY_RULES} policy rules"
                ),
                with_range(b, &t.big_egress),
                format!("one IP, no rules {}", with_range(w, &t.wgexit)),
                ratio_with(b, w, paired_spread(&t.big_egress, &t.wgexit)),
                format!("≥ 0.95x: {}", verdict(b / w >= 0.95)),
            );
            push(
                "5",
                "iperf3, against a plain veth path (ceiling)".into(),
                format!("{w:.0}"),
                format!("plain veth {}", with_range(p, &t.plain)),
                ratio(w, p),
                String::new(),
            );
        }
        if let Some(n) = &self.networks {
            let m = NetworkResults::median(&n.member_to_member);
            let e = NetworkResults::median(&n.egress);
            push(
                "6",
                "iperf3 member → member through the gateway (Mbit/s, median)".into(),
                format!("{m:.0}"),
                format!("egress tunnel container → isp {e:.0}"),
                ratio(m, e),
                String::new(),
            );
            for [metric, wgexit, comparison, ratio, target] in crate::resolvers::rows(&n.resolvers)
            {
                push("6", metric, wgexit, comparison, ratio, target);
            }
        }
        if let Some(v) = &self.vm {
            vm_rows(v, &mut push);
        }
        if let Some(p) = &self.pool {
            for [metric, wgexit, comparison, ratio, target] in crate::pool::rows(p) {
                push("8", metric, wgexit, comparison, ratio, target);
            }
        }
        if let Some(a) = &self.attribution {
            for [metric, wgexit, comparison, ratio, target] in crate::attribution::rows(a) {
                push("9", metric, wgexit, comparison, ratio, target);
            }
        }
        rows
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "wgexit benchmark, {}{} — {}; run took {:.0} s\n",
            self.date,
            if self.smoke {
                " (SMOKE: tiny sizes, not a measurement)"
            } else {
                ""
            },
            self.machine.line(),
            self.seconds
        );
        let _ = writeln!(s, "| row | metric | wgexit | comparison | ratio | target |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for r in self.rows() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                r.row, r.metric, r.wgexit, r.comparison, r.ratio, r.target
            );
        }
        s
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("table.md"), self.table())?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("samples.json"), json)?;
        if let Some(l) = &self.leases {
            std::fs::write(
                dir.join("scale.svg"),
                scale_svg(l, &self.date, &self.machine),
            )?;
        }
        Ok(())
    }
}

/// Two panels over live peers (log scale): lease latency (median, p99) and resident memory.
fn scale_svg(l: &LeaseResults, date: &str, machine: &Machine) -> String {
    let (w, h) = (900.0, 380.0);
    let pts: Vec<(f64, f64, f64, f64, f64)> = l
        .scale
        .iter()
        .map(|p| {
            (
                p.peers.max(1) as f64,
                p.latency.median,
                p.latency.p99,
                p.wgexitd_rss_kib as f64 / 1024.0,
                p.wireguard_go_rss_kib as f64 / 1024.0,
            )
        })
        .collect();
    let xmin = pts
        .iter()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let xmax = pts
        .iter()
        .map(|p| p.0)
        .fold(1.0, f64::max)
        .log10()
        .ceil()
        .max(xmin + 1.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">wgexit exit node: lease latency and memory by live peers — {date}, {}</text>"#,
        w / 2.0,
        machine.line()
    );
    type Series<'a> = (
        &'a str,
        &'a str,
        Box<dyn Fn(&(f64, f64, f64, f64, f64)) -> f64 + 'a>,
    );
    let panels: [(&str, f64, Vec<Series>); 2] = [
        (
            "lease latency, one client, new TLS connection (ms)",
            30.0,
            vec![
                ("median", "#1f77b4", Box::new(|p| p.1)),
                ("p99", "#ff7f0e", Box::new(|p| p.2)),
            ],
        ),
        (
            "resident memory (MiB)",
            470.0,
            vec![
                ("wgexitd", "#2ca02c", Box::new(|p| p.3)),
                ("wireguard-go", "#d62728", Box::new(|p| p.4)),
            ],
        ),
    ];
    for (title, x0, series) in panels {
        let (pw, ph, y0) = (400.0, 260.0, 60.0);
        let ymax = pts
            .iter()
            .flat_map(|p| series.iter().map(move |(_, _, f)| f(p)))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.15;
        let px = |x: f64| x0 + 40.0 + (x.log10() - xmin) / (xmax - xmin) * (pw - 50.0);
        let py = |y: f64| y0 + ph - y / ymax * ph;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{title}</text>"#,
            x0 + pw / 2.0,
            y0 - 12.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{y0}" width="{}" height="{ph}" fill="none" stroke="#888"/>"##,
            x0 + 40.0,
            pw - 50.0
        );
        for i in 0..=4 {
            let y = ymax * i as f64 / 4.0;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                x0 + 36.0,
                py(y) + 4.0,
                if ymax < 10.0 {
                    format!("{y:.1}")
                } else {
                    format!("{y:.0}")
                }
            );
        }
        let mut e = xmin;
        while e <= xmax {
            let x = px(10f64.powf(e));
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
                y0,
                y0 + ph,
                y0 + ph + 16.0,
                10f64.powf(e)
            );
            e += 1.0;
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">live peers (log scale)</text>"#,
            x0 + pw / 2.0,
            y0 + ph + 34.0
        );
        for (k, (name, color, f)) in series.iter().enumerate() {
            let path: Vec<String> = pts
                .iter()
                .map(|p| format!("{:.1},{:.1}", px(p.0), py(f(p))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                path.join(" ")
            );
            for p in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    px(p.0),
                    py(f(p))
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
                x0 + 50.0,
                y0 + 16.0 + 16.0 * k as f64
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
