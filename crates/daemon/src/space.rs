//! A space: a place leases are made in, an egress or a private network. Every layer names
//! the space it speaks of with this one type (errors, logs, the dataplane), so an egress and
//! a network that share a name are never confused.

use std::fmt;

/// An egress or a private network, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    Egress(String),
    Network(String),
}

impl Space {
    /// The name the config gives it.
    pub fn name(&self) -> &str {
        match self {
            Space::Egress(n) | Space::Network(n) => n,
        }
    }

    /// "egress" or "network".
    pub fn kind(&self) -> &'static str {
        match self {
            Space::Egress(_) => "egress",
            Space::Network(_) => "network",
        }
    }
}

/// How a network's leases are named in the store, beside the egresses': a prefix no egress
/// name can have (egress names have no ':').
const NETWORK_PREFIX: &str = "network:";

impl Space {
    /// The name its leases carry in the store (`Lease::egress`): the egress's name, or the
    /// network's after [`NETWORK_PREFIX`]; what earlier versions wrote is read unchanged.
    pub fn store_key(&self) -> String {
        match self {
            Space::Egress(n) => n.clone(),
            Space::Network(n) => format!("{NETWORK_PREFIX}{n}"),
        }
    }

    /// The space a stored lease's `egress` names.
    pub fn from_store_key(key: &str) -> Space {
        match key.strip_prefix(NETWORK_PREFIX) {
            Some(n) => Space::Network(n.to_string()),
            None => Space::Egress(key.to_string()),
        }
    }
}

/// "egress acme", "network acme": how messages name a space.
impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_space_is_named_with_its_kind() {
        assert_eq!(Space::Egress("acme".into()).to_string(), "egress acme");
        let net = Space::Network("acme".into());
        assert_eq!((net.kind(), net.name()), ("network", "acme"));
        assert_ne!(net, Space::Egress("acme".into()));
        assert_eq!(net.store_key(), "network:acme");
        assert_eq!(Space::from_store_key("network:acme"), net);
        assert_eq!(Space::from_store_key("acme"), Space::Egress("acme".into()));
    }
}
