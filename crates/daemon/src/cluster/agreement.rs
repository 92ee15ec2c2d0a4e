//! What a pool's members must agree on before one of them may lead: every egress's name,
//! egress IPs, overlay pools, endpoint and listen port, and every network's name, prefix,
//! endpoint and listen port ([`SharedSettings`]). Local things
//! (interface names, `[api]`, `state_dir`, the order of tables) may differ.
//!
//! Each member publishes its settings at `settings/<node>`, signed and bound to its etcd
//! lease. The pool's settings are those of its longest-running member (the oldest
//! `settings/` record): a member whose settings differ refuses to lead and says which key
//! differs. A change rolled out one member at a time therefore never leaves two members
//! leading by different rules: the members restarted with the new config wait until the
//! last one with the old config is restarted too.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::GetOptions;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::etcd::Etcd;
use super::led::Led;
use crate::leases::store::StoreError;
use crate::space::Space;

/// One space's settings that every member must share (a network's `pool` is its prefix; it
/// has no egress IPs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceShared {
    pub ips: Vec<IpAddr>,
    pub pool: String,
    pub pool6: Option<String>,
    pub endpoint: SocketAddr,
    pub listen_port: u16,
}

/// A space's store name (see [`Space::store_key`]: an egress's name as before) → its shared
/// settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedSettings(pub BTreeMap<String, SpaceShared>);

impl SharedSettings {
    pub fn of(spaces: &[Led]) -> SharedSettings {
        SharedSettings(
            spaces
                .iter()
                .map(|led| {
                    let mut ips: Vec<IpAddr> =
                        led.egress_ips().into_iter().map(|(_, ip)| ip).collect();
                    ips.sort();
                    let (pool, pool6) = match led {
                        Led::Egress(e) => (
                            e.pool.to_string(),
                            e.v6.as_ref().map(|v6| v6.pool.to_string()),
                        ),
                        Led::Network(n) => (n.prefix.to_string(), None),
                    };
                    let shared = SpaceShared {
                        ips,
                        pool,
                        pool6,
                        endpoint: led.endpoint(),
                        listen_port: led.listen_port(),
                    };
                    (led.space().store_key(), shared)
                })
                .collect(),
        )
    }

    /// The first setting in which `self` (here) differs from `pool` (the pool's, from
    /// member `node`), as a sentence naming the key.
    pub fn difference(&self, pool: &SharedSettings, node: &str) -> Option<String> {
        let names = self.0.keys().chain(pool.0.keys());
        for name in names {
            let space = Space::from_store_key(name);
            let (here, there) = match (self.0.get(name), pool.0.get(name)) {
                (Some(h), Some(t)) => (h, t),
                (Some(_), None) => {
                    return Some(format!(
                        "{space} is configured here but not on member {node}"
                    ))
                }
                (None, _) => {
                    return Some(format!(
                        "{space} is configured on member {node} but not here"
                    ))
                }
            };
            let pool_key = match space {
                Space::Egress(_) => "pool",
                Space::Network(_) => "prefix",
            };
            let fields = [
                (
                    "ip/ips/ip6",
                    format!("{:?}", here.ips),
                    format!("{:?}", there.ips),
                ),
                (pool_key, here.pool.clone(), there.pool.clone()),
                (
                    "pool6",
                    format!("{:?}", here.pool6),
                    format!("{:?}", there.pool6),
                ),
                (
                    "endpoint",
                    here.endpoint.to_string(),
                    there.endpoint.to_string(),
                ),
                (
                    "listen_port",
                    here.listen_port.to_string(),
                    there.listen_port.to_string(),
                ),
            ];
            if let Some((key, h, t)) = fields.into_iter().find(|(_, h, t)| h != t) {
                return Some(format!(
                    "{space} {key} is {h} here but {t} on member {node}"
                ));
            }
        }
        None
    }
}

/// Whether this member's settings are the pool's; `Err` says which key differs; `None`
/// when this member's own record is not there (not published yet, or deleted with the
/// rest of the store): nothing can be told.
pub async fn check(
    etcd: &Etcd,
    node: &str,
    mine: &SharedSettings,
) -> Result<Option<Result<(), String>>, StoreError> {
    let prefix = etcd.settings_prefix();
    let p = prefix.clone();
    let resp = etcd
        .run("reading the members' settings", |mut c| async move {
            c.get(p, Some(GetOptions::new().with_prefix())).await
        })
        .await?;
    let records: Vec<(i64, String, SharedSettings)> = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let value = etcd.verified(kv.key(), kv.value())?;
            let other = kv.key_str().ok()?.strip_prefix(&prefix)?.to_string();
            let settings: SharedSettings = serde_json::from_slice(value).ok()?;
            Some((kv.create_revision(), other, settings))
        })
        .collect();
    if !records.iter().any(|(_, other, _)| other == node) {
        return Ok(None);
    }
    let oldest = records.into_iter().min_by_key(|(revision, _, _)| *revision);
    Ok(Some(match oldest {
        Some((_, other, pool)) if other != node => match mine.difference(&pool, &other) {
            Some(d) => Err(format!(
                "{d} (the pool's settings are its longest-running member's); this member does not lead until they agree"
            )),
            None => Ok(()),
        },
        _ => Ok(()),
    }))
}

