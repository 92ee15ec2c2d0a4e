//! `[[egress]]`: one tenant's static egress, checked alone and against the others.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::policy::{self, Policy};
use super::{ifname, parsed, ConfigError, Invalid, DEFAULT_MTU};
use crate::api::valid_egress_name;
use crate::exit::leases::pool::Pool;
use crate::net::IfName;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    name: String,
    ip: String,
    interface: String,
    pool: String,
    wg_interface: String,
    listen_port: u16,
    endpoint: String,
    token_file: PathBuf,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    policy: Option<policy::RawPolicy>,
    /// In a pool: where the endpoint's address floats (see [`super::cluster`]).
    #[serde(default)]
    endpoint_interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    pub name: String,
    pub ip: Ipv4Addr,
    pub interface: IfName,
    pub pool: Ipv4Net,
    pub wg_interface: IfName,
    pub listen_port: u16,
    pub endpoint: SocketAddr,
    pub token_file: PathBuf,
    pub mtu: u32,
    /// What its containers may reach.
    pub policy: Policy,
    /// In a pool: the interface the leader adds the endpoint's address to.
    pub endpoint_interface: Option<IfName>,
}

impl EgressConfig {
    /// The exit node's own address in the pool.
    pub fn overlay_ip(&self) -> Ipv4Addr {
        Pool::gateway(self.pool)
    }
}

/// Every `[[egress]]`, each checked alone and then against the ones before it.
pub(super) fn egresses(
    raw: Vec<RawEgress>,
    invalid: &Invalid,
) -> Result<Vec<EgressConfig>, ConfigError> {
    let mut out: Vec<EgressConfig> = Vec::new();
    for (i, e) in raw.into_iter().enumerate() {
        let e = egress(i, e, invalid)?;
        check_no_clash(i, &e, &out, invalid)?;
        out.push(e);
    }
    Ok(out)
}

fn egress(i: usize, e: RawEgress, invalid: &Invalid) -> Result<EgressConfig, ConfigError> {
    let key = |k: &str| format!("egress[{i}].{k}");
    if !valid_egress_name(&e.name) {
        return Err(invalid(
            key("name"),
            format!(
                "{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                e.name
            ),
        ));
    }
    let ip = parsed(
        invalid,
        key("ip"),
        &e.ip,
        "an IPv4 address (e.g. \"203.0.113.77\")",
    )?;
    let pool = overlay_pool(invalid, key("pool"), &e.pool)?;
    if e.listen_port == 0 {
        return Err(invalid(key("listen_port"), "must not be 0".into()));
    }
    let endpoint = parsed(
        invalid,
        key("endpoint"),
        &e.endpoint,
        "an address:port (e.g. \"198.51.100.2:51820\")",
    )?;
    let mtu = e.mtu.unwrap_or(DEFAULT_MTU);
    if !(1280..=9000).contains(&mtu) {
        return Err(invalid(key("mtu"), format!("{mtu} is outside 1280..=9000")));
    }
    let endpoint_interface = match &e.endpoint_interface {
        Some(name) => Some(ifname(invalid, key("endpoint_interface"), name)?),
        None => None,
    };
    Ok(EgressConfig {
        endpoint_interface,
        interface: ifname(invalid, key("interface"), &e.interface)?,
        wg_interface: ifname(invalid, key("wg_interface"), &e.wg_interface)?,
        name: e.name,
        ip,
        pool,
        listen_port: e.listen_port,
        endpoint,
        token_file: e.token_file,
        mtu,
        policy: policy::parse(e.policy, &key("policy"), invalid)?,
    })
}

fn overlay_pool(invalid: &Invalid, key: String, value: &str) -> Result<Ipv4Net, ConfigError> {
    let pool: Ipv4Net = parsed(
        invalid,
        key.clone(),
        value,
        "an IPv4 network (e.g. \"100.96.0.0/20\")",
    )?;
    if pool != pool.trunc() {
        return Err(invalid(
            key,
            format!("{pool} has host bits set; did you mean {}?", pool.trunc()),
        ));
    }
    if pool.prefix_len() > 29 {
        return Err(invalid(
            key,
            format!("{pool} is too small: use a /29 or larger"),
        ));
    }
    Ok(pool)
}

/// Names, WireGuard interfaces, ports and pools are each one egress's own.
fn check_no_clash(
    i: usize,
    e: &EgressConfig,
    before: &[EgressConfig],
    invalid: &Invalid,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("egress[{i}].{k}");
    for (j, other) in before.iter().enumerate() {
        let clash = |what: &str| {
            invalid(
                key(what),
                format!("is the same as egress[{j}].{what} ({})", other.name),
            )
        };
        if other.name == e.name {
            return Err(clash("name"));
        }
        if other.wg_interface == e.wg_interface {
            return Err(clash("wg_interface"));
        }
        if other.listen_port == e.listen_port {
            return Err(clash("listen_port"));
        }
        if other.pool.contains(&e.pool) || e.pool.contains(&other.pool) {
            return Err(invalid(
                key("pool"),
                format!("{} overlaps egress[{j}].pool {}", e.pool, other.pool),
            ));
        }
    }
    Ok(())
}
