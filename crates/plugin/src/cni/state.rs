//! Per-attachment state under `dataDir`: one JSON record and one private key per
//! (container, interface), both 0600 in a 0700 directory, written atomically.
//!
//! Files are named `<container>.<ifname>.{json,key,lock}` with both names escaped (every
//! byte but letters, digits, `_` and `-` as `%XX`), so the one unescaped `.` between them
//! tells any two attachments apart: container `a.b` with interface `c` is `a%2Eb.c`,
//! container `a` with interface `b.c` is `a.b%2Ec`. Ordinary names (hex container IDs,
//! `eth0`) need no escaping, so their files keep the names earlier versions gave them; a
//! record under an earlier version's ambiguous name is found, checked to be the one asked
//! for, and moved to its new name (see [`StateDir::load`]).
//!
//! The record is written before anything is created and updated as ADD goes, so a DEL (or
//! ADD's own undo) always knows what there is to remove, even after a crash mid-ADD.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::cni::error::{CniError, Code};
use wgexit::fsutil;
use wgexit::keys::Key;
use wgexit::net::NetnsId;
use wgexit::wg::BackendKind;

/// What wgexit made for one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentState {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    /// The identity of the namespace ADD attached to (records of earlier versions have
    /// none): DEL touches links at `netns` only while that path still names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<NetnsId>,
    pub network: String,
    pub egress: String,
    /// The WireGuard link's name while it is in the host namespace; for the userspace
    /// backend also the name of its UAPI socket, for its whole life.
    pub host_ifname: String,
    pub backend: BackendKind,
    pub public_key: Key,
    /// Set once the lease is granted: the server that granted it.
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub address: Option<IpNet>,
    /// The egress lease's overlay IPv6, on an egress with `ip6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<IpNet>,
    #[serde(default)]
    pub exit_public_key: Option<Key>,
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// The UDP port the device listens on, as it was when ADD finished (CHECK compares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Whether the link has been moved into the container (so DEL must delete it there).
    #[serde(default)]
    pub in_netns: bool,
    /// The lease could not be released at DEL (server unreachable); GC retries.
    #[serde(default)]
    pub release_pending: bool,
    /// The private network joined, when the config names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<crate::cni::member::MemberState>,
}

/// An exclusive lock on one attachment (`<container>.<ifname>.lock` in `dataDir`, held with
/// `flock`), so that commands for the same attachment run one at a time while commands for
/// different containers run side by side. Released when dropped.
pub struct AttachmentLock {
    _file: Flock<File>,
}

/// The state directory.
pub struct StateDir {
    dir: PathBuf,
}

