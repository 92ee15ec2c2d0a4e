//! `--trace`: the plugin's own account of where ADD goes. Each wgexit ADD runs with
//! `WGEXIT_TRACE=1`, which makes the plugin print each step's time on stderr; the steps are
//! gathered here and their medians printed after rows 1-2 (and, in the VM, on its console).

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

/// Gathers the step lines of one ADD's stderr (see `wgexit_plugin::cni::trace`).
pub fn gather(stderr: &str) {
    let Ok(mut steps) = STEPS.lock() else { return };
    for (step, ms) in stderr.lines().filter_map(wgexit_plugin::cni::trace::parse) {
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
    eprintln!("wgexit ADD, step by step (median ms over the ADDs, WGEXIT_TRACE=1):");
    let mut sum = 0.0;
    for (step, times) in steps.iter() {
        let median = crate::stats::Summary::of(times).median;
        sum += median;
        eprintln!("  {median:7.2}  {step} ({})", times.len());
    }
    eprintln!("  {sum:7.2}  in all, the plugin's process start and exit aside");
}
