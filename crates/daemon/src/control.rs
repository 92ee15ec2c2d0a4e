//! The local control socket, `state_dir/control.sock` (0600, root only): how `wgexitd`'s
//! own commands reach a running daemon, whose lease store no other process may open. The
//! API never carries these (they show every tenant's leases), nor the metrics listener
//! (which may face a scraping network).
//!
//! One JSON request line, one JSON reply line. `check-config` reads every stored lease
//! through it to report those a new config would leave without an egress; `leases prune`
//! asks the daemon to delete the stored leases that do not fit its config (when no daemon
//! answers, both open the store themselves); `status` asks for the daemon's report; `who`
//! and `flows` ask the flow records ([`crate::attribution`]; `flows` is answered with one
//! line per flow and an end line).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::attribution::query::{Attribution, WhoAnswer, WhoRequest};
use crate::attribution::FlowRecord;
use crate::config::Config;
use crate::leases::redb::RedbStore;
use crate::leases::registry::place;
use crate::leases::service::LeaseService;
use crate::leases::store::{LeaseStore, StoreError, StoredLease, Write};
use crate::status::snapshot::{report, StatusReport};

const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Every stored lease, fitting the config or not.
    Leases,
    /// Deletes the stored leases that do not fit the daemon's config.
    Prune,
    /// What each egress is doing; each lease's row too when `peers`.
    Status { peers: bool },
    /// Which lease held an egress address and port (see [`crate::attribution`]).
    Who(WhoRequest),
    /// The flows that started at or after `since` (Unix microseconds), one per line.
    Flows { since: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Leases(Vec<StoredLease>),
    Status(Box<StatusReport>),
    Who(Box<WhoAnswer>),
    /// One of `flows`' lines ...
    Flow(Box<FlowRecord>),
    /// ... and the last one.
    End,
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {detail}")]
    Socket { path: PathBuf, detail: String },
    #[error("cannot reach wgexitd at {path}: {source}; is `wgexitd serve` running with this config (same state_dir)?")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("wgexitd answered: {0}")]
    Daemon(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

fn socket_err(path: &Path) -> impl Fn(std::io::Error) -> ControlError + '_ {
    move |e| ControlError::Socket {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Binds the socket, owner-only, replacing a stale one (the store's lock already keeps a
/// second daemon out).
pub fn bind(state_dir: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    let _ = wgexit::fsutil::remove_if_exists(&path);
    let listener = UnixListener::bind(&path).map_err(socket_err(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(socket_err(&path))?;
    Ok(listener)
}

/// Answers requests on `listener` until the task is dropped; `who` and `flows` from
/// `attribution` (refused when the recorder is off).
pub async fn serve(
    listener: UnixListener,
    service: Arc<LeaseService>,
    attribution: Option<Arc<Attribution>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let service = service.clone();
                let attribution = attribution.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &service, attribution.as_deref()).await {
                        tracing::warn!(error = %e, "control socket request failed");
                    }
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "control socket: cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(
    stream: UnixStream,
    service: &LeaseService,
    attribution: Option<&Attribution>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let request = serde_json::from_str::<Request>(&line);
    if let (Ok(Request::Flows { since }), Some(a)) = (&request, attribution) {
        return export(&mut write, a, *since).await;
    }
    let reply = match request {
        Ok(Request::Who(req)) => match attribution {
            Some(a) => match a.who(req).await {
                Ok(answer) => Reply::Who(Box::new(answer)),
                Err(e) => Reply::Error(e.to_string()),
            },
            None => not_recorded(),
        },
        // With a recorder, answered above.
        Ok(Request::Flows { .. }) => not_recorded(),
        Ok(Request::Leases) => Reply::Leases(service.stored_leases().await),
        Ok(Request::Prune) => match service.prune().await {
            Ok(pruned) => Reply::Leases(pruned),
            Err(e) => Reply::Error(e.to_string()),
        },
        Ok(Request::Status { peers }) => Reply::Status(Box::new(report(service, peers).await)),
        Err(e) => Reply::Error(format!("not a control request: {e}")),
    };
    write_reply(&mut write, &reply).await
}

fn not_recorded() -> Reply {
    Reply::Error(
        "flows are not recorded by this daemon (attribution_days = 0 in its config)".into(),
    )
}

async fn write_reply(
    write: &mut (impl AsyncWriteExt + Unpin),
    reply: &Reply,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// `flows`: one line per flow, then [`Reply::End`].
async fn export(
    write: &mut (impl AsyncWriteExt + Unpin),
    attribution: &Attribution,
    since: u64,
) -> std::io::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    attribution.export(since, tx);
    while let Some(flow) = rx.recv().await {
        write_reply(write, &Reply::Flow(Box::new(flow))).await?;
    }
    write_reply(write, &Reply::End).await
}

/// Connects to the daemon of `state_dir` and sends `request`: `Err(NotRunning)` when
/// none runs (no socket, or nobody on it).
async fn send(
    state_dir: &Path,
    request: Request,
) -> Result<BufReader<tokio::net::unix::OwnedReadHalf>, ControlError> {
    let path = socket_path(state_dir);
    let stream = UnixStream::connect(&path).await.map_err(|source| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ) {
            ControlError::NotRunning {
                path: path.clone(),
                source,
            }
        } else {
            socket_err(&path)(source)
        }
    })?;
    let (read, mut write) = stream.into_split();
    let mut out = serde_json::to_vec(&request)
        .map_err(std::io::Error::other)
        .map_err(socket_err(&path))?;
    out.push(b'\n');
    write.write_all(&out).await.map_err(socket_err(&path))?;
    Ok(BufReader::new(read))
}

/// The next reply line (an error the daemon answered is an error here too).
async fn next_reply(
    state_dir: &Path,
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Reply, ControlError> {
    let path = socket_path(state_dir);
    let mut line = String::new();
    read.read_line(&mut line).await.map_err(socket_err(&path))?;
    match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Error(e)) => Err(ControlError::Daemon(e)),
        Ok(reply) => Ok(reply),
        Err(e) => Err(ControlError::Socket {
            path,
            detail: format!("unreadable reply: {e}"),
        }),
    }
}

/// Asks the daemon of `state_dir`: `Err(NotRunning)` when none runs, else its reply.
async fn ask(state_dir: &Path, request: Request) -> Result<Reply, ControlError> {
    let mut read = send(state_dir, request).await?;
    next_reply(state_dir, &mut read).await
}

/// The running daemon's answer to `who`.
pub async fn who(state_dir: &Path, request: WhoRequest) -> Result<WhoAnswer, ControlError> {
    match ask(state_dir, Request::Who(request)).await? {
        Reply::Who(answer) => Ok(*answer),
        _ => Err(unexpected(state_dir)),
    }
}

/// The running daemon's flows since `since` (Unix microseconds), each to `each`; how
/// many there were.
pub async fn flows(
    state_dir: &Path,
    since: u64,
    mut each: impl FnMut(FlowRecord) -> std::io::Result<()>,
) -> Result<u64, ControlError> {
    let mut read = send(state_dir, Request::Flows { since }).await?;
    let mut n = 0;
    loop {
        match next_reply(state_dir, &mut read).await? {
            Reply::Flow(f) => {
                each(*f).map_err(socket_err(&socket_path(state_dir)))?;
                n += 1;
            }
            Reply::End => return Ok(n),
            _ => return Err(unexpected(state_dir)),
        }
    }
}

/// The stored leases the daemon answered with; `None` when no daemon runs.
async fn ask_leases(
    state_dir: &Path,
    request: Request,
) -> Result<Option<Vec<StoredLease>>, ControlError> {
    match ask(state_dir, request).await {
        Ok(Reply::Leases(l)) => Ok(Some(l)),
        Ok(_) => Err(unexpected(state_dir)),
        Err(ControlError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn unexpected(state_dir: &Path) -> ControlError {
    ControlError::Socket {
        path: socket_path(state_dir),
        detail: "a reply of the wrong kind".into(),
    }
}

/// The running daemon's status report (`NotRunning` when no daemon answers).
pub async fn status(state_dir: &Path, peers: bool) -> Result<StatusReport, ControlError> {
    match ask(state_dir, Request::Status { peers }).await? {
        Reply::Status(r) => Ok(*r),
        _ => Err(unexpected(state_dir)),
    }
}

fn open_store(config: &Config) -> Result<Option<RedbStore>, StoreError> {
    let path = config.state_dir.join("leases.redb");
    if !path.exists() {
        return Ok(None);
    }
    RedbStore::open(&path).map(Some)
}

/// The stored leases that `config` leaves without a place (see [`place`]), as the running
/// daemon's store holds them, or the store itself when no daemon runs.
pub async fn misfits(config: &Config) -> Result<Vec<StoredLease>, ControlError> {
    let stored = match ask_leases(&config.state_dir, Request::Leases).await? {
        Some(leases) => leases,
        None => match open_store(config)? {
            Some(store) => store.load()?,
            None => Vec::new(),
        },
    };
    Ok(place(&config.egress, &config.network, stored).1)
}

/// Deletes the stored leases that do not fit `config`: through the running daemon (which
/// prunes against its own config), else in the store directly. Returns what was deleted.
pub async fn prune(config: &Config) -> Result<Vec<StoredLease>, ControlError> {
    if let Some(pruned) = ask_leases(&config.state_dir, Request::Prune).await? {
        return Ok(pruned);
    }
    let Some(store) = open_store(config)? else {
        return Ok(Vec::new());
    };
    let misfits = place(&config.egress, &config.network, store.load()?).1;
    let deletes: Vec<Write> = misfits.iter().map(StoredLease::delete).collect();
    store.apply(&deletes)?;
    Ok(misfits)
}
