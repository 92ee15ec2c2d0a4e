//! ADD: key pair on the host → lease over HTTPS, while the WireGuard link is made in the host
//! namespace (or a warm spare link, already serving there, is taken: see [`super::spares`])
//! → move into the container as `CNI_IFNAME` (kernel: made there directly and
//! keyed, see [`super::kernel_link`]), while the link gets its key and the granted peers and
//! the first handshake starts → address, MTU, up → routes → wait for the first handshake →
//! result.
//! Any failure undoes what was done (see [`super::del`]).

use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::Value;

use crate::cni::config::{invalid, NetConf, Routes};
use crate::cni::del::detach;
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, Code};
use crate::cni::kernel_link;
use crate::cni::leasing::{Grants, Leasing, Requests};
use crate::cni::member::{self, MemberState};
use crate::cni::result::{pseudo_mac, Attached};
use crate::cni::spares::{self, Spares};
use crate::cni::stale;
use crate::cni::state::{host_ifname, AttachmentState, StateDir};
use crate::cni::trace::Steps;
use crate::cni::{link_error, open_backend, wg_error};
use wgexit::api::{Attachment, LeaseRequest};
use wgexit::client::Client;
use wgexit::keys::Key;
use wgexit::net::{offload, Netlink, Netns, NetnsId};
use wgexit::wg::{Backend, BackendKind, DeviceConfig, DeviceStatus, PeerConfig, WireGuard};

pub async fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let mut steps = Steps::from_env();
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    let netns = Netns::open(netns_path).map_err(|e| link_error("cannot use CNI_NETNS", e))?;
    let own = own_namespace()?;
    if is_own_namespace(&netns, own)? {
        return Err(CniError::new(
            Code::InvalidEnv,
            format!(
                "CNI_NETNS {} is the plugin's own network namespace (the host's): a wgexit interface there would replace the host's default route; only a container with a network namespace of its own can be attached, so leave wgexit out of a host-network container's networks",
                netns_path.display()
            ),
        ));
    }
    let dir = StateDir::open(&conf.data_dir)?;
    let client = Client::new(&conf.servers, &conf.ca_file, conf.token()?)
        .map_err(|e| invalid("caFile", e.to_string()))?;
    detach_stale(&dir, conf, &client).await;
    let backend = open_backend(conf.backend)?;
    let app_region = match conf.network {
        Some(_) => Some(member::app_and_region(env, conf)?),
        None => None,
    };
    steps.done("config, state dir, client, stale check, backend");

    let private_key = Key::generate_private().map_err(|e| {
        CniError::new(Code::WireGuard, "cannot generate a key").with_details(e.to_string())
    })?;
    // From here on the attachment is ours alone: nothing above leaves a file behind.
    let _lock = dir.lock(container_id, ifname)?;
    if let Some(existing) = dir.load(container_id, ifname)? {
        return Err(CniError::new(
            Code::State,
            format!(
                "container {container_id} already has a wgexit attachment on {ifname} (address {}); DEL it first",
                existing.address.map(|a| a.to_string()).unwrap_or_else(|| "pending".into())
            ),
        ));
    }
    let mut state = new_state(env, conf, &netns, backend.kind(), &private_key)?;
    let spare = claim_spare(conf, &backend, own).await;
    record_new(
        conf,
        &dir,
        &backend,
        &mut state,
        &private_key,
        spare.as_deref(),
    )
    .await?;

    steps.done("key, lock, state");
    let place = Place {
        backend: &backend,
        netns: &netns,
        dir: &dir,
        spare: spare.is_some(),
    };
    let requests = requests(env, conf, &state, app_region);
    match attach(
        conf,
        &client,
        &place,
        requests,
        &mut state,
        &private_key,
        &mut steps,
    )
    .await
    {
        Ok(attached) => {
            if backend.kind() == BackendKind::Userspace {
                spares::refill_after_answer(conf);
            }
            Ok(attached.to_result(&conf.cni_version, conf.raw.get("prevResult")))
        }
        Err(e) => {
            if let Err(undo) = detach(&state, Some(&client), &dir).await {
                eprintln!("wgexit: undoing the failed ADD: {undo}");
            }
            Err(e)
        }
    }
}

