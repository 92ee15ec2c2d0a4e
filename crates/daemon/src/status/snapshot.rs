//! What each space (egress and private network) is doing, read from the lease registry, the
//! WireGuard device and the firewall's counters (and, for a network, its resolver's), and
//! summed up so that 60,000 peers read as a few numbers (the per-peer rows only on request).
//! Both kinds are read into one [`SpaceView`] and summed up by the same functions.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{EgressConfig, NetworkConfig};
use crate::dataplane::{Dataplane, SpaceDevice, SpacesDataplane};
use crate::dns::counts::DnsTotals;
use crate::leases::members::kind_of;
use crate::leases::service::LeaseService;
use crate::space::Space;
use wgexit::api::{Lease, MemberKind};
use wgexit::keys::Key;
use wgexit::wg::{DeviceStatus, PeerStatus};

/// WireGuard's session lifetime (`REJECT_AFTER_TIME`): a peer whose last handshake is younger
/// has a live session; a peer sending keepalives handshakes at least this often.
pub const LIVE: Duration = Duration::from_secs(180);

/// Handshake-age buckets, by upper bound in seconds (`None`: the rest). Peers never
/// handshaken are counted apart, as `never`.
pub const AGE_BUCKETS: [(&str, Option<u64>); 5] = [
    ("0-30s", Some(30)),
    ("30s-3m", Some(180)),
    ("3m-10m", Some(600)),
    ("10m-1h", Some(3600)),
    ("1h+", None),
];

/// The label of peers never handshaken.
pub const NEVER: &str = "never";

/// `wgexitd status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The daemon's version.
    pub version: String,
    pub egress: Vec<EgressStatus>,
    /// The private networks.
    #[serde(default)]
    pub network: Vec<NetworkStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub name: String,
    pub prefix: String,
    pub endpoint: SocketAddr,
    pub wg_interface: String,
    /// Its members by kind: containers and peers (laptops).
    pub members: MemberCounts,
    /// Why the device could not be read, when it could not (`None`: read fine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_error: Option<String>,
    pub peers: PeerSummary,
    /// What its resolver answered, refused and forwarded since the daemon started.
    pub dns: DnsTotals,
    /// Packets the firewall dropped or rejected at its tunnel (`None`: no count readable).
    pub firewall_drops: Option<u64>,
    /// One row per member, with `--peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_list: Option<Vec<PeerRow>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCounts {
    pub containers: usize,
    pub peers: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressStatus {
    pub name: String,
    /// Its static egress addresses.
    pub ips: Vec<IpAddr>,
    /// Leases per egress address (each lease leaves from one).
    #[serde(default)]
    pub ip_leases: std::collections::BTreeMap<IpAddr, usize>,
    pub endpoint: SocketAddr,
    pub wg_interface: String,
    pub pool: String,
    pub leases: usize,
    /// Leasable addresses in the pool.
    pub capacity: usize,
    /// Why the device could not be read, when it could not (`None`: read fine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_error: Option<String>,
    pub peers: PeerSummary,
    /// Packets its policy refused (`None`: no count readable).
    #[serde(default)]
    pub firewall_drops: Option<u64>,
    /// One row per lease, with `--peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_list: Option<Vec<PeerRow>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSummary {
    /// Peers on the device.
    pub total: usize,
    /// Last handshake within [`LIVE`].
    pub live: usize,
    /// Handshaken before, but not within [`LIVE`].
    pub idle: usize,
    /// No handshake yet.
    pub never: usize,
    /// Leases whose peer is not on the device (reconcile puts it back).
    pub leases_without_peer: usize,
    /// Peers per [`AGE_BUCKETS`] bucket, in that order, then `never`.
    pub handshake_age: Vec<AgeCount>,
    pub newest_handshake_age_seconds: Option<u64>,
    pub oldest_handshake_age_seconds: Option<u64>,
    /// From containers, summed over the peers on the device now.
    pub received_bytes: u64,
    /// To containers.
    pub transmitted_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgeCount {
    pub bucket: String,
    pub peers: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub address: IpAddr,
    pub public_key: Key,
    pub container_id: String,
    pub ifname: String,
    pub host: String,
    /// Whether the device has this lease's peer.
    pub on_device: bool,
    pub last_handshake_age_seconds: Option<u64>,
    pub received_bytes: u64,
    pub transmitted_bytes: u64,
}

/// A space as read: its config, its leases, its device (or why it could not be read) and
/// the firewall's count of what it dropped there.
pub struct SpaceView<'a, C> {
    pub config: &'a C,
    pub leases: Vec<Lease>,
    pub capacity: usize,
    pub device: Result<Option<DeviceStatus>, String>,
    pub firewall_drops: Option<u64>,
}

