//! `wgexitd status` as a person reads it: a few lines per egress and per private network,
//! whatever its peer count;
//! one line per lease only with `--peers`.

use std::fmt::Write as _;

use super::snapshot::{EgressStatus, NetworkStatus, PeerRow, PeerSummary, StatusReport};

/// Bytes in binary units, one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A duration in seconds as its largest units (`3 s`, `4m 10s`, `2h 5m`, `3d 4h`).
pub fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86400, secs % 86400 / 3600),
    }
}

fn egress(out: &mut String, e: &EgressStatus) {
    let ips: Vec<String> = e.ips.iter().map(ToString::to_string).collect();
    let pct = if e.capacity == 0 {
        0.0
    } else {
        e.leases as f64 * 100.0 / e.capacity as f64
    };
    let p = &e.peers;
    let _ = writeln!(out, "egress {}", e.name);
    let _ = writeln!(out, "  ips         {}", ips.join(", "));
    let _ = writeln!(
        out,
        "  endpoint    {} (WireGuard device {})",
        e.endpoint, e.wg_interface
    );
    let _ = writeln!(
        out,
        "  pool        {}: {} of {} leased ({pct:.1}%)",
        e.pool, e.leases, e.capacity
    );
    if let Some(err) = &e.device_error {
        let _ = writeln!(out, "  device      NOT READABLE: {err}");
    }
    peers(out, p, "containers");
    if let Some(drops) = e.firewall_drops {
        let _ = writeln!(out, "  refused     {drops} packets (by its policy)");
    }
}

/// The device's peers, their handshakes and bytes, for an egress or a network (`whose`:
/// whom the bytes come from).
fn peers(out: &mut String, p: &PeerSummary, whose: &str) {
    let _ = write!(
        out,
        "  peers       {}: {} live, {} idle, {} never handshaken",
        p.total, p.live, p.idle, p.never
    );
    if p.leases_without_peer > 0 {
        let _ = write!(out, "; {} leases without a peer", p.leases_without_peer);
    }
    out.push('\n');
    let buckets: Vec<String> = p
        .handshake_age
        .iter()
        .map(|c| format!("{} {}", c.bucket, c.peers))
        .collect();
    let _ = write!(out, "  handshakes  {}", buckets.join(" | "));
    if let (Some(newest), Some(oldest)) = (
        p.newest_handshake_age_seconds,
        p.oldest_handshake_age_seconds,
    ) {
        let _ = write!(
            out,
            " (newest {} ago, oldest {} ago)",
            age(newest),
            age(oldest)
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "  bytes       {} from {whose}, {} to {whose} (peers on the device now)",
        bytes(p.received_bytes),
        bytes(p.transmitted_bytes)
    );
}

fn network(out: &mut String, n: &NetworkStatus) {
    let _ = writeln!(out, "network {}", n.name);
    let _ = writeln!(out, "  prefix      {}", n.prefix);
    let _ = writeln!(
        out,
        "  endpoint    {} (WireGuard device {})",
        n.endpoint, n.wg_interface
    );
    let _ = writeln!(
        out,
        "  members     {} containers, {} peers",
        n.members.containers, n.members.peers
    );
    if let Some(err) = &n.device_error {
        let _ = writeln!(out, "  device      NOT READABLE: {err}");
    }
    peers(out, &n.peers, "members");
    let d = &n.dns;
    let _ = writeln!(
        out,
        "  dns         {} answered, {} refused, {} forwarded",
        d.answered, d.refused, d.forwarded
    );
    if let Some(drops) = n.firewall_drops {
        let _ = writeln!(out, "  dropped     {drops} packets (by the firewall)");
    }
}

fn peer_rows(out: &mut String, rows: &[PeerRow]) {
    let _ = writeln!(
        out,
        "  {:<16} {:<8} {:<12} {:>10} {:>12} {:>12}  CONTAINER",
        "ADDRESS", "IFNAME", "HOST", "HANDSHAKE", "FROM", "TO"
    );
    for r in rows {
        let handshake = match (r.on_device, r.last_handshake_age_seconds) {
            (false, _) => "no peer".to_string(),
            (true, None) => "never".to_string(),
            (true, Some(s)) => age(s),
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<8} {:<12} {:>10} {:>12} {:>12}  {}",
            r.address.to_string(),
            r.ifname,
            r.host,
            handshake,
            bytes(r.received_bytes),
            bytes(r.transmitted_bytes),
            r.container_id
        );
    }
}

/// The whole report as text.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    for (i, e) in report.egress.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        egress(&mut out, e);
        if let Some(rows) = &e.peer_list {
            peer_rows(&mut out, rows);
        }
    }
    for n in &report.network {
        if !out.is_empty() {
            out.push('\n');
        }
        network(&mut out, n);
        if let Some(rows) = &n.peer_list {
            peer_rows(&mut out, rows);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::config::tests::egress as egress_config;
    use crate::status::snapshot::tests::peer;
    use crate::status::snapshot::{summarize, EgressView};
    use wgexit::wg::DeviceStatus;

    #[test]
    fn sixty_thousand_peers_read_as_a_few_lines() {
        let now = SystemTime::now();
        let config = egress_config("acme", "100.64.0.0/16");
        let peers = (0..60_000u32)
            .map(|n| peer(n, (n % 7 != 0).then_some(u64::from(n % 4000)), now))
            .collect();
        let view = EgressView {
            config: &config,
            leases: Vec::new(),
            capacity: 65533,
            device: Ok(Some(DeviceStatus {
                public_key: None,
                listen_port: 51820,
                fwmark: 0,
                peers,
            })),
            firewall_drops: None,
        };
        let report = StatusReport {
            version: "t".into(),
            egress: vec![summarize(&view, now, false)],
            network: Vec::new(),
        };
        let text = render(&report);
        assert!(text.lines().count() <= 8, "{text}");
        assert!(text.contains("peers       60000: "), "{text}");
        assert!(text.contains("never 8572"), "{text}");
        assert!(text.contains("5.7 MiB from containers"), "{text}");
    }

    #[test]
    fn units_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(age(59), "59 s");
        assert_eq!(age(250), "4m 10s");
        assert_eq!(age(7500), "2h 5m");
        assert_eq!(age(97200), "1d 3h");
    }
}
