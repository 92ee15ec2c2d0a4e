//! Network namespaces, links, addresses and routes, through rtnetlink; a link's offloads
//! through ethtool.

pub mod ifname;
pub mod link;
pub mod netns;
pub mod offload;
pub mod rule;

pub use ifname::{IfName, InvalidIfName, MAX_IFNAME_LEN};
pub use link::{LinkError, Netlink};
pub use netns::{Netns, NetnsError, NetnsGuard, NetnsId};
pub use rule::ProhibitRule;
