//! Devices of the in-kernel WireGuard module: links of kind "wireguard" made over
//! rtnetlink, configured through the "wireguard" generic-netlink family.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use genetlink::GenetlinkHandle;
use ipnet::IpNet;
use netlink_packet_core::{
    Emitable, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};
use rtnetlink::packet_route::link::InfoKind;

use super::link_err;
use super::{
    validate_name, DeviceConfig, DeviceStatus, PeerConfig, PeerStatus, WgError, WireGuard,
};
use crate::keys::Key;
use crate::net::Netlink;

/// Room for the peers of one WG_CMD_SET_DEVICE message. `wg(8)` keeps its messages
/// within a page or two as well; large peer sets are spread over several messages.
const PEERS_BUDGET: usize = 6 * 1024;

/// Makes sure the WireGuard module is available, loading it if it can be loaded.
///
/// Checks `/sys/module/wireguard`; else looks up the "wireguard" generic-netlink family,
/// which makes the kernel autoload the module (as creating a link of kind "wireguard"
/// would); else runs `modprobe -q wireguard` when modprobe is installed. The error says
/// what was tried.
pub fn ensure_module() -> Result<(), String> {
    if Path::new("/sys/module/wireguard").exists() {
        return Ok(());
    }
    let lookup = match genl_family_exists("wireguard") {
        Ok(true) => return Ok(()),
        Ok(false) => "the kernel could not load it".to_string(),
        Err(e) => format!("generic netlink lookup failed: {e}"),
    };
    let modprobe = ["/usr/sbin/modprobe", "/sbin/modprobe"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if let Some(modprobe) = modprobe {
        let ran = std::process::Command::new(modprobe)
            .args(["-q", "wireguard"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if matches!(ran, Ok(s) if s.success()) && Path::new("/sys/module/wireguard").exists() {
            return Ok(());
        }
        return Err(format!(
            "no /sys/module/wireguard, {lookup}, and `modprobe wireguard` failed"
        ));
    }
    Err(format!("no /sys/module/wireguard and {lookup}"))
}

/// Asks the generic-netlink controller, synchronously, whether family `name` exists.
/// The kernel tries to load the module providing it before answering.
fn genl_family_exists(name: &str) -> std::io::Result<bool> {
    use rtnetlink::sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

    let mut socket = Socket::new(NETLINK_GENERIC)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(std::io::Error::from)?;

    let mut request = NetlinkMessage::from(GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_string())],
    }));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    loop {
        let mut reply = Vec::with_capacity(16 * 1024);
        let n = socket.recv(&mut reply, 0)?;
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(&reply[offset..n])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(_) => return Ok(true),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return if -e.raw_code() == libc::ENOENT {
                        Ok(false)
                    } else {
                        Err(e.to_io())
                    };
                }
                NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(false),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
        }
    }
}

/// The kernel backend.
pub struct KernelBackend {
    route: Netlink,
    genl: GenetlinkHandle,
}

impl KernelBackend {
    /// Opens rtnetlink and generic-netlink connections in the current thread's network
    /// namespace. Must run inside a tokio runtime.
    pub fn open() -> Result<KernelBackend, WgError> {
        let route = Netlink::current().map_err(link_err("rtnetlink"))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| WgError::NoRuntime)?;
        let _guard = runtime.enter();
        let (connection, genl, _) = genetlink::new_connection().map_err(|source| WgError::Io {
            name: "genetlink".to_string(),
            source,
        })?;
        runtime.spawn(connection);
        Ok(KernelBackend { route, genl })
    }

    /// Sends one WG_CMD_SET_DEVICE and waits for its acknowledgement.
    async fn set_device(
        &self,
        name: &str,
        attributes: Vec<WireguardAttribute>,
    ) -> Result<(), WgError> {
        let mut request = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        }));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut genl = self.genl.clone();
        let mut replies = genl.request(request).await.map_err(|e| genl_err(name, e))?;
        while let Some(reply) = replies.next().await {
            let reply = reply.map_err(|e| netlink_err(name, e))?;
            if let NetlinkPayload::Error(e) = reply.payload {
                if e.code.is_some() {
                    return Err(errno_err(name, -e.raw_code(), e.to_io()));
                }
            }
        }
        Ok(())
    }

    /// Sends `peers` in as many WG_CMD_SET_DEVICE messages as needed; `first` holds the
    /// device attributes that go with the first message only.
    async fn send_peers(
        &self,
        name: &str,
        first: Vec<WireguardAttribute>,
        peers: &[PeerConfig],
    ) -> Result<(), WgError> {
        let batches = batch_peers(peers);
        let mut first = Some(first);
        for batch in batches {
            let mut attributes = vec![WireguardAttribute::IfName(name.to_string())];
            attributes.extend(first.take().unwrap_or_default());
            if !batch.is_empty() {
                attributes.push(WireguardAttribute::Peers(batch));
            }
            self.set_device(name, attributes).await?;
        }
        if let Some(device) = first {
            let mut attributes = vec![WireguardAttribute::IfName(name.to_string())];
            attributes.extend(device);
            self.set_device(name, attributes).await?;
        }
        Ok(())
    }
}

