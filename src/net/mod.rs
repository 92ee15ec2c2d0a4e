//! Network namespaces, links, addresses and routes, through rtnetlink.

pub mod link;
pub mod netns;
pub mod rule;

pub use link::{LinkError, Netlink};
pub use netns::{Netns, NetnsError, NetnsGuard};
pub use rule::ProhibitRule;
