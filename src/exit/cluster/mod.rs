//! Pools of exit nodes (`[cluster]`): members share leases, identities and the CA in etcd
//! ([`etcd`], [`shared`]), each programs every lease on its own devices ([`follow`]), and
//! one leader per egress ([`election`]) holds its addresses ([`floating`], [`announce`])
//! and, on taking over, brings the tunnels back at once ([`takeover`]).

pub mod etcd;

#[cfg(test)]
pub mod test_etcd;
