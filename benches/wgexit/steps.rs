//! `--trace`: the plugin's own account of where ADD goes. Each wgexit ADD runs with
//! `WGEXIT_TRACE=1`, which makes the plugin print each step's time on stderr; the steps are
//! gathered here and their medians printed after rows 1-2 (and, in the VM, on its console).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ON: AtomicBool = AtomicBool::new(false);
/// Per kind of ADD and step (in the order first seen): its times, ms.
static STEPS: Mutex<Vec<(String, String, Vec<f64>)>> = Mutex::new(Vec::new());

pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Gathers the step lines of one ADD's stderr (see `wgexit_plugin::cni::trace`), as ADDs of
/// kind `label` ("": the row's own; others are printed apart).
pub fn gather(label: &str, stderr: &str) {
    let Ok(mut steps) = STEPS.lock() else { return };
    for (step, ms) in stderr.lines().filter_map(wgexit_plugin::cni::trace::parse) {
        let found = steps.iter_mut().find(|(l, s, _)| l == label && s == step);
        match found {
            Some((_, _, times)) => times.push(ms),
            None => steps.push((label.to_string(), step.to_string(), vec![ms])),
        }
    }
}

/// Prints, per kind of ADD, each step's median and their sum, each weighted by the share of
/// the ADDs that had the step (a step only some ADDs take, such as starting `wireguard-go`
/// when no spare was ready, counts for its share).
pub fn print() {
    let Ok(steps) = STEPS.lock() else { return };
    let mut labels: Vec<&str> = Vec::new();
    for (label, _, _) in steps.iter() {
        if !labels.contains(&label.as_str()) {
            labels.push(label);
        }
    }
    for label in labels {
        let of_label: Vec<_> = steps.iter().filter(|(l, _, _)| l == label).collect();
        let adds = of_label.iter().map(|(_, _, t)| t.len()).max().unwrap_or(1);
        let kind = if label.is_empty() {
            String::new()
        } else {
            format!(" {label}")
        };
        eprintln!("wgexit ADD{kind}, step by step (median ms over the ADDs, WGEXIT_TRACE=1):");
        let mut sum = 0.0;
        for (_, step, times) in of_label {
            let median = crate::stats::Summary::of(times).median;
            sum += median * times.len() as f64 / adds as f64;
            eprintln!("  {median:7.2}  {step} ({})", times.len());
        }
        eprintln!("  {sum:7.2}  in all, the plugin's process start and exit aside");
    }
}