fn state_err(what: &str, path: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::new(Code::State, format!("{what} {}", path.display())).with_details(e.to_string())
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<StateDir, CniError> {
        fsutil::private_dir(dir).map_err(|e| state_err("cannot create dataDir", dir, e))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn base(&self, container_id: &str, ifname: &str) -> String {
        file_base(container_id, ifname)
    }

    /// When ADD last looked for stale attachments (see [`crate::cni::stale::check_due`]).
    pub fn stale_check_marker(&self) -> PathBuf {
        self.dir.join(".stale-check")
    }

    fn record_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir
            .join(format!("{}.json", self.base(container_id, ifname)))
    }

    fn key_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir
            .join(format!("{}.key", self.base(container_id, ifname)))
    }

    fn lock_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir
            .join(format!("{}.lock", self.base(container_id, ifname)))
    }

    /// Waits for and takes the attachment's lock. [`StateDir::remove`] deletes the lock file
    /// while holding it; a waiter that then gets the lock on the deleted file notices (the
    /// path no longer names its file) and locks afresh, so two holders never overlap.
    pub fn lock(&self, container_id: &str, ifname: &str) -> Result<AttachmentLock, CniError> {
        let path = self.lock_path(container_id, ifname);
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| state_err("cannot open lock", &path, e))?;
            let locked = Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| state_err("cannot lock", &path, e))?;
            let held = locked
                .metadata()
                .map_err(|e| state_err("cannot stat lock", &path, e))?;
            match std::fs::metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(AttachmentLock { _file: locked })
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(state_err("cannot stat lock", &path, e)),
            }
        }
    }

    /// The state of an attachment, read without creating or locking anything: for a log
    /// line, before the command that takes the lock runs. `None` when there is none (or it
    /// cannot be read).
    pub fn peek(dir: &Path, container_id: &str, ifname: &str) -> Option<AttachmentState> {
        let at = StateDir {
            dir: dir.to_path_buf(),
        };
        at.load(container_id, ifname).ok().flatten()
    }

    /// The record of (`container_id`, `ifname`), if there is one. A record whose contents
    /// name another attachment is refused. A record an earlier version wrote under its
    /// ambiguous `<container>.<ifname>` name is used when it is this attachment's, and moved
    /// (with its key) to the unambiguous name; one that is the other attachment's is left
    /// alone. Call it holding the attachment's lock.
    pub fn load(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<AttachmentState>, CniError> {
        let path = self.record_path(container_id, ifname);
        if let Some(state) = read_record(&path)? {
            if !state.is_of(container_id, ifname) {
                return Err(state_err(
                    "state file",
                    &path,
                    format!(
                        "it holds the attachment of container {} on {}, not of {container_id} on {ifname}",
                        state.container_id, state.ifname
                    ),
                ));
            }
            return Ok(Some(state));
        }
        self.adopt_legacy(container_id, ifname)
    }

    /// Finds this attachment's record under an earlier version's name and moves it, with its
    /// key, to the current name.
    fn adopt_legacy(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<AttachmentState>, CniError> {
        let legacy = format!("{container_id}.{ifname}");
        if legacy == self.base(container_id, ifname) {
            return Ok(None);
        }
        let legacy_record = self.dir.join(format!("{legacy}.json"));
        let Some(state) = read_record(&legacy_record)? else {
            return Ok(None);
        };
        if !state.is_of(container_id, ifname) {
            return Ok(None);
        }
        let legacy_key = self.dir.join(format!("{legacy}.key"));
        let moves = [
            (legacy_key, self.key_path(container_id, ifname)),
            (legacy_record, self.record_path(container_id, ifname)),
        ];
        for (from, to) in moves {
            match std::fs::rename(&from, &to) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(state_err("cannot rename", &from, e))
                }
                _ => {}
            }
        }
        let _ = fsutil::remove_if_exists(&self.dir.join(format!("{legacy}.lock")));
        Ok(Some(state))
    }

    pub fn save(&self, state: &AttachmentState) -> Result<(), CniError> {
        self.write_record(state, fsutil::write_private)
    }

    /// [`StateDir::save`] for a detail added to a record already on disk (a crash keeps the
    /// record as it was, whole): one fsync less on ADD's path.
    pub fn save_detail(&self, state: &AttachmentState) -> Result<(), CniError> {
        self.write_record(state, fsutil::replace_private)
    }

    fn write_record(
        &self,
        state: &AttachmentState,
        write: fn(&Path, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), CniError> {
        let path = self.record_path(&state.container_id, &state.ifname);
        let bytes =
            serde_json::to_vec_pretty(state).map_err(|e| state_err("cannot encode", &path, e))?;
        write(&path, &bytes).map_err(|e| state_err("cannot write", &path, e))
    }

    pub fn save_key(&self, container_id: &str, ifname: &str, key: &Key) -> Result<(), CniError> {
        let path = self.key_path(container_id, ifname);
        fsutil::write_private(&path, format!("{key}\n").as_bytes())
            .map_err(|e| state_err("cannot write", &path, e))
    }

    pub fn load_key(&self, container_id: &str, ifname: &str) -> Result<Key, CniError> {
        let path = self.key_path(container_id, ifname);
        let text =
            std::fs::read_to_string(&path).map_err(|e| state_err("cannot read", &path, e))?;
        Key::from_base64(&text).map_err(|e| state_err("bad key in", &path, e))
    }

    /// Removes the record, the key and the lock file. Call it holding the attachment's lock.
    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<(), CniError> {
        for path in [
            self.key_path(container_id, ifname),
            self.record_path(container_id, ifname),
            self.lock_path(container_id, ifname),
        ] {
            fsutil::remove_if_exists(&path).map_err(|e| state_err("cannot remove", &path, e))?;
        }
        Ok(())
    }

    /// Every attachment recorded here (each once, under whichever name it is recorded).
    pub fn list(&self) -> Result<Vec<AttachmentState>, CniError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| state_err("cannot list", &self.dir, e))?;
        let mut out = std::collections::BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Ok(Some(state)) = read_record(&path) {
                    let id = (state.container_id.clone(), state.ifname.clone());
                    out.insert(id, state);
                }
            }
        }
        Ok(out.into_values().collect())
    }
}

