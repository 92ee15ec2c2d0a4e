//! Attachments left behind by containers that went away without a DEL (a runtime that
//! crashed, a namespace removed by hand): their state is found by a netns that no longer
//! exists, and undone like a DEL would (WireGuard device, `wireguard-go` process and
//! socket, lease, state files). ADD runs this for its `dataDir` first, at most once every
//! `staleSweepInterval` (so a host with many containers does not read every state file at
//! every container start); GC can reuse it.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::cni::client::Client;
use crate::cni::config::NetConf;
use crate::cni::del::detach;
use crate::cni::state::{AttachmentState, StateDir};

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

/// Whether ADD should sweep now: the last sweep recorded in `dir` is at least `every` old
/// (or there was none). Records this one.
pub fn sweep_due(dir: &StateDir, every: Duration) -> bool {
    let marker = dir.sweep_marker();
    let last = std::fs::metadata(&marker).and_then(|m| m.modified()).ok();
    let due = match last {
        Some(t) => SystemTime::now().duration_since(t).unwrap_or_default() >= every,
        None => true,
    };
    if due {
        let _ = crate::fsutil::write_private(&marker, b"");
    }
    due
}

/// Whether `state` belongs to a container whose namespace is gone.
pub fn is_stale(state: &AttachmentState) -> bool {
    state.netns.as_deref().is_some_and(netns_gone)
}

/// Undoes every attachment in `dir` whose netns is gone. Leases are released with `client`
/// when they were made for `conf`'s egress (the only ones its token can release); the others
/// are kept with `releasePending` and left to the exit node's idle collection. Returns the
/// attachments cleaned up.
pub async fn stale_attachments(
    dir: &StateDir,
    conf: &NetConf,
    client: Option<&Client>,
) -> Vec<AttachmentState> {
    let Ok(states) = dir.list() else {
        return Vec::new();
    };
    let mut cleaned = Vec::new();
    for listed in states.into_iter().filter(is_stale) {
        let (id, ifname) = (&listed.container_id, &listed.ifname);
        let Ok(_lock) = dir.lock(id, ifname) else {
            continue;
        };
        // Read again under the lock: a DEL may have finished meanwhile.
        let Ok(Some(state)) = dir.load(id, ifname) else {
            let _ = dir.remove(id, ifname);
            continue;
        };
        let client = client.filter(|_| state.egress == conf.egress);
        match detach(&state, client, dir).await {
            Ok(()) => cleaned.push(state),
            Err(e) => eprintln!(
                "wgexit: cleaning up {} {} (netns {} is gone): {e}",
                state.container_id,
                state.ifname,
                state
                    .netns
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;

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