pub type EgressView<'a> = SpaceView<'a, EgressConfig>;
pub type NetworkView<'a> = SpaceView<'a, NetworkConfig>;

/// Reads one space: the registry (briefly locked) and the device (not under the lock);
/// `drops`: the firewall's counts of every space.
async fn read_space<'a, C, D>(
    service: &LeaseService<D>,
    config: &'a C,
    drops: &BTreeMap<Space, u64>,
) -> SpaceView<'a, C>
where
    C: SpaceDevice,
    D: SpacesDataplane + Dataplane<C>,
{
    let device = service
        .dataplane()
        .device(config)
        .await
        .map_err(|e| e.to_string());
    let space = config.space();
    SpaceView {
        config,
        leases: service.space_leases(&space).await,
        capacity: 0,
        device,
        firewall_drops: drops.get(&space).copied(),
    }
}

/// The firewall's counts of every space, read once (none when they cannot be read).
async fn firewall_drops<C: SpaceDevice, D: Dataplane<C>>(dataplane: &D) -> BTreeMap<Space, u64> {
    dataplane.firewall_drops().await.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "cannot read the firewall's counters");
        BTreeMap::new()
    })
}

/// Reads every egress.
pub async fn read<D: SpacesDataplane>(service: &LeaseService<D>) -> Vec<EgressView<'_>> {
    let drops = firewall_drops::<EgressConfig, D>(service.dataplane()).await;
    let mut out = Vec::new();
    for config in &service.config.egress {
        let mut view = read_space(service, config, &drops).await;
        view.capacity = service
            .info(&config.name)
            .await
            .map(|i| i.capacity)
            .unwrap_or_default();
        out.push(view);
    }
    out
}

/// Reads every private network.
pub async fn read_networks<D: SpacesDataplane>(service: &LeaseService<D>) -> Vec<NetworkView<'_>> {
    let drops = firewall_drops::<NetworkConfig, D>(service.dataplane()).await;
    let mut out = Vec::new();
    for config in &service.config.network {
        out.push(read_space(service, config, &drops).await);
    }
    out
}

/// The bucket label of a handshake `age` old.
pub fn age_bucket(age: Duration) -> &'static str {
    let secs = age.as_secs();
    AGE_BUCKETS
        .iter()
        .find(|(_, bound)| bound.is_none_or(|b| secs < b))
        .map_or(AGE_BUCKETS[AGE_BUCKETS.len() - 1].0, |(label, _)| label)
}

fn age(at: Option<SystemTime>, now: SystemTime) -> Option<Duration> {
    at.map(|t| now.duration_since(t).unwrap_or_default())
}

/// Counts `peers` by handshake age at `now`.
pub fn summarize_peers(peers: &[PeerStatus], leases: usize, now: SystemTime) -> PeerSummary {
    let mut s = PeerSummary {
        total: peers.len(),
        leases_without_peer: leases.saturating_sub(peers.len()),
        ..PeerSummary::default()
    };
    let mut buckets: HashMap<&str, usize> = HashMap::new();
    for p in peers {
        s.received_bytes = s.received_bytes.saturating_add(p.rx_bytes);
        s.transmitted_bytes = s.transmitted_bytes.saturating_add(p.tx_bytes);
        let Some(a) = age(p.last_handshake, now) else {
            s.never += 1;
            continue;
        };
        if a < LIVE {
            s.live += 1;
        } else {
            s.idle += 1;
        }
        *buckets.entry(age_bucket(a)).or_default() += 1;
        let secs = Some(a.as_secs());
        s.newest_handshake_age_seconds = s.newest_handshake_age_seconds.min(secs).or(secs);
        s.oldest_handshake_age_seconds = s.oldest_handshake_age_seconds.max(secs);
    }
    s.handshake_age = AGE_BUCKETS
        .iter()
        .map(|(label, _)| AgeCount {
            bucket: label.to_string(),
            peers: buckets.get(label).copied().unwrap_or(0),
        })
        .chain(std::iter::once(AgeCount {
            bucket: NEVER.to_string(),
            peers: s.never,
        }))
        .collect();
    s
}

