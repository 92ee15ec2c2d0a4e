//! Warm spare links for the userspace backend: `wireguard-go` processes already serving a
//! TUN device in the host namespace, without a key, that the next ADD takes instead of
//! starting one (starting `wireguard-go` is ~7 ms of ADD's path).
//!
//! A spare is named `wgs` + 12 hex digits (a prefix no attachment's link has: those are
//! `wgx…`) and recorded as `<dataDir>/spares/<name>.json` once it serves: its name, the pid
//! of its `wireguard-go` and the network namespace it was made in. ADD claims one by
//! renaming its record to `<name>.claimed` (of concurrent ADDs exactly one rename
//! succeeds; the others try the next record or start their own `wireguard-go`), checks that
//! it still serves, records its name as the attachment's `host_ifname` and then drops the
//! claim file: from there on the spare is the attachment's link, found through the
//! attachment's state by DEL, CHECK, GC and the stale check like any other.
//!
//! After a successful ADD, a detached `wgexit spares refill` (its own process group, no
//! standard streams of the runtime's) brings the number of spares back to `spareLinks`;
//! refills take `<dataDir>/spares/.refill.lock`, so one runs per state directory at a time.
//! `wgexit spares clear` removes them all.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::cni::config::NetConf;
use crate::cni::log::LogConfig;
use crate::cni::state::StateDir;
use wgexit::fsutil;
use wgexit::net::{Netns, NetnsId};
use wgexit::wg::userspace::{pid_of, UserspaceBackend};
use wgexit::wg::{WgError, WireGuard};

/// What every spare's name starts with.
pub const PREFIX: &str = "wgs";
/// The subdirectory of `dataDir` that holds the records.
const SUBDIR: &str = "spares";
const RECORD: &str = "json";
const CLAIMED: &str = "claimed";
/// Most spares a config may ask for.
pub const MAX_SPARES: u32 = 16;

/// A spare as recorded once it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spare {
    pub name: String,
    /// The `wireguard-go` serving it.
    pub pid: u32,
    /// The namespace it was made in: only an ADD running there can move it.
    pub netns_id: NetnsId,
}

#[derive(Debug, thiserror::Error)]
pub enum SpareError {
    #[error("spare links in {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spare link {name}: {source}")]
    WireGuard {
        name: String,
        #[source]
        source: WgError,
    },
    #[error("spare links: cannot identify this network namespace: {0}")]
    Netns(String),
}

/// The spares of one state directory.
pub struct Spares {
    dir: PathBuf,
}

/// The refill lock, held until dropped.
pub struct RefillLock {
    _file: Flock<File>,
}

