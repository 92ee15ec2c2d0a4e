//! `perf record` of wgexitd while a measurement runs (`--perf FILE`).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::world::World;

/// A running `perf record -g` of the world's wgexitd; it stops (and writes its file) when
/// dropped.
pub struct Recording(Child);

/// Starts recording wgexitd to `out`; `None` when there is no daemon or no `perf`.
pub fn record(world: &World, out: &Path) -> Option<Recording> {
    let pid = world.daemon_pid()?.to_string();
    Command::new("perf")
        .args(["record", "-F", "499", "-g", "-p", &pid, "-o"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
        .map(Recording)
}

impl Drop for Recording {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.0.wait();
    }
}
