//! `--trace` for row 8: one failover, step by step, as milliseconds from the kill: the
//! probe's last answer before it and first after it, and what the new leader logged
//! meanwhile (its log's timestamps are UTC, to the microsecond).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// When the kill began, on both clocks.
pub struct Kill {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Kill {
    pub fn now() -> Kill {
        Kill {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    fn ms_after(&self, t: Instant) -> f64 {
        if t >= self.at {
            ms(t - self.at)
        } else {
            -ms(self.at - t)
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Seconds since midnight (UTC) of a log line's leading RFC 3339 timestamp.
fn log_time(line: &str) -> Option<f64> {
    let clean: String = strip_ansi(line);
    let stamp = clean.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints the trace: `answers` (when each successful probe began), `killed` (when the
/// kill was done: daemon killed, device deleted, links cut) and the new leader's `log`.
pub fn print(kill: &Kill, killed: Instant, answers: &[Instant], log: &str) {
    let midnight = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
    };
    let zero = midnight(kill.wall);
    let before = answers.iter().rfind(|a| **a < kill.at);
    let after = answers.iter().find(|a| **a > killed);
    let mut rows: Vec<(f64, String)> = Vec::new();
    if let Some(b) = before {
        rows.push((
            kill.ms_after(*b),
            "probe: last answer before the kill".into(),
        ));
    }
    rows.push((0.0, "kill -9 of the leader's wgexitd".into()));
    rows.push((
        kill.ms_after(killed),
        "its WireGuard device deleted, its links cut".into(),
    ));
    let end = after.map_or(5_000.0, |a| kill.ms_after(*a) + 200.0);
    for line in log.lines() {
        let Some(t) = log_time(line) else { continue };
        let at = (t - zero) * 1000.0;
        if !(0.0..=end).contains(&at) {
            continue;
        }
        let text = strip_ansi(line);
        let text = text
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(silent) = silent_ms(&text) {
            rows.push((at - silent, "new leader: first saw the last pulse".into()));
        }
        rows.push((at, format!("new leader: {text}")));
    }
    if let Some(a) = after {
        rows.push((kill.ms_after(*a), "probe: first answer after".into()));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    eprintln!("  failover trace (ms from the kill):");
    for (at, what) in rows {
        eprintln!("  {at:>8.1}  {what}");
    }
}

/// `silent_ms=N` of the "took the group over" line.
fn silent_ms(text: &str) -> Option<f64> {
    let rest = text.split("silent_ms=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
