//! Opt-in timing of a command's steps: with `WGEXIT_TRACE=1` in its environment the plugin
//! prints, on stderr, how long each step took — to see where a slow ADD spends its time.

use std::time::Instant;

pub struct Steps {
    enabled: bool,
    start: Instant,
    last: Instant,
}

impl Steps {
    pub fn from_env() -> Steps {
        let now = Instant::now();
        Steps {
            enabled: std::env::var_os("WGEXIT_TRACE").is_some_and(|v| v == "1"),
            start: now,
            last: now,
        }
    }

    /// Records that `step` has just finished.
    pub fn done(&mut self, step: &str) {
        if self.enabled {
            let now = Instant::now();
            eprintln!(
                "{}",
                line(
                    step,
                    (now - self.last).as_secs_f64() * 1e3,
                    (now - self.start).as_secs_f64() * 1e3
                )
            );
            self.last = now;
        }
    }
}

/// The line printed for a step that took `ms` and ended `at_ms` after the command began.
fn line(step: &str, ms: f64, at_ms: f64) -> String {
    format!("wgexit: {step}: {ms:.2} ms (at {at_ms:.2} ms)")
}

/// Reads a step's line back: the step and how long it took (ms); `None` for any other line.
pub fn parse(line: &str) -> Option<(&str, f64)> {
    let (step, time) = line.strip_prefix("wgexit: ")?.rsplit_once(": ")?;
    let ms = time.strip_suffix(" ms)")?.split_once(" ms (at ")?.0;
    Some((step, ms.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_step_reads_back_and_other_lines_do_not() {
        let printed = line("move into the container; key: leases", 18.256, 29.5);
        assert_eq!(
            parse(&printed),
            Some(("move into the container; key: leases", 18.26))
        );
        assert_eq!(parse("wgexit: undoing the failed ADD: gone"), None);
        assert_eq!(parse("something else"), None);
    }
}
