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
    }
}
