//! wgexit's plugin (binary `wgexit`): the CNI plugin and OCI hook ([`cni`]) and the WireGuard
//! peering tool for laptops ([`peer`]). It depends on the shared crate `wgexit` and on none
//! of the daemon's libraries.

pub mod cni;
pub mod peer;