impl AttachmentState {
    /// Whether this is the record of (`container_id`, `ifname`).
    pub fn is_of(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }
}

/// The record at `path`, `None` when there is no file.
fn read_record(path: &Path) -> Result<Option<AttachmentState>, CniError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| state_err("unreadable state file", path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(state_err("cannot read", path, e)),
    }
}

/// A name as one part of a file name: letters, digits, `_` and `-` as they are, every other
/// byte as `%XX`. The result never holds a `.`, and different names give different results.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The attachment's file names without their extension: `<container>.<ifname>`, escaped.
fn file_base(container_id: &str, ifname: &str) -> String {
    format!("{}.{}", escape(container_id), escape(ifname))
}

/// The name of the link while it is in the host namespace: unique per attachment, stable
/// (so a repeated DEL finds it), at most 15 bytes.
pub fn host_ifname(container_id: &str, ifname: &str, netns: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(container_id.as_bytes());
    h.update([0]);
    h.update(ifname.as_bytes());
    h.update([0]);
    h.update(netns.as_os_str().as_encoded_bytes());
    format!("wgx{}", &hex::encode(h.finalize())[..12])
}

/// An attachment as ADD records it before leasing, for tests: container `container_id` on
/// `ifname` in `netns`, with a fresh key.
#[cfg(test)]
pub(crate) fn sample(
    container_id: &str,
    ifname: &str,
    netns: Option<&Path>,
) -> (AttachmentState, Key) {
    let key = Key::generate_private().unwrap();
    let state = AttachmentState {
        container_id: container_id.into(),
        ifname: ifname.into(),
        netns: netns.map(Path::to_path_buf),
        netns_id: None,
        network: "egress".into(),
        egress: "acme".into(),
        host_ifname: host_ifname(container_id, ifname, netns.unwrap_or(Path::new(""))),
        backend: BackendKind::Userspace,
        public_key: key.public(),
        server: None,
        address: None,
        address6: None,
        exit_public_key: None,
        endpoint: None,
        listen_port: None,
        member: None,
        in_netns: false,
        release_pending: false,
    };
    (state, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn lock_excludes_and_survives_removal() {
        let t = tempfile::tempdir().unwrap();
        let dir = Arc::new(StateDir::open(t.path()).unwrap());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (dir, inside) = (dir.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _lock = dir.lock("c", "eth0").unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        // As DEL does: remove the lock file while holding it.
                        dir.remove("c", "eth0").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // A different attachment's lock is independent.
        let _a = dir.lock("a", "eth0").unwrap();
        let _b = dir.lock("b", "eth0").unwrap();
    }

    fn record(container_id: &str, ifname: &str) -> (AttachmentState, Key) {
        let (mut state, key) = sample(container_id, ifname, Some(Path::new("/var/run/netns/x")));
        state.netns_id = Some(NetnsId {
            dev: 4,
            ino: 4026532000,
        });
        (state, key)
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn file_names_tell_every_attachment_apart() {
        assert_eq!(file_base("a.b", "c"), "a%2Eb.c");
        assert_eq!(file_base("a", "b.c"), "a.b%2Ec");
        assert_eq!(file_base("a%2Eb", "c"), "a%252Eb.c");
        assert_eq!(file_base("x", "ü@"), "x.%C3%BC%40");
        // What runtimes pass (hex IDs, eth0) keeps the name earlier versions gave it.
        let id = "0123456789abcdef-x_y";
        assert_eq!(file_base(id, "eth0"), format!("{id}.eth0"));
        let names = [("a.b", "c"), ("a", "b.c"), ("a.b.c", "d"), ("a", "b.c.d")];
        let bases: std::collections::BTreeSet<_> =
            names.iter().map(|(c, i)| file_base(c, i)).collect();
        assert_eq!(bases.len(), names.len());
        assert!(bases.iter().all(|b| b.matches('.').count() == 1));
    }

    #[test]
    fn colliding_names_live_side_by_side() {
        let t = tempfile::tempdir().unwrap();
        let dir = StateDir::open(t.path()).unwrap();
        let (one, one_key) = record("a.b", "c");
        let (two, two_key) = record("a", "b.c");
        for (s, k) in [(&one, &one_key), (&two, &two_key)] {
            let _lock = dir.lock(&s.container_id, &s.ifname).unwrap();
            dir.save_key(&s.container_id, &s.ifname, k).unwrap();
            dir.save(s).unwrap();
        }
        assert_eq!(dir.load("a.b", "c").unwrap(), Some(one.clone()));
        assert_eq!(dir.load("a", "b.c").unwrap(), Some(two.clone()));
        assert_eq!(dir.load_key("a", "b.c").unwrap(), two_key);
        assert_eq!(dir.list().unwrap().len(), 2);
        dir.remove("a.b", "c").unwrap();
        assert_eq!(dir.load("a.b", "c").unwrap(), None);
        assert_eq!(dir.load("a", "b.c").unwrap(), Some(two));
        assert_eq!(dir.load_key("a", "b.c").unwrap(), two_key);
    }

    #[test]
    fn an_earlier_versions_record_is_found_checked_and_renamed() {
        let t = tempfile::tempdir().unwrap();
        let dir = StateDir::open(t.path()).unwrap();
        // What an earlier version wrote for container "a.b" on "c": "a.b.c.*", a name that
        // container "a" on "b.c" would have had too.
        let (old, key) = record("a.b", "c");
        let json = serde_json::to_vec(&old).unwrap();
        std::fs::write(t.path().join("a.b.c.json"), json).unwrap();
        std::fs::write(t.path().join("a.b.c.key"), format!("{key}\n")).unwrap();
        std::fs::write(t.path().join("a.b.c.lock"), "").unwrap();
        assert_eq!(dir.list().unwrap(), vec![old.clone()]);
        // Not the other attachment's: left where it is.
        assert_eq!(dir.load("a", "b.c").unwrap(), None);
        assert_eq!(files(t.path()), ["a.b.c.json", "a.b.c.key", "a.b.c.lock"]);
        // Its own: found, and moved to the unambiguous name with its key.
        assert_eq!(dir.load("a.b", "c").unwrap(), Some(old.clone()));
        assert_eq!(files(t.path()), ["a%2Eb.c.json", "a%2Eb.c.key"]);
        assert_eq!(dir.load_key("a.b", "c").unwrap(), key);
        assert_eq!(dir.load("a.b", "c").unwrap(), Some(old));
        dir.remove("a.b", "c").unwrap();
        assert!(files(t.path()).is_empty());
    }

    #[test]
    fn a_record_of_another_attachment_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = StateDir::open(t.path()).unwrap();
        let (other, _) = record("b", "eth0");
        let json = serde_json::to_vec(&other).unwrap();
        std::fs::write(t.path().join("a.eth0.json"), json).unwrap();
        let e = dir.load("a", "eth0").unwrap_err();
        assert_eq!(e.code, Code::State);
        assert!(e.to_string().contains("container b on eth0"), "{e}");
    }

    #[test]
    fn round_trip_private_and_removable() {
        let t = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&t.path().join("d")).unwrap();
        let (s, key) = sample("c1", "eth0", Some(Path::new("/var/run/netns/x")));
        dir.save(&s).unwrap();
        dir.save_key("c1", "eth0", &key).unwrap();
        assert_eq!(dir.load("c1", "eth0").unwrap(), Some(s.clone()));
        assert_eq!(dir.load_key("c1", "eth0").unwrap(), key);
        assert_eq!(dir.list().unwrap(), vec![s.clone()]);
        for f in std::fs::read_dir(t.path().join("d")).unwrap() {
            let mode = f.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let lock = dir.lock("c1", "eth0").unwrap();
        dir.remove("c1", "eth0").unwrap();
        drop(lock);
        dir.remove("c1", "eth0").unwrap();
        assert_eq!(std::fs::read_dir(t.path().join("d")).unwrap().count(), 0);
        assert_eq!(dir.load("c1", "eth0").unwrap(), None);
        assert!(s.host_ifname.len() <= 15);
        assert_ne!(
            s.host_ifname,
            host_ifname("c2", "eth0", Path::new("/var/run/netns/x"))
        );
    }
}
