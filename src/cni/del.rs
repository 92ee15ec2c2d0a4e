//! DEL: remove the link, release the lease, forget the state. Idempotent and best effort:
//! succeeds with no netns, with no prior ADD, and when repeated.

use crate::cni::client::Client;
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::cni::error::CniError;
use crate::cni::member;
use crate::cni::state::{AttachmentState, StateDir};
use crate::cni::{link_error, open_backend, wg_error};
use crate::net::{Netlink, Netns, NetnsError};
use crate::wg::WireGuard;

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
        if let Some(path) = &state.netns {
            match Netns::open(path) {
                Ok(netns) => {
                    let nl = Netlink::in_netns(&netns)
                        .map_err(|e| link_error("netlink in the container", e))?;
                    nl.delete_link(&state.ifname)
                        .await
                        .map_err(|e| link_error("deleting the container's link", e))?;
                }
                // The namespace is gone, and the link with it.
                Err(NetnsError::NotFound { .. }) => {}
                Err(e) => return Err(link_error("cannot use the container's netns", e)),
            }
        }
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
