//! wgexit's plugin (binary `wgexit`): the CNI plugin and OCI hook ([`cni`]), the netavark
//! plugin ([`netavark`]), the WireGuard peering tool for laptops ([`peer`]), and the command
//! line of them all ([`cli`]). It depends on the shared crate `wgexit` and on none of the
//! daemon's libraries.

pub mod cli;
pub mod cni;
pub mod netavark;
pub mod peer;