/// How often the agreement is checked while this member agrees, and while it does not.
const AGREEING_EVERY: Duration = Duration::from_secs(1);
const DISAGREEING_EVERY: Duration = Duration::from_millis(200);

/// Checks, for as long as the daemon runs, whether this member's settings are the pool's,
/// and publishes the answer on `tx` (false until the first check agrees). A disagreement
/// is logged when it changes. An etcd that cannot be read, or without this member's
/// record, keeps the last answer (nobody can change the pool's settings without it).
pub async fn run(etcd: Arc<Etcd>, node: String, mine: SharedSettings, tx: watch::Sender<bool>) {
    let mut said: Option<String> = None;
    loop {
        match check(&etcd, &node, &mine).await {
            Ok(None) => {}
            Ok(Some(Ok(()))) => {
                if said.take().is_some() {
                    tracing::info!("this member's shared settings agree with the pool's again");
                }
                tx.send_if_modified(|v| !std::mem::replace(v, true));
            }
            Ok(Some(Err(why))) => {
                if said.as_ref() != Some(&why) {
                    tracing::error!(reason = %why, "this member's shared settings differ from the pool's: it refuses to lead");
                    said = Some(why);
                }
                tx.send_if_modified(|v| std::mem::replace(v, false));
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the members' settings"),
        }
        let every = if *tx.borrow() {
            AGREEING_EVERY
        } else {
            DISAGREEING_EVERY
        };
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::test_etcd::TestEtcd;
    use crate::config::network::tests::network;
    use crate::config::tests::egress;
    use etcd_client::PutOptions;

    #[test]
    fn the_differing_key_is_named() {
        let a = egress("acme", "100.96.0.0/24");
        let mut b = a.clone();
        b.endpoint = "198.51.100.9:51820".parse().unwrap();
        let here = SharedSettings::of(&[Led::Egress(a.clone())]);
        let pool = SharedSettings::of(&[Led::Egress(b)]);
        let d = here.difference(&pool, "m1").unwrap();
        assert!(
            d.contains("egress acme endpoint") && d.contains("m1"),
            "{d}"
        );
        assert_eq!(here.difference(&here.clone(), "m1"), None);
        let beta = Led::Egress(egress("beta", "100.97.0.0/24"));
        let other = SharedSettings::of(&[Led::Egress(a.clone()), beta]);
        let d = here.difference(&other, "m1").unwrap();
        assert!(d.contains("egress beta is configured on member m1"), "{d}");
        // A network is told apart from an egress of the same name, by its prefix.
        let net = |prefix: &str| Led::Network(network("acme", prefix, "wgn-acme"));
        let with = |n: Led| SharedSettings::of(&[Led::Egress(a.clone()), n]);
        let d = with(net("fdaa:0:1::/48"))
            .difference(&with(net("fdaa:0:2::/48")), "m1")
            .unwrap();
        assert!(
            d.contains("network acme prefix is fdaa:0:1::/48 here"),
            "{d}"
        );
    }

    #[test]
    fn the_longest_running_members_settings_are_the_pools() {
        let Some(test) = TestEtcd::start() else {
            return;
        };
        let etcd = Etcd::connect(&test.cluster("agree", "a")).unwrap();
        let a = SharedSettings::of(&[Led::Egress(egress("acme", "100.96.0.0/24"))]);
        let b = SharedSettings::of(&[Led::Egress(egress("acme", "100.96.1.0/24"))]);
        let publish = |node: &str, s: &SharedSettings| {
            let key = etcd.settings_key(node);
            let value = etcd.signed(&key, serde_json::to_vec(s).unwrap());
            etcd.block("publishing", |mut c| async move {
                c.put(key, value, None::<PutOptions>).await
            })
            .unwrap();
        };
        let check = |node: &str, s: &SharedSettings| {
            futures::executor::block_on(check(&etcd, node, s)).unwrap()
        };
        assert_eq!(check("a", &a), None, "nothing published yet");
        // A record no member signed does not count (nor make itself the oldest).
        let forged = etcd.settings_key("0");
        let forged_value = serde_json::to_vec(&b).unwrap();
        etcd.block("forging", |mut c| async move {
            c.put(forged, forged_value, None).await
        })
        .unwrap();
        publish("a", &a);
        publish("b", &b);
        assert_eq!(check("a", &a), Some(Ok(())));
        let why = check("b", &b).unwrap().unwrap_err();
        assert!(
            why.contains("egress acme pool is 100.96.1.0/24 here but 100.96.0.0/24 on member a"),
            "{why}"
        );
        publish("c", &a);
        assert_eq!(check("c", &a), Some(Ok(())));
    }
}
