//! What the daemon exports to Prometheus, on `[metrics] listen` ([`server`]), apart from the
//! API.
//!
//! [`Metrics`] holds every family. Events are counted where they happen (leases granted and
//! released, collections, reconcile repairs, firewall applies, API requests through
//! [`crate::api::observe`]); what is a state rather than an event (leases and capacity,
//! peers by handshake age, bytes through the tunnel) is read at each scrape from the same
//! [`crate::status`] snapshot `wgexitd status` shows.
//!
//! Labels: `egress` on everything per egress, `ip` beside it for what is per egress IP; a
//! private network's families take `network` the same way (its members, by kind, and the
//! idle ones collected, its peers by handshake age, bytes, its resolver's queries by
//! outcome); the firewall's drops are per space (`kind`, `name`). More families can be added with
//! [`Metrics::register`] from any module (e.g. a cluster's own), before or after start.

pub mod bytes;
pub mod server;
pub mod text;

use std::sync::RwLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::dataplane::Changes;
use crate::dns::counts::DnsCounts;
use crate::space::Space;

/// Label set of a family per egress.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    pub egress: String,
}

/// Label set of a family per egress IP.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressIpLabels {
    pub egress: String,
    pub ip: String,
}

/// Peers of an egress whose last handshake falls in one age bucket (see
/// [`crate::status::AGE_BUCKETS`]).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerAgeLabels {
    pub egress: String,
    pub handshake_age: String,
}

/// One API route (its pattern, e.g. `/v1/egress/{egress}/leases`) and method.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

/// An API route, method and the status answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: String,
}

/// What a reconcile pass repaired on an egress's device.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    pub egress: String,
    pub repair: String,
}

/// Label set of a family per private network.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetworkLabels {
    pub network: String,
}

/// A private network's members of one kind: `container` or `peer`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub network: String,
    pub kind: String,
}

/// A private network's peers whose last handshake falls in one age bucket.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetworkPeerAgeLabels {
    pub network: String,
    pub handshake_age: String,
}

/// A network's resolver's queries by outcome: `answered`, `refused` or `forwarded`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub network: String,
    pub outcome: String,
}

/// A space: `kind` is `egress` or `network`, `name` its name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpaceLabels {
    pub kind: String,
    pub name: String,
}

/// Who leads what: `kind` is `egress` or `network`, `name` its name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaderLabels {
    pub kind: String,
    pub name: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// API latency buckets, seconds: a lease is a few milliseconds, an fsync'd one under load
/// tens; past a second something is wrong.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])
}

