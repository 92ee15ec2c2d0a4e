//! Network namespaces, links, addresses and routes, through rtnetlink.

pub mod link;
pub mod netns;

pub use link::{LinkError, Netlink};
pub use netns::{Netns, NetnsError, NetnsGuard, NetnsId};
