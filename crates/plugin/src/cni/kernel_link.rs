//! ADD's link for the kernel backend: made directly in the container's namespace, under its
//! final name, by a request from the host's namespace. The kernel keeps a WireGuard
//! device's UDP socket in the namespace that asked for the device, so the socket stays in
//! the host (where the route to the exit node is) with no move: moving a device between
//! namespaces is the costliest step of an ADD.

use crate::cni::error::CniError;
use crate::cni::{link_error, open_backend, wg_error};
use wgexit::keys::Key;
use wgexit::net::{Netlink, Netns};
use wgexit::wg::kernel::creation_refusal;
use wgexit::wg::{Backend, BackendKind, DeviceConfig, WireGuard};

/// Creates `ifname` (down) in `netns` from this (the host's) namespace. Fails, touching
/// nothing, when the container already has a link of that name.
pub async fn create_in_container(
    host: &Netlink,
    netns: &Netns,
    ifname: &str,
) -> Result<(), CniError> {
    host.add_wireguard_in(ifname, netns).await.map_err(|e| {
        let what = "creating the WireGuard link in the container";
        match creation_refusal(ifname, &e) {
            Some(refusal) => wg_error(what, refusal),
            None => link_error(what, e),
        }
    })
}

/// Gives the container's link its private key, through a backend opened in the container;
/// returns that backend, for the rest of ADD.
pub async fn configure_in_container(
    netns: &Netns,
    ifname: &str,
    private_key: &Key,
) -> Result<Backend, CniError> {
    let wg = netns
        .run(|| open_backend(BackendKind::Kernel))
        .map_err(|e| link_error("entering the container's netns", e))??;
    let device = DeviceConfig {
        private_key: *private_key,
        listen_port: None,
        peers: Vec::new(),
    };
    wg.configure(ifname, &device)
        .await
        .map_err(|e| wg_error("configuring the WireGuard link", e))?;
    Ok(wg)
}
