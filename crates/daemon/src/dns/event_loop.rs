//! The resolvers' event loop: every network's UDP loop ([`super::udp`]) runs on one thread
//! of its own, in a single-threaded tokio runtime, as dnsmasq runs one loop in one thread.
//!
//! On the daemon's shared runtime (two workers) a forwarded question cost a wake-up of the
//! other worker whenever an upstream's answer landed: the answer wakes every asker waiting
//! for it ([`super::flights`]), all of them futures of the one UDP loop, which so wakes
//! itself while it runs; the runtime takes that as a yield, queues the loop again and wakes
//! the idle worker to come and take it (a futex wake, two context switches, and the loop
//! moving between threads). On a runtime of one thread there is no one to wake. The rest
//! of the daemon (the API, DNS over TCP, reconciliation) stays on the shared runtime.

use std::sync::Mutex;

use tokio::runtime::{Builder, Handle};

/// The loop's handle, once started.
static EVENT_LOOP: Mutex<Option<Handle>> = Mutex::new(None);

/// The resolvers' runtime: started on first use, it runs as long as the daemon.
pub fn handle() -> std::io::Result<Handle> {
    let mut started = EVENT_LOOP
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = started.as_ref() {
        return Ok(handle.clone());
    }
    let runtime = Builder::new_current_thread().enable_all().build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("wgexitd-dns".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    *started = Some(handle.clone());
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_serves_every_resolver() {
        let (a, b) = (handle().unwrap(), handle().unwrap());
        let thread = |h: &Handle| {
            h.block_on(async {
                tokio::task::spawn(async { std::thread::current().name().map(str::to_owned) })
                    .await
                    .unwrap()
            })
        };
        assert_eq!(thread(&a), Some("wgexitd-dns".into()));
        assert_eq!(thread(&b), Some("wgexitd-dns".into()));
    }
}