/// The identity of the network namespace the plugin itself runs in.
pub(crate) fn own_namespace() -> Result<NetnsId, CniError> {
    Netns::open(std::path::Path::new("/proc/self/ns/net"))
        .and_then(|own| own.id())
        .map_err(|e| link_error("cannot identify the plugin's own network namespace", e))
}

/// Whether `netns` is the namespace the plugin itself runs in, `own` (compared by the
/// identity of the namespace, not by path): for a runtime on the host, the host's own.
pub(crate) fn is_own_namespace(netns: &Netns, own: NetnsId) -> Result<bool, CniError> {
    let target = netns
        .id()
        .map_err(|e| link_error("cannot identify the container's network namespace", e))?;
    Ok(own == target)
}

/// Every `staleCheckInterval`, ADD first detaches the attachments whose namespace is gone.
async fn detach_stale(dir: &StateDir, conf: &NetConf, client: &Client) {
    if !stale::check_due(dir, conf.stale_check_interval) {
        return;
    }
    for gone in stale::stale_attachments(dir, conf, Some(client)).await {
        eprintln!(
            "wgexit: cleaned up {} {}: the network namespace it was attached to is gone",
            gone.container_id, gone.ifname
        );
    }
}

/// The state of an attachment about to be made: nothing leased or linked yet.
fn new_state(
    env: &CniEnv,
    conf: &NetConf,
    netns: &Netns,
    backend: wgexit::wg::BackendKind,
    private_key: &Key,
) -> Result<AttachmentState, CniError> {
    let (container_id, ifname, netns_path) = (env.container_id()?, env.ifname()?, env.netns()?);
    Ok(AttachmentState {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
        netns: Some(netns_path.clone()),
        netns_id: Some(
            netns
                .id()
                .map_err(|e| link_error("cannot use CNI_NETNS", e))?,
        ),
        network: conf.name.clone(),
        egress: conf.egress.clone().unwrap_or_default(),
        host_ifname: host_ifname(container_id, ifname, netns_path),
        backend,
        public_key: private_key.public(),
        server: None,
        address: None,
        address6: None,
        exit_public_key: None,
        endpoint: None,
        listen_port: None,
        in_netns: false,
        release_pending: false,
        member: conf.network.as_deref().map(MemberState::new),
    })
}

/// What ADD asks the exit node and the gateway for.
fn requests(
    env: &CniEnv,
    conf: &NetConf,
    state: &AttachmentState,
    app_region: Option<(String, String)>,
) -> Requests {
    let request = lease_request(env, conf, state);
    Requests {
        member: conf
            .network
            .clone()
            .zip(app_region)
            .map(|(network, app_region)| {
                let req = member::request(&request.attachment, state.public_key, app_region);
                (network, req)
            }),
        egress: conf.egress.clone().map(|egress| (egress, request)),
    }
}

/// Records the new attachment's key and state before anything is made, with `spare` (a
/// claimed warm spare) as its link; when that fails, removes the files and the spare.
async fn record_new(
    conf: &NetConf,
    dir: &StateDir,
    backend: &Backend,
    state: &mut AttachmentState,
    private_key: &Key,
    spare: Option<&str>,
) -> Result<(), CniError> {
    if let Some(name) = spare {
        state.host_ifname = name.to_string();
    }
    let (container_id, ifname) = (&state.container_id, &state.ifname);
    let saved = dir
        .save_key(container_id, ifname, private_key)
        .and_then(|()| dir.save(state));
    if saved.is_err() {
        let _ = dir.remove(container_id, ifname);
        if let Some(name) = spare {
            let _ = backend.delete(name).await;
        }
    }
    if let Some(name) = spare {
        // The attachment's state records the spare as its link now (or it is gone).
        Spares::of(&conf.data_dir).claimed(name);
    }
    saved
}

