//! Row 7: CNI ADD with the kernel backend against `ptp` + `host-local`, measured inside the
//! VM of the VM test (`netns-tests/vm/run`: a Debian kernel with the WireGuard module under
//! QEMU, since these machines have no module). The guest runs this same bench binary with
//! `--only 1` and backend "kernel", and prints its results on the console, where they are
//! read back. Both plugins run in the same VM, interleaved, so the ratio holds even though
//! emulation makes every absolute time several times slower than on the host.

use std::path::PathBuf;
use std::process::Command;

use serde::Serialize;

use crate::stats::Summary;

/// What the guest prints before its results (one line of JSON).
pub const MARKER: &str = "wgexit-bench-json: ";

#[derive(Debug, Serialize)]
pub struct VmResults {
    /// The guest's kernel, e.g. "6.1.0-56-amd64".
    pub kernel: String,
    pub wgexit_add_ms: Vec<f64>,
    pub ptp_add_ms: Vec<f64>,
    pub wgexit_add: Summary,
    pub ptp_add: Summary,
    /// First requests after ADD that worked at once, of all.
    pub first_try_ok: (usize, usize),
    /// Why the row was not measured, when it was not.
    pub error: Option<String>,
}

impl VmResults {
    fn failed(why: String) -> VmResults {
        VmResults {
            kernel: String::new(),
            wgexit_add_ms: vec![],
            ptp_add_ms: vec![],
            wgexit_add: Summary::default(),
            ptp_add: Summary::default(),
            first_try_ok: (0, 0),
            error: Some(why),
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Boots the VM and runs rows 1-2 there with `containers` containers each. The guest sees
/// this machine's files but has its own `/tmp`: the bench binary must not live there (under
/// the checkout's `target/`, where cargo puts it, is fine).
pub fn run(containers: usize) -> VmResults {
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return VmResults::failed(format!("cannot find the bench binary: {e}")),
    };
    let out = Command::new(repo().join("netns-tests/vm/run"))
        .arg("--bench")
        .arg(&me)
        .args([
            "--only",
            "1",
            "--print-json",
            "--out",
            "/tmp/wgexit-vm-bench",
        ])
        .args(["--containers", &containers.to_string()])
        .args(crate::steps::enabled().then_some("--trace"))
        .output();
    let log = repo().join("target/vm/bench-console.log");
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return VmResults::failed(format!(
                "the VM run failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return VmResults::failed(format!("cannot run netns-tests/vm/run: {e}")),
    }
    let console = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    parse(&console).unwrap_or_else(|why| VmResults::failed(format!("{why} ({})", log.display())))
}

/// The guest's results from its console log.
fn parse(console: &str) -> Result<VmResults, String> {
    let kernel = console
        .lines()
        .find_map(|l| l.split("wgexit-vm: kernel ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("unknown")
        .to_string();
    let json = console
        .lines()
        .find_map(|l| l.split(MARKER).nth(1))
        .ok_or("the guest printed no results")?;
    let v: serde_json::Value =
        serde_json::from_str(json.trim()).map_err(|e| format!("the guest's results: {e}"))?;
    let cni = &v["cni"];
    let samples = |key: &str| -> Vec<f64> {
        cni[key]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    let (wgexit_add_ms, ptp_add_ms) = (samples("wgexit_add_ms"), samples("ptp_add_ms"));
    if wgexit_add_ms.is_empty() || ptp_add_ms.is_empty() {
        return Err("the guest's results hold no ADD samples".into());
    }
    let total = cni["first_request_ms"].as_array().map_or(0, |a| a.len());
    let ok = cni["first_try_ok"].as_u64().unwrap_or(0) as usize;
    Ok(VmResults {
        kernel,
        wgexit_add: Summary::of(&wgexit_add_ms),
        ptp_add: Summary::of(&ptp_add_ms),
        wgexit_add_ms,
        ptp_add_ms,
        first_try_ok: (ok, total),
        error: None,
    })
}
