//! Group commit: lease writes from concurrent requests share one durable (fsync'd)
//! transaction.
//!
//! A request queues its write while it holds the registry lock (so writes reach the store in
//! the order the registry made them), lets the lock go, and waits for [`Pending::durable`]
//! before it answers. One thread takes every write queued so far, applies them in a single
//! transaction and wakes their requests; writes queued meanwhile make the next batch. So a
//! lease is still durable before the API answers, but 64 concurrent leases cost a few fsyncs,
//! not 64, and no request holds the registry lock across an fsync.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::store::{LeaseStore, Refusal, StoreError, Write};

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 4096;

/// Why a queued write did not take effect: the store failed, or refused its condition.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

type Job = (Write, oneshot::Sender<Result<(), CommitError>>);

pub struct GroupCommit {
    queue: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    store: String,
}

/// A queued write; [`Pending::durable`] resolves once it is on disk (or failed).
#[must_use = "a write is durable only once `durable` or `wait` returns Ok"]
pub struct Pending {
    rx: Result<oneshot::Receiver<Result<(), CommitError>>, StoreError>,
    store: String,
}

impl Pending {
    pub async fn durable(self) -> Result<(), CommitError> {
        let rx = self.rx?;
        rx.await.unwrap_or_else(|_| Err(stopped(self.store)))
    }

    /// Blocking form of [`Pending::durable`], for code outside the runtime.
    pub fn wait(self) -> Result<(), CommitError> {
        let rx = self.rx?;
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(stopped(self.store)))
    }
}

fn stopped(store: String) -> CommitError {
    CommitError::Store(StoreError::failed(
        store,
        "the lease store's writer stopped",
    ))
}

impl GroupCommit {
    pub fn new(store: Arc<dyn LeaseStore>) -> GroupCommit {
        let (tx, rx) = mpsc::channel::<Job>();
        let name = store.name();
        let worker = std::thread::Builder::new()
            .name("lease-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let (writes, waiters): (Vec<Write>, Vec<_>) = batch.into_iter().unzip();
                    match store.apply(&writes) {
                        Ok(applied) => {
                            for (w, outcome) in waiters.into_iter().zip(applied) {
                                let _ = w.send(outcome.map_err(CommitError::from));
                            }
                        }
                        Err(e) => {
                            for w in waiters {
                                let _ = w.send(Err(e.clone().into()));
                            }
                        }
                    }
                }
            });
        match worker {
            Ok(worker) => GroupCommit {
                queue: Some(tx),
                worker: Some(worker),
                store: name,
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the lease store's writer");
                GroupCommit {
                    queue: None,
                    worker: None,
                    store: name,
                }
            }
        }
    }

    /// Queues `write`; it is applied after every write queued before it.
    pub fn submit(&self, write: Write) -> Pending {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .queue
            .as_ref()
            .map(|q| q.send((write, tx)).is_ok())
            .unwrap_or(false);
        Pending {
            rx: if sent {
                Ok(rx)
            } else {
                Err(StoreError::failed(
                    self.store.clone(),
                    "the lease store's writer is not running",
                ))
            },
            store: self.store.clone(),
        }
    }
}

impl Drop for GroupCommit {
    /// Writes already queued are applied before the store is let go.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