impl Spares {
    /// The spares of state directory `data_dir` (nothing is created).
    pub fn of(data_dir: &Path) -> Spares {
        Spares {
            dir: data_dir.join(SUBDIR),
        }
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> SpareError + '_ {
        |source| SpareError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    fn path(&self, name: &str, kind: &str) -> PathBuf {
        self.dir.join(format!("{name}.{kind}"))
    }

    /// The records of ready spares, by name.
    pub fn ready(&self) -> Vec<Spare> {
        self.files(RECORD)
            .into_iter()
            .filter_map(|path| read_spare(&path))
            .collect()
    }

    /// Names of the files of `kind` (`json`: ready, `claimed`: being taken), sorted.
    fn files(&self, kind: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == kind))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(PREFIX))
            })
            .collect();
        paths.sort();
        paths
    }

    /// Takes a ready spare made in namespace `here`, if there is one: its record is renamed
    /// to a claim, which only one caller can do. A claimed spare that no longer serves is
    /// removed (with `backend`) and the next one tried. The caller records the name in the
    /// attachment's state, then calls [`Spares::claimed`].
    pub async fn claim(&self, here: NetnsId, backend: &UserspaceBackend) -> Option<Spare> {
        for path in self.files(RECORD) {
            let Some(spare) = read_spare(&path).filter(|s| s.netns_id == here) else {
                continue;
            };
            if std::fs::rename(&path, self.path(&spare.name, CLAIMED)).is_err() {
                // Another ADD took it first.
                continue;
            }
            if serves(&spare) {
                return Some(spare);
            }
            eprintln!(
                "wgexit: spare link {} no longer served by wireguard-go (pid {}); removed",
                spare.name, spare.pid
            );
            let _ = backend.delete(&spare.name).await;
            self.claimed(&spare.name);
        }
        None
    }

    /// Drops the claim on `name`: the attachment's state now records it.
    pub fn claimed(&self, name: &str) {
        let _ = fsutil::remove_if_exists(&self.path(name, CLAIMED));
    }

    /// Records `spare` as ready (atomically: a claimer sees the whole record or none).
    pub fn record(&self, spare: &Spare) -> Result<(), SpareError> {
        let bytes = serde_json::to_vec(spare).map_err(|e| self.io()(e.into()))?;
        fsutil::replace_private(&self.path(&spare.name, RECORD), &bytes).map_err(self.io())
    }

    /// Waits for and takes the refill lock (also taken by [`clear`], so it never races a
    /// refill). `None` when the state directory is gone.
    pub fn lock(&self) -> Result<Option<RefillLock>, SpareError> {
        if !self.dir.parent().is_some_and(Path::is_dir) {
            return Ok(None);
        }
        fsutil::private_dir(&self.dir).map_err(self.io())?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(".refill.lock"))
            .map_err(self.io())?;
        let locked =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| self.io()(e.into()))?;
        Ok(Some(RefillLock { _file: locked }))
    }

    /// Removes the records of spares whose `wireguard-go` is gone (and their sockets and
    /// logs, with `backend` when there is one). Returns their names.
    pub async fn remove_dead(&self, backend: Option<&UserspaceBackend>) -> Vec<String> {
        let mut removed = Vec::new();
        for spare in self.ready().into_iter().filter(|s| !serves(s)) {
            if let Some(backend) = backend {
                let _ = backend.delete(&spare.name).await;
            }
            let _ = fsutil::remove_if_exists(&self.path(&spare.name, RECORD));
            removed.push(spare.name);
        }
        removed
    }
}

/// Whether `spare` is still served: its UAPI socket answers, from its recorded
/// `wireguard-go`.
pub fn serves(spare: &Spare) -> bool {
    pid_of(&spare.name) == Some(spare.pid)
}

fn read_spare(path: &Path) -> Option<Spare> {
    let bytes = std::fs::read(path).ok()?;
    let spare: Spare = serde_json::from_slice(&bytes).ok()?;
    let named = path.file_stem().and_then(|s| s.to_str()) == Some(spare.name.as_str());
    (named && spare.name.starts_with(PREFIX)).then_some(spare)
}

/// A fresh spare name: the prefix and 12 random hex digits (15 bytes, the kernel's limit).
pub fn new_name() -> std::io::Result<String> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(format!("{PREFIX}{}", hex::encode(bytes)))
}

/// The identity of the calling thread's network namespace.
pub fn current_netns() -> Result<NetnsId, SpareError> {
    Netns::current()
        .and_then(|n| n.id())
        .map_err(|e| SpareError::Netns(e.to_string()))
}

/// Brings the spares of `data_dir` made in this namespace up to `count`: removes dead ones,
/// then starts `wireguard-go` for new names until there are `count`, each recorded once it
/// serves. Returns the names started.
pub async fn refill(data_dir: &Path, count: u32) -> Result<Vec<String>, SpareError> {
    let spares = Spares::of(data_dir);
    let Some(_lock) = spares.lock()? else {
        return Ok(Vec::new());
    };
    let here = current_netns()?;
    let backend = UserspaceBackend::open().map_err(|source| SpareError::WireGuard {
        name: "wireguard-go".into(),
        source,
    })?;
    spares.remove_dead(Some(&backend)).await;
    let mut started = Vec::new();
    while spares.ready().iter().filter(|s| s.netns_id == here).count() < count as usize {
        let name = new_name().map_err(spares.io())?;
        let pid = backend
            .create_device(&name)
            .await
            .map_err(|source| SpareError::WireGuard {
                name: name.clone(),
                source,
            })?;
        let spare = Spare {
            name: name.clone(),
            pid,
            netns_id: here,
        };
        if let Err(e) = spares.record(&spare) {
            let _ = backend.delete(&name).await;
            return Err(e);
        }
        started.push(name);
    }
    Ok(started)
}