/// Takes a warm spare link made in this namespace, `here`, when the config keeps spares and
/// the backend is `wireguard-go`'s: its name, to record as the attachment's `host_ifname`.
async fn claim_spare(conf: &NetConf, backend: &Backend, here: NetnsId) -> Option<String> {
    let Backend::Userspace(userspace) = backend else {
        return None;
    };
    if conf.spare_links == 0 {
        return None;
    }
    let spare = Spares::of(&conf.data_dir).claim(here, userspace).await?;
    Some(spare.name)
}

/// Where ADD puts things: the host's WireGuard backend, the container's namespace, the
/// state directory; and whether the link is a warm spare already serving as `host_ifname`.
struct Place<'a> {
    backend: &'a Backend,
    netns: &'a Netns,
    dir: &'a StateDir,
    spare: bool,
}

/// What the exit node is asked for: an address for this public key, with what the runtime
/// told us about the container.
fn lease_request(env: &CniEnv, conf: &NetConf, state: &AttachmentState) -> LeaseRequest {
    let mut args = env.args.clone();
    args.extend(conf.args());
    LeaseRequest {
        public_key: state.public_key,
        attachment: Attachment {
            container_id: state.container_id.clone(),
            ifname: state.ifname.clone(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            args,
        },
    }
}

async fn attach(
    conf: &NetConf,
    client: &Client,
    place: &Place<'_>,
    requests: Requests,
    state: &mut AttachmentState,
    private_key: &Key,
    steps: &mut Steps,
) -> Result<Attached, CniError> {
    let Place {
        backend,
        netns,
        dir,
        ..
    } = *place;
    // The leases travel to the exit node and the gateway while the link is made: none needs
    // the others.
    let leasing = Leasing::start(client, requests);
    let made = match make_link(place, state, private_key, steps).await {
        Ok(made) => made,
        Err(e) => {
            // Every granted lease is recorded before the error is reported, so the undo
            // releases it; the link's error is the one to report.
            let _refusal = leasing.finish(state, dir).await?;
            return Err(e);
        }
    };
    let in_host = matches!(made, Made::InHost);
    let (wg, name) = match &made {
        Made::InContainer(wg) => (wg, state.ifname.clone()),
        Made::InHost => (backend, state.host_ifname.clone()),
    };
    // Moving a TUN device between namespaces takes the kernel 15-20 ms (it waits for an RCU
    // grace period), and the key, the peers and the first handshake need only the device's
    // UDP socket, which stays in the host: they go on meanwhile, here, while the move holds
    // a thread of its own (the kernel makes the move inside the netlink request's send).
    let ifname = state.ifname.clone();
    let moving = async {
        if in_host {
            move_in_beside(&name, netns, &ifname).await
        } else {
            Ok(())
        }
    };
    let key = in_host.then_some(private_key);
    let peering = key_lease_and_peer(leasing, state, dir, (wg, &name), key, conf.routes);
    let (moved, grants) = tokio::join!(moving, peering);
    if in_host && moved.is_ok() {
        state.in_netns = true;
        dir.save(state)?;
    }
    moved?;
    let grants = grants?;
    steps.done("move into the container; key, leases and peers alongside");

    let addresses = grants.addresses();
    let routes = grants.routes(conf.routes);
    set_up_in_container(conf, netns, &ifname, &addresses, &routes).await?;
    steps.done("address, MTU, up, routes");
    let peers = grants.peers(conf.routes);
    let status = wait_for_handshake(state, (wg, &name), &peers, conf.handshake_timeout).await?;
    // Recorded for CHECK: a container with CAP_NET_ADMIN can change the device.
    state.listen_port = Some(status.listen_port);
    place.dir.save_detail(state)?;
    steps.done("first handshake");

    Ok(Attached {
        ifname,
        sandbox: netns.path().to_path_buf(),
        mac: conf.report_mac.then(|| pseudo_mac(&state.public_key)),
        mtu: conf.mtu,
        addresses,
        routes,
        nameservers: grants.member.iter().map(|g| g.dns).collect(),
    })
}

/// Gives the link `ifname` in the container its addresses, MTU and routes, and brings it up.
async fn set_up_in_container(
    conf: &NetConf,
    netns: &Netns,
    ifname: &str,
    addresses: &[IpNet],
    routes: &[IpNet],
) -> Result<(), CniError> {
    let nl = Netlink::in_netns(netns).map_err(|e| link_error("netlink in the container", e))?;
    for address in addresses {
        nl.add_address(ifname, *address)
            .await
            .map_err(|e| link_error("adding the address", e))?;
    }
    nl.set_up(ifname, Some(conf.mtu))
        .await
        .map_err(|e| link_error("bringing the link up", e))?;
    for dst in routes {
        match *dst {
            IpNet::V4(d) => nl.add_route(ifname, d).await,
            IpNet::V6(d) => nl.add_route6(ifname, d).await,
        }
        .map_err(|e| link_error("adding the route", e))?;
    }
    if conf.gvisor {
        // runsc's host GSO would send segments whose checksums the link never completes.
        netns
            .run(|| offload::set_gso(ifname, false))
            .map_err(|e| link_error("entering the container's netns", e))?
            .map_err(|e| link_error("turning generic segmentation offload off for gVisor", e))?;
    }
    Ok(())
}

/// Where [`make_link`] left the WireGuard link.
enum Made {
    /// A kernel link, made in the container; the backend opened there configures it.
    InContainer(Backend),
    /// A `wireguard-go` link, still in the host namespace as `host_ifname` and without its
    /// key: [`move_in`] moves it, [`set_key`] gives it its key.
    InHost,
}

/// Creates the WireGuard link in this (the host's) namespace, so its UDP socket stays here;
/// a claimed warm spare (see [`spares`]) is such a link already. A kernel link is made in
/// the container directly, its socket still here (see [`kernel_link`]), and given its
/// private key.
async fn make_link(
    place: &Place<'_>,
    state: &mut AttachmentState,
    private_key: &Key,
    steps: &mut Steps,
) -> Result<Made, CniError> {
    let Place {
        backend,
        netns,
        dir,
        spare,
    } = *place;
    if spare {
        steps.done("take a warm spare link");
        return Ok(Made::InHost);
    }
    if backend.kind() == BackendKind::Kernel {
        let host_nl = Netlink::current().map_err(|e| link_error("netlink", e))?;
        kernel_link::create_in_container(&host_nl, netns, &state.ifname).await?;
        state.in_netns = true;
        dir.save(state)?;
        steps.done("create WireGuard link in the container");
        let wg = kernel_link::configure_in_container(netns, &state.ifname, private_key).await?;
        steps.done("configure it");
        return Ok(Made::InContainer(wg));
    }
    backend
        .create(&state.host_ifname)
        .await
        .map_err(|e| wg_error("creating the WireGuard link", e))?;
    steps.done("create WireGuard link");
    Ok(Made::InHost)
}

/// Gives the link `name` its private key.
async fn set_key(wg: &Backend, name: &str, private_key: &Key) -> Result<(), CniError> {
    let device = DeviceConfig {
        private_key: *private_key,
        listen_port: None,
        peers: Vec::new(),
    };
    wg.configure(name, &device)
        .await
        .map_err(|e| wg_error("configuring the WireGuard link", e))
}

/// Moves the host's link `host` into the container as `ifname`.
async fn move_in(host: &str, netns: &Netns, ifname: &str) -> Result<(), CniError> {
    let host_nl = Netlink::current().map_err(|e| link_error("netlink", e))?;
    host_nl
        .move_to_netns(host, netns, ifname)
        .await
        .map_err(|e| link_error("moving the link into the container", e))
}

/// [`move_in`] on a blocking thread with a netlink socket of its own: the request's send
/// returns only when the kernel has moved the link, and this thread goes on meanwhile.
async fn move_in_beside(host: &str, netns: &Netns, ifname: &str) -> Result<(), CniError> {
    let (host, ifname) = (host.to_string(), ifname.to_string());
    let netns = Netns::open(netns.path()).map_err(|e| link_error("cannot use CNI_NETNS", e))?;
    let moved = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| {
                CniError::new(Code::Netlink, "moving the link into the container")
                    .with_details(e.to_string())
            })?;
        runtime.block_on(move_in(&host, &netns, &ifname))
    });
    moved.await.map_err(|e| {
        CniError::new(Code::Netlink, "moving the link into the container")
            .with_details(e.to_string())
    })?
}

