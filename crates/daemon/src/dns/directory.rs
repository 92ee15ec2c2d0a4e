//! What a network's resolver knows: its live members, rebuilt from the leases after every
//! lease, release and collection, and swapped in whole so a query never waits for a lease.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, RwLock};

use wgexit::api::{Lease, MemberKind};

/// The length of a container's id as DNS shows it (`<id>.vm.<app>.internal`).
pub const ID_LEN: usize = 12;

/// One member as DNS names it. App, region, id and peer name are lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub address: Ipv6Addr,
    pub kind: MemberKind,
    pub app: String,
    pub region: String,
    /// The first [`ID_LEN`] characters of the container's id; empty for peers.
    pub id: String,
    /// The peer's name; empty for containers.
    pub name: String,
}

impl Entry {
    /// The member a lease stands for; `None` for an egress lease or a non-IPv6 address.
    pub fn of(lease: &Lease) -> Option<Entry> {
        let member = lease.member.as_ref()?;
        let IpAddr::V6(address) = lease.address else {
            return None;
        };
        Some(Entry {
            address,
            kind: member.kind,
            app: member.app.to_ascii_lowercase(),
            region: member.region.to_ascii_lowercase(),
            id: lease
                .attachment
                .container_id
                .chars()
                .take(ID_LEN)
                .collect::<String>()
                .to_ascii_lowercase(),
            name: member.name.to_ascii_lowercase(),
        })
    }
}

/// A network's members, ordered by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    pub entries: Vec<Entry>,
}

impl Directory {
    pub fn from_leases<'a>(leases: impl Iterator<Item = &'a Lease>) -> Directory {
        let mut entries: Vec<Entry> = leases.filter_map(Entry::of).collect();
        entries.sort_by_key(|e| e.address);
        Directory { entries }
    }

    /// The member at `address`, if it is one.
    pub fn member(&self, address: &Ipv6Addr) -> Option<&Entry> {
        self.entries
            .binary_search_by_key(address, |e| e.address)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The containers of `app`.
    pub fn app<'a>(&'a self, app: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.kind == MemberKind::Container && e.app == app)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.kind == MemberKind::Peer)
    }

    pub fn containers(&self) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(|e| e.kind == MemberKind::Container)
    }
}

/// The directory a resolver reads and the lease side replaces; cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Published(Arc<RwLock<Arc<Directory>>>);

impl Published {
    pub fn publish(&self, directory: Directory) {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(directory);
    }

    pub fn current(&self) -> Arc<Directory> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
