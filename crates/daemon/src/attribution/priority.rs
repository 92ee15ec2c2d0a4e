//! The recorder runs below everything that forwards packets or answers the API: its
//! threads and `conntrack -E` are `SCHED_BATCH` at nice [`NICE`]. A waking reader never
//! preempts a busy lease or tunnel thread (`SCHED_BATCH` skips wakeup preemption), and
//! when the cores are saturated it gets a small share of them; its queues (conntrack's
//! socket buffer, the pipe, the writer's queue) absorb a burst until the CPU is free, and
//! what overflows them is counted.

use std::future::Future;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The recorder's nice value: about a tenth of a nice-0 thread's share under contention.
pub const NICE: i32 = 10;

/// Lowers the calling thread (on Linux, nice and the policy are per thread). A failure
/// leaves it at normal priority and is logged.
pub fn lower_this_thread(name: &str) {
    if let Err(e) = lower(0) {
        tracing::warn!(thread = name, error = %e, "cannot lower the flow recorder's priority");
    }
}

/// Lowers the calling process or thread (`who` 0); async-signal-safe, so it may run
/// between fork and exec.
pub fn lower(who: libc::id_t) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on the calling thread, with a valid parameter struct.
    unsafe {
        if libc::sched_setscheduler(who as libc::pid_t, libc::SCHED_BATCH, &param) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::setpriority(libc::PRIO_PROCESS, who, NICE) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `task` on a thread of its own, lowered, in a runtime of its own (threads it
/// starts, such as its blocking pool's, inherit the lower priority). The handle is a task
/// of the calling runtime: aborting it (or shutting that runtime down) stops `task` and
/// waits for the thread to end, so what `task` held (an open store) is let go before the
/// daemon exits.
pub fn spawn_lowered<F>(name: &str, task: F) -> std::io::Result<JoinHandle<()>>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let (done, finished) = oneshot::channel::<()>();
    let thread = name.to_string();
    let joined = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lower_this_thread(&thread);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(async {
                    tokio::select! {
                        _ = task => {}
                        _ = stopped => {}
                    }
                }),
                Err(e) => tracing::error!(thread, error = %e, "cannot start the flow recorder"),
            }
            let _ = done.send(());
        })?;
    let lowered = Lowered {
        stop: Some(stop),
        thread: Some(joined),
    };
    Ok(tokio::spawn(async move {
        let _lowered = lowered;
        let _ = finished.await;
    }))
}

/// A lowered thread; dropped, it is told to stop and waited for.
struct Lowered {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Lowered {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_thread_is_batch_at_the_recorders_nice_and_others_are_not() {
        let lowered = std::thread::spawn(|| {
            lower_this_thread("test");
            // SAFETY: queries of the calling thread.
            unsafe {
                (
                    libc::sched_getscheduler(0),
                    libc::getpriority(libc::PRIO_PROCESS, 0),
                )
            }
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (libc::SCHED_BATCH, NICE));
        // SAFETY: a query of the calling thread.
        let here = unsafe { libc::sched_getscheduler(0) };
        assert_ne!(here, libc::SCHED_BATCH);
    }

    #[tokio::test]
    async fn a_lowered_task_runs_below_and_stops_when_its_handle_is_aborted() {
        let (tx, rx) = oneshot::channel();
        let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
        let handle = spawn_lowered("test-lowered", async move {
            let _dropped_when_stopped = dropped_tx;
            // SAFETY: a query of the calling thread.
            let _ = tx.send(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
            std::future::pending::<()>().await
        })
        .unwrap();
        assert_eq!(rx.await.unwrap(), NICE);
        handle.abort();
        assert!(dropped_rx.await.is_err(), "the task was dropped");
    }
}
