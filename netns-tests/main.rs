//! End-to-end tests in network namespaces: the binaries driven exactly as a runtime and an
//! operator drive them. Needs root. See `world.rs` for the topology.

mod open_flows;
mod pool_world;
mod world;

mod api_limits;
mod attachments;
mod attribution;
mod backends;
mod collect;
mod config_change;
mod containerd;
mod cycles;
mod daemon;
mod defences;
mod dual_stack;
mod egress;
mod egress_ips;
mod failures;
mod gvisor;
mod isolation;
mod logs;
mod netavark;
mod networks;
mod ops;
mod pool;
mod pool_flows;
mod pool_ipv6;
mod pool_networks;
mod pool_trust;
mod readiness;
mod recovery;
mod restart;
mod runtimes;
mod security;
mod spares;
mod spec;
mod tokens;
