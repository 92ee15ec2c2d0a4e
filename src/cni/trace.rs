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
                "wgexit: {step}: {:.2} ms (at {:.2} ms)",
                (now - self.last).as_secs_f64() * 1e3,
                (now - self.start).as_secs_f64() * 1e3
            );
            self.last = now;
        }
    }
}
