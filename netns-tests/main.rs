//! End-to-end tests in network namespaces: the binaries driven exactly as a runtime and an
//! operator drive them. Needs root. See `world.rs` for the topology.

mod world;

mod backends;
mod collect;
mod containerd;
mod cycles;
mod daemon;
mod egress;
mod failures;
mod gvisor;
mod logs;
mod ops;
mod restart;
mod runtimes;
mod security;
mod spec;