/// Every family the daemon exports, and the registry they are encoded from.
#[derive(Debug)]
pub struct Metrics {
    registry: RwLock<Registry>,
    pub leases: Family<EgressLabels, Gauge>,
    pub capacity: Family<EgressLabels, Gauge>,
    pub ip_leases: Family<EgressIpLabels, Gauge>,
    pub peers: Family<PeerAgeLabels, Gauge>,
    pub received_bytes: Family<EgressLabels, Counter>,
    pub transmitted_bytes: Family<EgressLabels, Counter>,
    pub granted: Family<EgressLabels, Counter>,
    pub renewed: Family<EgressLabels, Counter>,
    pub released: Family<EgressLabels, Counter>,
    pub collected: Family<EgressLabels, Counter>,
    pub repairs: Family<RepairLabels, Counter>,
    pub firewall_applies: Counter,
    pub leader: Family<LeaderLabels, Gauge>,
    pub network_members: Family<MemberLabels, Gauge>,
    pub network_collected: Family<NetworkLabels, Counter>,
    pub network_peers: Family<NetworkPeerAgeLabels, Gauge>,
    pub network_received_bytes: Family<NetworkLabels, Counter>,
    pub network_transmitted_bytes: Family<NetworkLabels, Counter>,
    pub dns_queries: Family<DnsLabels, Counter>,
    pub firewall_drops: Family<SpaceLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RouteLabels>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: RwLock::new(Registry::default()),
            leases: Family::default(),
            capacity: Family::default(),
            ip_leases: Family::default(),
            peers: Family::default(),
            received_bytes: Family::default(),
            transmitted_bytes: Family::default(),
            granted: Family::default(),
            renewed: Family::default(),
            released: Family::default(),
            collected: Family::default(),
            repairs: Family::default(),
            firewall_applies: Counter::default(),
            leader: Family::default(),
            network_members: Family::default(),
            network_collected: Family::default(),
            network_peers: Family::default(),
            network_received_bytes: Family::default(),
            network_transmitted_bytes: Family::default(),
            dns_queries: Family::default(),
            firewall_drops: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
        };
        m.register_own();
        m
    }

    fn register_own(&self) {
        self.register(
            "wgexit_leases",
            "Live leases per egress.",
            self.leases.clone(),
        );
        self.register(
            "wgexit_pool_capacity",
            "Leasable addresses per egress.",
            self.capacity.clone(),
        );
        self.register(
            "wgexit_egress_ip_leases",
            "Live leases per egress IP.",
            self.ip_leases.clone(),
        );
        self.register(
            "wgexit_peers",
            "WireGuard peers per egress by the age of their last handshake (never: none yet).",
            self.peers.clone(),
        );
        self.register(
            "wgexit_tunnel_received_bytes",
            "Bytes received from containers on an egress's WireGuard device (its peers' counters, added up while this process runs).",
            self.received_bytes.clone(),
        );
        self.register(
            "wgexit_tunnel_transmitted_bytes",
            "Bytes sent to containers on an egress's WireGuard device.",
            self.transmitted_bytes.clone(),
        );
        self.register(
            "wgexit_network_members",
            "Live members per private network, by kind (container, peer).",
            self.network_members.clone(),
        );
        self.register_networks();
        self.register_events();
    }

    fn register_networks(&self) {
        self.register(
            "wgexit_network_peers",
            "WireGuard peers (containers and laptops) per private network by the age of their last handshake (never: none yet).",
            self.network_peers.clone(),
        );
        self.register(
            "wgexit_network_tunnel_received_bytes",
            "Bytes received from a private network's members on its WireGuard device (added up while this process runs).",
            self.network_received_bytes.clone(),
        );
        self.register(
            "wgexit_network_tunnel_transmitted_bytes",
            "Bytes sent to a private network's members on its WireGuard device.",
            self.network_transmitted_bytes.clone(),
        );
        self.register(
            "wgexit_network_dns_queries",
            "Queries to a private network's resolver by outcome: answered (from its names), refused, forwarded (upstream).",
            self.dns_queries.clone(),
        );
        self.register(
            "wgexit_firewall_dropped_packets",
            "Packets the firewall refused (an egress's policy) or dropped (at a network's tunnel), by kind and name.",
            self.firewall_drops.clone(),
        );
    }

    /// The counters `network`'s resolver counts in: `/metrics`' own, shared.
    pub fn dns_counts(&self, network: &str) -> DnsCounts {
        let counter = |outcome: &str| {
            let labels = DnsLabels {
                network: network.to_string(),
                outcome: outcome.to_string(),
            };
            self.dns_queries.get_or_create(&labels).clone()
        };
        DnsCounts {
            answered: counter("answered"),
            refused: counter("refused"),
            forwarded: counter("forwarded"),
        }
    }

    fn register_events(&self) {
        let per_egress = [
            (
                "wgexit_leases_granted",
                "New leases granted.",
                &self.granted,
            ),
            (
                "wgexit_leases_renewed",
                "Lease requests answered with the lease the key already held.",
                &self.renewed,
            ),
            (
                "wgexit_leases_released",
                "Leases released through the API.",
                &self.released,
            ),
            (
                "wgexit_leases_collected",
                "Leases of idle peers collected.",
                &self.collected,
            ),
        ];
        for (name, help, family) in per_egress {
            self.register(name, help, family.clone());
        }
        self.register(
            "wgexit_network_members_collected",
            "A private network's idle containers collected (peers never are).",
            self.network_collected.clone(),
        );
        self.register(
            "wgexit_reconcile_repairs",
            "Repairs made by reconciling a device with the store: device created or reconfigured, peer added or removed.",
            self.repairs.clone(),
        );
        self.register(
            "wgexit_firewall_applies",
            "Times the nftables rules were written (at start, and whenever they are re-applied).",
            self.firewall_applies.clone(),
        );
        self.register(
            "wgexit_leader",
            "1 where this node holds an egress's (or network's) addresses, 0 where another member of its pool does.",
            self.leader.clone(),
        );
        self.register(
            "wgexit_api_requests",
            "API requests by route, method and status.",
            self.requests.clone(),
        );
        self.register(
            "wgexit_api_request_duration_seconds",
            "API request latency by route and method.",
            self.request_duration.clone(),
        );
    }

    /// Adds a family (name without `_total`: counters get it when encoded).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        let mut registry = match self.registry.write() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        registry.register(name, help, metric);
    }

    /// The registry as OpenMetrics text.
    pub fn encode_openmetrics(&self) -> String {
        let registry = match self.registry.read() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    pub fn network(network: &str) -> NetworkLabels {
        NetworkLabels {
            network: network.to_string(),
        }
    }

    /// Sets a network's member counts: `containers` and `peers`.
    pub fn network_members(&self, network: &str, containers: usize, peers: usize) {
        for (kind, n) in [("container", containers), ("peer", peers)] {
            let labels = MemberLabels {
                network: network.to_string(),
                kind: kind.to_string(),
            };
            self.network_members
                .get_or_create(&labels)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn egress(egress: &str) -> EgressLabels {
        EgressLabels {
            egress: egress.to_string(),
        }
    }

    /// Counts what a reconcile pass of `egress` repaired.
    pub fn reconciled(&self, egress: &str, changes: &Changes) {
        let counts = [
            ("device_created", u64::from(changes.created_device)),
            (
                "device_reconfigured",
                u64::from(changes.reconfigured_device),
            ),
            ("peer_added", changes.peers_added as u64),
            ("peer_removed", changes.peers_removed as u64),
        ];
        for (repair, n) in counts {
            let labels = RepairLabels {
                egress: egress.to_string(),
                repair: repair.to_string(),
            };
            // Every kind is present from the first pass, at 0 until it happens.
            self.repairs.get_or_create(&labels).inc_by(n);
        }
    }

    /// Whether this member leads `space` (always, without a pool).
    pub fn set_leader(&self, space: &Space, leads: bool) {
        let labels = LeaderLabels {
            kind: space.kind().to_string(),
            name: space.name().to_string(),
        };
        self.leader.get_or_create(&labels).set(i64::from(leads));
    }

    /// Counts one lease collected in `space` for its peer's silence.
    pub fn count_collected(&self, space: &Space) {
        match space {
            Space::Egress(e) => self.collected.get_or_create(&Metrics::egress(e)).inc(),
            Space::Network(n) => self
                .network_collected
                .get_or_create(&Metrics::network(n))
                .inc(),
        };
    }

    /// Records one API request.
    pub fn api_request(&self, route: &str, method: &str, status: u16, took: Duration) {
        let labels = RequestLabels {
            route: route.to_string(),
            method: method.to_string(),
            status: status.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        let route = RouteLabels {
            route: route.to_string(),
            method: method.to_string(),
        };
        self.request_duration
            .get_or_create(&route)
            .observe(took.as_secs_f64());
    }
}