/// Gives the link `name` its private key if `key` is one, waits for the leases (recording
/// them in `state`, whatever else failed, so the undo releases them) and gives the link its
/// peers: with a peer's persistent keepalive set, the first handshake starts.
async fn key_lease_and_peer(
    leasing: Leasing,
    state: &mut AttachmentState,
    dir: &StateDir,
    (wg, name): (&Backend, &str),
    key: Option<&Key>,
    routes: Routes,
) -> Result<Grants, CniError> {
    let keyed = match key {
        Some(key) => set_key(wg, name, key).await,
        None => Ok(()),
    };
    let grants = leasing.finish(state, dir).await?;
    keyed?;
    let grants = grants?;
    for peer in grants.peers(routes) {
        wg.set_peer(name, &peer)
            .await
            .map_err(|e| wg_error("configuring the exit node or gateway as a peer", e))?;
    }
    Ok(grants)
}

/// How long a peer may stay without a handshake before ADD starts its handshake again.
const HANDSHAKE_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// Waits until the exit node and the gateway (whichever there are) answered a handshake, so
/// the container's first packet works. WireGuard sends a peer's next initiation only 5 s
/// (`REKEY_TIMEOUT`) after one that went unanswered, as long as the whole default wait: so a
/// lost initiation, or one that reached an exit node of a pool before it had learnt the
/// lease from another member, would fail ADD. A peer still silent after
/// [`HANDSHAKE_AGAIN_AFTER`] is added again as a new peer, which initiates at once.
async fn wait_for_handshake(
    state: &AttachmentState,
    (backend, name): (&Backend, &str),
    peers: &[PeerConfig],
    timeout: Duration,
) -> Result<DeviceStatus, CniError> {
    let start = Instant::now();
    let mut again_at = start + HANDSHAKE_AGAIN_AFTER;
    loop {
        let status = backend
            .status(name)
            .await
            .map_err(|e| wg_error("reading the WireGuard link", e))?;
        if !status.peers.is_empty() && status.peers.iter().all(|p| p.last_handshake.is_some()) {
            return Ok(status);
        }
        if start.elapsed() >= timeout {
            return Err(CniError::new(
                Code::NoHandshake,
                format!(
                    "no WireGuard handshake with the exit node or gateway at {} within {} ms; check that UDP to that endpoint is open from this host and that wgexitd is running",
                    endpoints(state),
                    timeout.as_millis()
                ),
            ));
        }
        if Instant::now() >= again_at {
            again_at += HANDSHAKE_AGAIN_AFTER;
            let silent = status
                .peers
                .iter()
                .filter(|p| p.last_handshake.is_none())
                .filter_map(|p| peers.iter().find(|c| c.public_key == p.public_key));
            for peer in silent {
                backend
                    .initiate_again(name, peer)
                    .await
                    .map_err(|e| wg_error("starting the handshake again", e))?;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The endpoints ADD dialled, for messages.
fn endpoints(state: &AttachmentState) -> String {
    let member = state.member.as_ref().and_then(|m| m.endpoint);
    let all: Vec<String> = state
        .endpoint
        .into_iter()
        .chain(member)
        .map(|e| e.to_string())
        .collect();
    all.join(" and ")
}
