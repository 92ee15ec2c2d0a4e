//! The private networks' resolvers: one per network, at `<prefix>::3` on its WireGuard
//! interface (UDP and TCP 53), answering only that network's live members.
//!
//! [`directory`] is what the resolver knows (the members, published by the lease side after
//! every change), [`names`] decides the answer to one question (pure), [`forward`] passes
//! other names to the network's upstreams ([`flights`]: one upstream query per distinct
//! question in flight), and [`server`] is the DNS server itself
//! (`hickory-server`: framing, parsing and writing messages are the library's), with
//! [`udp`] its loop over the UDP socket; [`counts`] is what it did, for `wgexitd status`
//! and `/metrics`.

pub mod counts;
pub mod directory;
pub mod flights;
pub mod forward;
pub mod names;
pub mod server;
pub mod udp;

/// Every `.internal` answer's TTL: a removed member's name is gone within it.
pub const TTL: u32 = 5;
