//! Pools of exit nodes (`[cluster]`): members share leases ([`lease_store`]), identities and
//! the CA in etcd ([`etcd`], [`shared`]) under the pool's identity ([`epoch`]), each programs every lease on its own devices ([`follow`]), and
//! one leader per egress or network ([`membership`], [`election`], [`pulse`], among members whose shared settings
//! agree: [`agreement`]) holds its addresses
//! ([`floating`], [`announce`], [`endpoint_source`]) and, on taking over, brings the tunnels back at once
//! ([`takeover`]). [`secret`] seals the private keys kept in etcd and signs every record
//! members write. [`member`] puts them together for the daemon; [`status`] tells what the
//! pool is doing.

pub mod agreement;
pub mod announce;
pub mod conntrack_sync;
pub mod election;
pub mod endpoint_source;
pub mod epoch;
pub mod etcd;
pub mod floating;
pub mod follow;
pub mod lease_store;
pub mod led;
pub mod member;
pub mod membership;
pub mod pulse;
pub mod secret;
pub mod shared;
pub mod status;
pub mod takeover;

#[cfg(test)]
pub mod test_etcd;

use crate::api::tls::TlsError;
use crate::dataplane::DataplaneError;
use crate::leases::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pool state in etcd: {0}")]
    Shared(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("floating addresses: {0}")]
    Float(String),
}
