//! The exit-node daemon, `wgexitd`.

pub mod nat;