/// One row per lease, by address, with its peer's numbers.
fn peer_rows(leases: &[Lease], peers: &[PeerStatus], now: SystemTime) -> Vec<PeerRow> {
    let by_key: HashMap<Key, &PeerStatus> = peers.iter().map(|p| (p.public_key, p)).collect();
    let mut rows: Vec<PeerRow> = leases
        .iter()
        .map(|l| {
            let peer = by_key.get(&l.public_key);
            PeerRow {
                address: l.address,
                public_key: l.public_key,
                container_id: l.attachment.container_id.clone(),
                ifname: l.attachment.ifname.clone(),
                host: l.attachment.host.clone(),
                on_device: peer.is_some(),
                last_handshake_age_seconds: peer
                    .and_then(|p| age(p.last_handshake, now))
                    .map(|a| a.as_secs()),
                received_bytes: peer.map_or(0, |p| p.rx_bytes),
                transmitted_bytes: peer.map_or(0, |p| p.tx_bytes),
            }
        })
        .collect();
    rows.sort_by_key(|r| r.address);
    rows
}

/// How many of `leases` leave from each of the egress's addresses.
fn ip_leases(
    cfg: &crate::config::EgressConfig,
    leases: &[wgexit::api::Lease],
) -> std::collections::BTreeMap<IpAddr, usize> {
    let mut out: std::collections::BTreeMap<IpAddr, usize> =
        egress_ips(cfg).into_iter().map(|ip| (ip, 0)).collect();
    for l in leases {
        *out.entry(IpAddr::V4(cfg.egress_ip_of(l.address)))
            .or_default() += 1;
        let ip6 = l.address6.and_then(|a| cfg.egress_ip6_of(a.into()));
        if let Some(ip6) = ip6 {
            *out.entry(IpAddr::V6(ip6)).or_default() += 1;
        }
    }
    out
}

/// The egress's static IPv4s, then its IPv6s.
fn egress_ips(cfg: &crate::config::EgressConfig) -> Vec<IpAddr> {
    let v4 = cfg.ips().iter().copied().map(IpAddr::V4);
    let v6 = cfg
        .v6
        .iter()
        .flat_map(|v6| v6.ips.iter().copied().map(IpAddr::V6));
    v4.chain(v6).collect()
}

/// The device's peers (none when it could not be read) and why it could not be.
fn device_of<'v, C: SpaceDevice>(view: &'v SpaceView<'_, C>) -> (&'v [PeerStatus], Option<String>) {
    match &view.device {
        Ok(Some(d)) => (&d.peers, None),
        Ok(None) => (
            &[],
            Some(format!(
                "no WireGuard device {}",
                view.config.wg_interface()
            )),
        ),
        Err(e) => (&[], Some(e.clone())),
    }
}

/// An egress's status at `now`; the per-lease rows when `with_peers`.
pub fn summarize(view: &EgressView<'_>, now: SystemTime, with_peers: bool) -> EgressStatus {
    let cfg = view.config;
    let (peers, device_error) = device_of(view);
    EgressStatus {
        name: cfg.name.clone(),
        ips: egress_ips(cfg),
        ip_leases: ip_leases(cfg, &view.leases),
        endpoint: cfg.endpoint,
        wg_interface: cfg.wg_interface.to_string(),
        pool: cfg.pool.to_string(),
        leases: view.leases.len(),
        capacity: view.capacity,
        device_error,
        peers: summarize_peers(peers, view.leases.len(), now),
        firewall_drops: view.firewall_drops,
        peer_list: with_peers.then(|| peer_rows(&view.leases, peers, now)),
    }
}

/// A network's status at `now`, with what its resolver counted; the per-member rows when
/// `with_peers`.
pub fn summarize_network(
    view: &NetworkView<'_>,
    dns: DnsTotals,
    now: SystemTime,
    with_peers: bool,
) -> NetworkStatus {
    let cfg = view.config;
    let (peers, device_error) = device_of(view);
    let laptops = view
        .leases
        .iter()
        .filter(|l| kind_of(l) == MemberKind::Peer)
        .count();
    NetworkStatus {
        name: cfg.name.clone(),
        prefix: cfg.prefix.to_string(),
        endpoint: cfg.endpoint,
        wg_interface: cfg.wg_interface.to_string(),
        members: MemberCounts {
            containers: view.leases.len() - laptops,
            peers: laptops,
        },
        device_error,
        peers: summarize_peers(peers, view.leases.len(), now),
        dns,
        firewall_drops: view.firewall_drops,
        peer_list: with_peers.then(|| peer_rows(&view.leases, peers, now)),
    }
}