/// A refill ADD asked for, started once its answer is written.
#[derive(Debug, Clone)]
struct Refill {
    data_dir: PathBuf,
    count: u32,
    log: Option<LogConfig>,
}

static SCHEDULED: OnceLock<Refill> = OnceLock::new();

/// Asks for a refill of `conf`'s spares once the command's answer is written (see
/// [`start_scheduled_refill`]): a successful ADD of the userspace backend calls it.
pub fn refill_after_answer(conf: &NetConf) {
    if conf.spare_links > 0 {
        let _ = SCHEDULED.set(Refill {
            data_dir: conf.data_dir.clone(),
            count: conf.spare_links,
            log: conf.log.clone(),
        });
    }
}

/// Starts the refill an ADD asked for, if any, as a detached `wgexit spares refill`: this
/// binary, in a process group of its own, with none of the runtime's standard streams (a
/// runtime that reads the plugin's output until it is closed is not kept waiting), its
/// errors to the plugin's log. Call it after the answer is written.
pub fn start_scheduled_refill() {
    let Some(refill) = SCHEDULED.get() else {
        return;
    };
    let started = std::env::current_exe().and_then(|exe| {
        let mut command = Command::new(exe);
        command
            .args(["spares", "refill", "--count", &refill.count.to_string()])
            .arg("--data-dir")
            .arg(&refill.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some(log) = &refill.log {
            command
                .arg("--log-file")
                .arg(&log.file)
                .args(["--log-max-bytes", &log.max_bytes.to_string()]);
        }
        command.spawn()
    });
    if let Err(e) = started {
        log_error(
            refill.log.as_ref(),
            &format!("cannot start wgexit spares refill: {e}"),
        );
    }
}

/// Appends a line about a spare-link error to the plugin's log, when it has one.
pub fn log_error(log: Option<&LogConfig>, msg: &str) {
    if let Some(log) = log {
        let at = crate::cni::log::timestamp(std::time::SystemTime::now());
        let msg = crate::cni::log::value(msg);
        let _ = crate::cni::log::append(log, &format!("{at} SPARES result=error msg={msg}\n"));
    }
}

/// Removes every spare of `data_dir`, ready or claimed by an ADD that did not finish, and
/// its `wireguard-go`, socket and log; a claimed one that an attachment's state records is
/// that attachment's link and is left to its DEL. Returns the names removed.
pub async fn clear(data_dir: &Path, attached: &[String]) -> Result<Vec<String>, SpareError> {
    let spares = Spares::of(data_dir);
    let Some(_lock) = spares.lock()? else {
        return Ok(Vec::new());
    };
    let backend = UserspaceBackend::open().ok();
    let mut removed = Vec::new();
    let paths = spares
        .files(RECORD)
        .into_iter()
        .chain(spares.files(CLAIMED));
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if !attached.contains(&name) {
            if let Some(backend) = &backend {
                backend
                    .delete(&name)
                    .await
                    .map_err(|source| SpareError::WireGuard {
                        name: name.clone(),
                        source,
                    })?;
            }
            removed.push(name);
        }
        fsutil::remove_if_exists(&path).map_err(spares.io())?;
    }
    Ok(removed)
}

/// The ready spares of `data_dir`, each with whether it still serves.
pub fn list(data_dir: &Path) -> Vec<(Spare, bool)> {
    let spares = Spares::of(data_dir).ready();
    spares
        .into_iter()
        .map(|s| {
            let serving = serves(&s);
            (s, serving)
        })
        .collect()
}

