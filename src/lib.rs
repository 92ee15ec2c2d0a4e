//! wgexit's shared crate: what the plugin (`wgexit`) and the daemon (`wgexitd`) both speak.
//!
//! The wire types of the control API ([`api`]) and its HTTPS client ([`client`]), WireGuard
//! keys ([`keys`]), the kernel's links, namespaces and rules ([`net`]), and the WireGuard
//! backends ([`wg`]). The plugin lives in `crates/plugin` (package `wgexit-plugin`), the
//! daemon in `crates/daemon` (package `wgexitd`); neither imports the other.

pub mod api;
pub mod client;
pub mod crypto;
pub mod fsutil;
pub mod keys;
pub mod net;
pub mod wg;
