//! `--trace`: the plugin's own account of where ADD goes. Each wgexit ADD runs with
//! `WGEXIT_TRACE=1`, which makes the plugin print each step's time on stderr; the steps are
//! gathered here and their medians printed after rows 1-2 (and, in the VM, on its console).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ON: AtomicBool = AtomicBool::new(false);
/// Per step (in the order first seen): its times, ms.
static STEPS: Mutex<Vec<(String, Vec<f64>)>> = Mutex::new(Vec::new());

pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Gathers the step lines (`wgexit: STEP: T ms (at A ms)`) of one ADD's stderr.
pub fn gather(stderr: &str) {
    let Ok(mut steps) = STEPS.lock() else { return };
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix("wgexit: ") else {
            continue;
        };
        let Some((step, time)) = rest.rsplit_once(": ") else {
            continue;
        };
        let Some(ms) = time
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<f64>().ok())
        else {
            continue;
        };
        match steps.iter_mut().find(|(s, _)| s == step) {
            Some((_, times)) => times.push(ms),
            None => steps.push((step.to_string(), vec![ms])),
        }
    }
}

/// Prints each step's median and the sum of the medians.
pub fn print() {
    let Ok(steps) = STEPS.lock() else { return };
    if steps.is_empty() {
        return;
    }
    let medians: BTreeMap<usize, (String, f64, usize)> = steps
        .iter()
        .enumerate()
        .map(|(i, (s, t))| (i, (s.clone(), crate::stats::Summary::of(t).median, t.len())))
        .collect();
    eprintln!("wgexit ADD, step by step (median ms over the ADDs, WGEXIT_TRACE=1):");
    for (step, median, n) in medians.values() {
        eprintln!("  {median:7.2}  {step} ({n})");
    }
    let sum: f64 = medians.values().map(|(_, m, _)| m).sum();
    eprintln!("  {sum:7.2}  in all, the plugin's process start and exit aside");
}