/// [`clear`] for `wgexit spares clear`: the attachments' links are those their states record.
pub async fn clear_all(data_dir: &Path) -> Result<Vec<String>, SpareError> {
    let attached: Vec<String> = if data_dir.is_dir() {
        StateDir::open(data_dir)
            .and_then(|d| d.list())
            .map_err(|e| SpareError::Io {
                dir: data_dir.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?
            .into_iter()
            .map(|s| s.host_ifname)
            .collect()
    } else {
        Vec::new()
    };
    clear(data_dir, &attached).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spare(name: &str, netns_id: NetnsId) -> Spare {
        Spare {
            name: name.into(),
            // No wireguard-go serves these: pid 1 is init.
            pid: 1,
            netns_id,
        }
    }

    #[test]
    fn names_fit_an_interface_and_differ() {
        let (a, b) = (new_name().unwrap(), new_name().unwrap());
        assert!(a.starts_with(PREFIX) && a.len() == 15, "{a}");
        assert_ne!(a, b);
        wgexit::wg::validate_name(&a).unwrap();
    }

    #[test]
    fn records_round_trip_and_a_foreign_file_is_ignored() {
        let t = tempfile::tempdir().unwrap();
        let spares = Spares::of(t.path());
        let here = current_netns().unwrap();
        std::fs::create_dir_all(t.path().join(SUBDIR)).unwrap();
        spares.record(&spare("wgs000000000001", here)).unwrap();
        spares.record(&spare("wgs000000000002", here)).unwrap();
        // A record whose content names another spare, and a file without the prefix.
        let mut other = spare("wgs000000000003", here);
        std::fs::write(
            spares.path("wgs000000000004", RECORD),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        other.name = "eth0".into();
        std::fs::write(
            spares.path("eth0", RECORD),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        let names: Vec<String> = spares.ready().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["wgs000000000001", "wgs000000000002"]);
    }

    /// Of many claimers of one record exactly one renames it; the record is then gone.
    #[test]
    fn one_claimer_wins() {
        let t = tempfile::tempdir().unwrap();
        let spares = std::sync::Arc::new(Spares::of(t.path()));
        std::fs::create_dir_all(t.path().join(SUBDIR)).unwrap();
        let here = current_netns().unwrap();
        spares.record(&spare("wgs0000000000aa", here)).unwrap();
        let from = spares.path("wgs0000000000aa", RECORD);
        let to = spares.path("wgs0000000000aa", CLAIMED);
        let winners: usize = (0..8)
            .map(|_| {
                let (from, to) = (from.clone(), to.clone());
                std::thread::spawn(move || std::fs::rename(from, to).is_ok())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(winners, 1);
        assert!(spares.ready().is_empty());
        spares.claimed("wgs0000000000aa");
        assert!(!to.exists());
    }

    #[tokio::test]
    async fn a_dead_spare_or_one_of_another_namespace_is_not_claimed() {
        let t = tempfile::tempdir().unwrap();
        let spares = Spares::of(t.path());
        std::fs::create_dir_all(t.path().join(SUBDIR)).unwrap();
        let here = current_netns().unwrap();
        let elsewhere = NetnsId {
            ino: here.ino + 1,
            ..here
        };
        spares.record(&spare("wgs0000000000b1", elsewhere)).unwrap();
        spares.record(&spare("wgs0000000000b2", here)).unwrap();
        let Ok(backend) = UserspaceBackend::open() else {
            return; // no wireguard-go here: the claim logic needs its backend to delete
        };
        assert_eq!(spares.claim(here, &backend).await, None);
        // The dead one of this namespace went, claim and all; the other namespace's stayed.
        let names: Vec<String> = spares.ready().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["wgs0000000000b1"]);
        assert!(spares.files(CLAIMED).is_empty());
        // And a sweep removes a dead record of any namespace.
        assert_eq!(spares.remove_dead(None).await, ["wgs0000000000b1"]);
        assert!(spares.ready().is_empty());
    }

    #[tokio::test]
    async fn clear_keeps_a_claim_an_attachment_records() {
        let t = tempfile::tempdir().unwrap();
        let spares = Spares::of(t.path());
        std::fs::create_dir_all(t.path().join(SUBDIR)).unwrap();
        let here = current_netns().unwrap();
        spares.record(&spare("wgs0000000000c1", here)).unwrap();
        std::fs::write(spares.path("wgs0000000000c2", CLAIMED), b"{}").unwrap();
        let attached = ["wgs0000000000c2".to_string()];
        let removed = clear(t.path(), &attached).await.unwrap();
        assert_eq!(removed, ["wgs0000000000c1"]);
        assert!(spares.files(RECORD).is_empty() && spares.files(CLAIMED).is_empty());
        // A state directory that is gone: nothing to do, nothing created.
        let gone = t.path().join("gone");
        assert!(clear(&gone, &[]).await.unwrap().is_empty());
        assert!(!gone.exists());
    }
}
