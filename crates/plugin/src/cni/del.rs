//! DEL: remove the link, release the lease, forget the state. Idempotent and best effort:
//! succeeds with no netns, with no prior ADD, and when repeated.

use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::cni::error::CniError;
use crate::cni::member;
use crate::cni::state::{AttachmentState, StateDir};
use crate::cni::{link_error, open_backend, wg_error};
use wgexit::client::Client;
use wgexit::net::{Netlink, Netns, NetnsError};
use wgexit::wg::WireGuard;

pub async fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let dir = StateDir::open(&conf.data_dir)?;
    let _lock = dir.lock(container_id, ifname)?;
    let Some(state) = dir.load(container_id, ifname)? else {
        // Never added (or already deleted): only the lock file just made is left.
        return dir.remove(container_id, ifname);
    };
    let client = match conf.token() {
        Ok(token) => Client::new(&conf.servers, &conf.ca_file, token).ok(),
        Err(_) => None,
    };
    detach(&state, client.as_ref(), &dir).await
}

/// Removes everything `state` records, in reverse order of ADD. Used by DEL and by ADD to
/// undo a failed attempt. The lease is released last; if the server cannot be reached the
/// state is kept with `release_pending` (GC retries), and DEL still succeeds.
pub async fn detach(
    state: &AttachmentState,
    client: Option<&Client>,
    dir: &StateDir,
) -> Result<(), CniError> {
    if state.in_netns {
        delete_container_link(state).await?;
    }
    // The link may still be in the host namespace (ADD failed before the move), and a
    // userspace device has a process and a socket to clean up either way.
    let backend = open_backend(state.backend)?;
    backend
        .delete(&state.host_ifname)
        .await
        .map_err(|e| wg_error("removing the WireGuard device", e))?;

    let egress_released = match (&state.server, client) {
        (None, _) => Ok(()),
        (Some(server), Some(c)) => c
            .release(server, &state.egress, &state.public_key)
            .map_err(|e| e.to_string()),
        (Some(_), None) => Err("tokenFile or caFile unusable".to_string()),
    };
    let member_released = member::release(state, client);
    if egress_released.is_err() || member_released.is_err() {
        let why: Vec<String> = [egress_released.as_ref(), member_released.as_ref()]
            .into_iter()
            .filter_map(|r| r.err().cloned())
            .collect();
        eprintln!(
            "wgexit: lease of {} not released ({}); kept for GC, and the exit node collects it if idle",
            state.public_key,
            why.join("; ")
        );
        // Keep only what is still to release.
        let mut pending = state.clone();
        pending.in_netns = false;
        pending.release_pending = true;
        if egress_released.is_ok() {
            pending.server = None;
        }
        if member_released.is_ok() {
            pending.member = None;
        }
        return dir.save(&pending);
    }
    dir.remove(&state.container_id, &state.ifname)
}

/// Deletes the attachment's link in the container, if the namespace ADD attached to is
/// still at the recorded path.
async fn delete_container_link(state: &AttachmentState) -> Result<(), CniError> {
    let Some(path) = &state.netns else {
        return Ok(());
    };
    match Netns::open(path) {
        Ok(netns) if attached_here(state, &netns)? => {
            let nl =
                Netlink::in_netns(&netns).map_err(|e| link_error("netlink in the container", e))?;
            nl.delete_link(&state.ifname)
                .await
                .map_err(|e| link_error("deleting the container's link", e))?;
            Ok(())
        }
        // The namespace ADD attached to is gone (the path now names another one: a PID
        // reused, a mount replaced), and the link with it; what is there now is not ours.
        Ok(_) => {
            eprintln!(
                "wgexit: {} now names another network namespace than the one container {} was attached to; no link touched there",
                path.display(),
                state.container_id
            );
            Ok(())
        }
        // The namespace is gone, and the link with it.
        Err(NetnsError::NotFound { .. }) => Ok(()),
        Err(e) => Err(link_error("cannot use the container's netns", e)),
    }
}

/// Whether `netns` is the namespace ADD attached `state` to. A record without the
/// namespace's identity (written by an earlier version) trusts its path, as that version did.
pub fn attached_here(state: &AttachmentState, netns: &Netns) -> Result<bool, CniError> {
    match state.netns_id {
        Some(recorded) => Ok(netns
            .id()
            .map_err(|e| link_error("cannot use the container's netns", e))?
            == recorded),
        None => Ok(true),
    }
}
