//! Attachments left behind by containers that went away without a DEL (a runtime that
//! crashed, a namespace removed by hand): their state is found by a netns that no longer
//! exists, and undone like a DEL would (WireGuard device, `wireguard-go` process and
//! socket, lease, state files). ADD runs this for its `dataDir` first, at most once every
//! `staleSweepInterval` (so a host with many containers does not read every state file at
//! every container start). GC uses the same [`detach_each`] with its own selection.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::cni::config::NetConf;
use crate::cni::del::detach;
use crate::cni::error::CniError;
use crate::cni::state::{AttachmentState, StateDir};
use wgexit::client::Client;
use wgexit::net::Netns;

/// Whether `path` no longer names a network namespace: it is gone, or what is left there is
/// a plain file (a bind mount undone without removing its mount point).
pub fn netns_gone(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        // nsfs: the file system of namespace handles.
        Ok(fs) => fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC,
        Err(nix::errno::Errno::ENOENT) => true,
        // Cannot tell (permissions, ...): not ours to judge.
        Err(_) => false,
    }
}

/// Whether ADD should look for stale attachments now: the last look recorded in `dir` is at
/// least `every` old
/// (or there was none). Records this one.
pub fn check_due(dir: &StateDir, every: Duration) -> bool {
    let marker = dir.stale_check_marker();
    let last = std::fs::metadata(&marker).and_then(|m| m.modified()).ok();
    let due = match last {
        Some(t) => SystemTime::now().duration_since(t).unwrap_or_default() >= every,
        None => true,
    };
    if due {
        let _ = wgexit::fsutil::write_private(&marker, b"");
    }
    due
}

/// Whether `state` belongs to a container whose namespace is gone: its path names no
/// namespace, or (when the record has its identity) another namespace than the one ADD
/// attached to, as `/proc/<pid>/ns/net` does once the PID is reused.
pub fn is_stale(state: &AttachmentState) -> bool {
    let Some(path) = state.netns.as_deref() else {
        return false;
    };
    if netns_gone(path) {
        return true;
    }
    let Some(recorded) = state.netns_id else {
        return false;
    };
    // Cannot tell (permissions, a race with its removal, ...): not ours to judge.
    Netns::open(path)
        .and_then(|netns| netns.id())
        .is_ok_and(|now| now != recorded)
}

/// Undoes every attachment in `dir` that `pick` selects, each under its lock and judged
/// again on its state as read under the lock (a DEL may have finished meanwhile). Leases
/// are released with `client` when they were made for `conf`'s egress (the only ones its
/// token can release); the others are kept with `releasePending` and left to the exit
/// node's idle collection. Returns the attachments undone, and the first failure.
pub async fn detach_each(
    dir: &StateDir,
    conf: &NetConf,
    client: Option<&Client>,
    pick: impl Fn(&AttachmentState) -> bool,
) -> (Vec<AttachmentState>, Option<CniError>) {
    let mut done = Vec::new();
    let mut first_error = None;
    let listed = match dir.list() {
        Ok(l) => l,
        Err(e) => return (done, Some(e)),
    };
    for listed in listed.into_iter().filter(|s| pick(s)) {
        let (id, ifname) = (&listed.container_id, &listed.ifname);
        let _lock = match dir.lock(id, ifname) {
            Ok(lock) => lock,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        let state = match dir.load(id, ifname) {
            Ok(Some(state)) if pick(&state) => state,
            Ok(Some(_)) => continue,
            Ok(None) => {
                let _ = dir.remove(id, ifname);
                continue;
            }
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        let client = client.filter(|_| crate::cni::member::credentials_fit(&state, conf));
        match detach(&state, client, dir).await {
            Ok(()) => done.push(state),
            Err(e) => {
                eprintln!("wgexit: cleaning up {id} {ifname}: {e}");
                first_error.get_or_insert(e);
            }
        }
    }
    (done, first_error)
}

/// Undoes every attachment in `dir` whose netns is gone (see [`detach_each`]). Returns the
/// attachments cleaned up.
pub async fn stale_attachments(
    dir: &StateDir,
    conf: &NetConf,
    client: Option<&Client>,
) -> Vec<AttachmentState> {
    detach_each(dir, conf, client, is_stale).await.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_naming_another_namespace_is_stale() {
        let netns = Path::new("/proc/self/ns/net");
        let here = Netns::open(netns).unwrap().id().unwrap();
        let (mut state, _) = crate::cni::state::sample("c", "eth0", Some(netns));
        state.netns_id = Some(here);
        state.host_ifname = "wgx0".into();
        state.in_netns = true;
        assert!(!is_stale(&state));
        state.netns_id = Some(wgexit::net::NetnsId {
            ino: here.ino + 1,
            ..here
        });
        assert!(is_stale(&state));
        // An earlier version's record, without the identity: only a vanished path counts.
        state.netns_id = None;
        assert!(!is_stale(&state));
        state.netns = Some("/nonexistent/ns".into());
        assert!(is_stale(&state));
    }

    #[test]
    fn only_missing_or_unmounted_namespaces_are_gone() {
        assert!(!netns_gone(Path::new("/proc/self/ns/net")));
        let t = tempfile::tempdir().unwrap();
        assert!(netns_gone(&t.path().join("absent")));
        let leftover = t.path().join("cni-1234");
        std::fs::write(&leftover, "").unwrap();
        assert!(netns_gone(&leftover));
    }
}