fn netlink_err(name: &str, e: impl std::fmt::Display) -> WgError {
    WgError::Netlink {
        name: name.to_string(),
        detail: e.to_string(),
    }
}

fn genl_err(name: &str, e: genetlink::GenetlinkError) -> WgError {
    match &e {
        genetlink::GenetlinkError::NetlinkError(io) if io.raw_os_error() == Some(libc::ENOENT) => {
            WgError::KernelModuleMissing(format!(
                "generic netlink family \"wireguard\" is unknown: {e}"
            ))
        }
        genetlink::GenetlinkError::NetlinkError(io) if io.raw_os_error() == Some(libc::ENODEV) => {
            WgError::NoSuchDevice(name.to_string())
        }
        _ => netlink_err(name, e),
    }
}

fn errno_err(name: &str, errno: i32, io: std::io::Error) -> WgError {
    if errno == libc::ENODEV {
        WgError::NoSuchDevice(name.to_string())
    } else {
        netlink_err(name, io)
    }
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net.addr() {
        IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
        IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// The attributes of `peer` up to (not including) its allowed IPs.
fn peer_head(peer: &PeerConfig) -> Vec<WireguardPeerAttribute> {
    let mut attrs = vec![
        WireguardPeerAttribute::PublicKey(peer.public_key.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::PersistentKeepalive(peer.persistent_keepalive.unwrap_or(0)),
    ];
    if let Some(endpoint) = peer.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(endpoint));
    }
    attrs
}

fn peer_len(attrs: &[WireguardPeerAttribute]) -> usize {
    WireguardPeer(attrs.to_vec()).buffer_len()
}

/// Spreads peers over messages of about [`PEERS_BUDGET`] bytes. A peer whose allowed IPs
/// do not fit continues in the next message with only its public key and the remaining
/// allowed IPs (the kernel then appends them, since the flag to replace is not repeated).
fn batch_peers(peers: &[PeerConfig]) -> Vec<Vec<WireguardPeer>> {
    let mut batches = Vec::new();
    let mut batch: Vec<WireguardPeer> = Vec::new();
    let mut used = 0usize;
    for peer in peers {
        let ips: Vec<WireguardAllowedIp> = peer.allowed_ips.iter().map(allowed_ip).collect();
        let mut rest = &ips[..];
        let mut head = peer_head(peer);
        loop {
            // + 4 for the header of the allowed-IPs nest.
            let base = peer_len(&head) + 4;
            let first_ip = rest.first().map_or(0, Emitable::buffer_len);
            if !batch.is_empty() && used + base + first_ip > PEERS_BUDGET {
                batches.push(std::mem::take(&mut batch));
                used = 0;
            }
            // As many allowed IPs as fit, and at least one so that this always progresses.
            let mut size = base;
            let mut n = 0;
            while n < rest.len() && (n == 0 || used + size + rest[n].buffer_len() <= PEERS_BUDGET) {
                size += rest[n].buffer_len();
                n += 1;
            }
            let mut attrs = head;
            if n > 0 {
                attrs.push(WireguardPeerAttribute::AllowedIps(rest[..n].to_vec()));
            }
            let entry = WireguardPeer(attrs);
            used += entry.buffer_len();
            batch.push(entry);
            rest = &rest[n..];
            if rest.is_empty() {
                break;
            }
            batches.push(std::mem::take(&mut batch));
            used = 0;
            head = vec![WireguardPeerAttribute::PublicKey(peer.public_key.0)];
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

fn to_net(attrs: &[WireguardAllowedIpAttr]) -> Option<IpNet> {
    let addr = attrs.iter().find_map(|a| match a {
        WireguardAllowedIpAttr::IpAddr(ip) => Some(*ip),
        _ => None,
    })?;
    let cidr = attrs.iter().find_map(|a| match a {
        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
        _ => None,
    })?;
    IpNet::new(addr, cidr).ok()
}

/// Folds one message of a WG_CMD_GET_DEVICE dump into `status`. A peer split over two
/// messages shows up again at the start of the next one with the rest of its allowed IPs.
fn merge_dump_message(status: &mut DeviceStatus, message: WireguardMessage) {
    for attribute in message.attributes {
        match attribute {
            WireguardAttribute::PublicKey(k) => {
                let key = Key(k);
                status.public_key = (!key.is_zero()).then_some(key);
            }
            WireguardAttribute::ListenPort(p) => status.listen_port = p,
            WireguardAttribute::Fwmark(m) => status.fwmark = m,
            WireguardAttribute::Peers(peers) => {
                for peer in peers {
                    merge_peer(status, peer);
                }
            }
            _ => {}
        }
    }
}

fn merge_peer(status: &mut DeviceStatus, peer: WireguardPeer) {
    let Some(public_key) = peer.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
        _ => None,
    }) else {
        return;
    };
    let continues = status
        .peers
        .last()
        .is_some_and(|last| last.public_key == public_key);
    if !continues {
        status.peers.push(PeerStatus {
            public_key,
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        });
    }
    let Some(entry) = status.peers.last_mut() else {
        return;
    };
    for attribute in peer.0 {
        match attribute {
            WireguardPeerAttribute::Endpoint(e) => entry.endpoint = Some(e),
            WireguardPeerAttribute::LastHandshake(t) => {
                entry.last_handshake = handshake_time(t.seconds, t.nano_seconds);
            }
            WireguardPeerAttribute::RxBytes(n) => entry.rx_bytes = n,
            WireguardPeerAttribute::TxBytes(n) => entry.tx_bytes = n,
            WireguardPeerAttribute::AllowedIps(ips) => {
                entry
                    .allowed_ips
                    .extend(ips.iter().filter_map(|ip| to_net(ip)));
            }
            _ => {}
        }
    }
}

fn handshake_time(seconds: i64, nanos: i64) -> Option<SystemTime> {
    if seconds <= 0 && nanos <= 0 {
        return None;
    }
    let secs = u64::try_from(seconds).ok()?;
    let nanos = u32::try_from(nanos).ok().filter(|n| *n < 1_000_000_000)?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// What the kernel's refusal to create WireGuard link `name` means, when it is one of
/// ours to name: the name is taken, or the kernel has no WireGuard.
pub fn creation_refusal(name: &str, e: &crate::net::LinkError) -> Option<WgError> {
    match e.errno() {
        Some(libc::EEXIST) => Some(WgError::AlreadyExists(name.to_string())),
        Some(libc::EOPNOTSUPP) => Some(WgError::KernelModuleMissing(
            "the kernel does not know link kind \"wireguard\"".to_string(),
        )),
        _ => None,
    }
}

impl WireGuard for KernelBackend {
    async fn create(&self, name: &str) -> Result<(), WgError> {
        validate_name(name)?;
        self.route
            .add_wireguard(name)
            .await
            .map_err(|e| creation_refusal(name, &e).unwrap_or_else(|| link_err(name)(e)))
    }

    async fn configure(&self, name: &str, config: &DeviceConfig) -> Result<(), WgError> {
        validate_name(name)?;
        let mut device = vec![
            WireguardAttribute::PrivateKey(config.private_key.0),
            WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
        ];
        if let Some(port) = config.listen_port {
            device.push(WireguardAttribute::ListenPort(port));
        }
        self.send_peers(name, device, &config.peers).await
    }

    async fn set_peers(&self, name: &str, peers: &[PeerConfig]) -> Result<(), WgError> {
        validate_name(name)?;
        self.send_peers(name, Vec::new(), peers).await
    }

    async fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), WgError> {
        validate_name(name)?;
        let peer = WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(public_key.0),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ]);
        self.set_device(
            name,
            vec![
                WireguardAttribute::IfName(name.to_string()),
                WireguardAttribute::Peers(vec![peer]),
            ],
        )
        .await
    }

    async fn status(&self, name: &str) -> Result<DeviceStatus, WgError> {
        validate_name(name)?;
        let mut request = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(name.to_string())],
        }));
        request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut genl = self.genl.clone();
        let mut replies = genl.request(request).await.map_err(|e| genl_err(name, e))?;
        let mut status = DeviceStatus {
            public_key: None,
            listen_port: 0,
            fwmark: 0,
            peers: Vec::new(),
        };
        let mut seen = false;
        while let Some(reply) = replies.next().await {
            let reply = reply.map_err(|e| netlink_err(name, e))?;
            match reply.payload {
                NetlinkPayload::InnerMessage(message) => {
                    seen = true;
                    merge_dump_message(&mut status, message.payload);
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(errno_err(name, -e.raw_code(), e.to_io()));
                }
                _ => {}
            }
        }
        if seen {
            Ok(status)
        } else {
            Err(WgError::NoSuchDevice(name.to_string()))
        }
    }

    async fn exists(&self, name: &str) -> bool {
        validate_name(name).is_ok()
            && matches!(
                self.route.link_info(name).await,
                Ok(Some(info)) if info.kind == Some(InfoKind::Wireguard)
            )
    }

    async fn delete(&self, name: &str) -> Result<(), WgError> {
        validate_name(name)?;
        self.route
            .delete_link(name)
            .await
            .map(|_| ())
            .map_err(link_err(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(b: u8, ips: usize) -> PeerConfig {
        PeerConfig {
            public_key: Key([b; 32]),
            endpoint: Some("198.18.0.1:51820".parse().unwrap()),
            allowed_ips: (0..ips)
                .map(|i| {
                    IpNet::new(
                        IpAddr::from([100, 64, (i / 256) as u8, (i % 256) as u8]),
                        32,
                    )
                    .unwrap()
                })
                .collect(),
            persistent_keepalive: Some(25),
        }
    }

    fn flatten(batches: &[Vec<WireguardPeer>]) -> DeviceStatus {
        let mut status = DeviceStatus {
            public_key: None,
            listen_port: 0,
            fwmark: 0,
            peers: Vec::new(),
        };
        for batch in batches {
            merge_dump_message(
                &mut status,
                WireguardMessage {
                    cmd: WireguardCmd::GetDevice,
                    attributes: vec![WireguardAttribute::Peers(batch.clone())],
                },
            );
        }
        status
    }

    #[test]
    fn batches_stay_within_budget_and_keep_everything() {
        let peers: Vec<PeerConfig> = (0..200u8)
            .map(|b| peer(b, (b as usize) % 5))
            .chain([peer(250, 1000)])
            .collect();
        let batches = batch_peers(&peers);
        assert!(batches.len() > 1);
        for batch in &batches {
            let len: usize = batch.iter().map(|p| p.buffer_len()).sum();
            assert!(len <= PEERS_BUDGET, "batch of {len} bytes");
        }
        let status = flatten(&batches);
        assert_eq!(status.peers.len(), peers.len());
        for (got, want) in status.peers.iter().zip(&peers) {
            assert_eq!(got.public_key, want.public_key);
            assert_eq!(got.allowed_ips, want.allowed_ips);
            assert_eq!(got.endpoint, want.endpoint);
        }
        // Only the first piece of a split peer replaces its allowed IPs.
        let pieces: Vec<&WireguardPeer> = batches
            .iter()
            .flatten()
            .filter(|p| p.contains(&WireguardPeerAttribute::PublicKey([250; 32])))
            .collect();
        assert!(pieces.len() > 1);
        assert!(pieces[0].contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        assert!(pieces[1..].iter().all(|p| !p
            .iter()
            .any(|a| matches!(a, WireguardPeerAttribute::Flags(_)))));
    }

    #[test]
    fn no_peers_means_no_batches() {
        assert!(batch_peers(&[]).is_empty());
        assert_eq!(batch_peers(&[peer(1, 0)]).len(), 1);
    }

    #[test]
    fn handshake_zero_is_none() {
        assert_eq!(handshake_time(0, 0), None);
        assert_eq!(
            handshake_time(5, 7),
            Some(SystemTime::UNIX_EPOCH + Duration::new(5, 7))
        );
        assert_eq!(handshake_time(5, 2_000_000_000), None);
    }
}