/// Every network's status at `now`.
pub async fn networks<D>(
    service: &LeaseService<D>,
    now: SystemTime,
    with_peers: bool,
) -> Vec<NetworkStatus>
where
    D: SpacesDataplane,
{
    read_networks(service)
        .await
        .iter()
        .map(|v| {
            let dns = service.dns_counts(&v.config.name).totals();
            summarize_network(v, dns, now, with_peers)
        })
        .collect()
}

/// Everything `wgexitd status` shows.
pub async fn report<D>(service: &LeaseService<D>, with_peers: bool) -> StatusReport
where
    D: SpacesDataplane,
{
    let now = SystemTime::now();
    let views = read(service).await;
    StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        egress: views
            .iter()
            .map(|v| summarize(v, now, with_peers))
            .collect(),
        network: networks(service, now, with_peers).await,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn peer(n: u32, handshake_age: Option<u64>, now: SystemTime) -> PeerStatus {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&n.to_be_bytes());
        PeerStatus {
            public_key: Key(key),
            endpoint: None,
            allowed_ips: vec![],
            last_handshake: handshake_age.map(|s| now - Duration::from_secs(s)),
            rx_bytes: 100,
            tx_bytes: 10,
        }
    }

    #[test]
    fn buckets_split_at_their_bounds() {
        let s = |n| age_bucket(Duration::from_secs(n));
        assert_eq!(
            [s(0), s(29), s(30), s(179), s(180), s(599), s(600), s(3600)],
            ["0-30s", "0-30s", "30s-3m", "30s-3m", "3m-10m", "3m-10m", "10m-1h", "1h+"]
        );
    }

    #[test]
    fn peers_are_counted_by_age() {
        let now = SystemTime::now();
        let peers = vec![
            peer(1, Some(5), now),
            peer(2, Some(100), now),
            peer(3, Some(400), now),
            peer(4, None, now),
        ];
        let s = summarize_peers(&peers, 5, now);
        assert_eq!((s.total, s.live, s.idle, s.never), (4, 2, 1, 1));
        assert_eq!(s.leases_without_peer, 1);
        assert_eq!(s.newest_handshake_age_seconds, Some(5));
        assert_eq!(s.oldest_handshake_age_seconds, Some(400));
        assert_eq!((s.received_bytes, s.transmitted_bytes), (400, 40));
        let counts: Vec<usize> = s.handshake_age.iter().map(|c| c.peers).collect();
        assert_eq!(counts, [1, 1, 1, 0, 0, 1]);
        assert_eq!(s.handshake_age[5].bucket, NEVER);
    }

    fn member(n: u8, kind: MemberKind) -> Lease {
        Lease {
            egress: "network:acme".into(),
            public_key: peer(u32::from(n), None, SystemTime::now()).public_key,
            address: format!("fdaa:0:1::{:x}", 0x100 + u16::from(n))
                .parse()
                .unwrap(),
            address6: None,
            created_at: 0,
            attachment: Default::default(),
            member: Some(Box::new(wgexit::api::MemberInfo {
                network: "acme".into(),
                kind,
                app: "web".into(),
                region: "ams".into(),
                name: String::new(),
            })),
        }
    }

    #[test]
    fn a_network_is_summed_up_like_an_egress_with_its_members_by_kind() {
        let now = SystemTime::now();
        let config = crate::config::network::tests::network("acme", "fdaa:0:1::/48", "wgn-acme");
        let view = NetworkView {
            config: &config,
            leases: vec![
                member(1, MemberKind::Container),
                member(2, MemberKind::Container),
                member(3, MemberKind::Peer),
            ],
            capacity: 0,
            device: Ok(Some(DeviceStatus {
                public_key: None,
                listen_port: 51830,
                fwmark: 0,
                peers: vec![peer(1, Some(5), now), peer(3, None, now)],
            })),
            firewall_drops: Some(7),
        };
        let dns = DnsTotals {
            answered: 4,
            refused: 1,
            forwarded: 2,
        };
        let s = summarize_network(&view, dns, now, true);
        assert_eq!((s.members.containers, s.members.peers), (2, 1));
        assert_eq!((s.peers.total, s.peers.live, s.peers.never), (2, 1, 1));
        assert_eq!(s.peers.leases_without_peer, 1);
        assert_eq!((s.dns, s.firewall_drops), (dns, Some(7)));
        let rows = s.peer_list.unwrap();
        assert_eq!(rows.iter().filter(|r| r.on_device).count(), 2);
        assert_eq!(rows[0].last_handshake_age_seconds, Some(5));
    }
}
