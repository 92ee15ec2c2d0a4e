//! `who` across a pool: each member records only what it forwards, so a question is put
//! to the others through the pool's etcd, which every member already trusts and reaches.
//!
//! The asker writes `attribution/ask/<id>` (the request) under the pool's prefix; every
//! other member watches that prefix, answers from its own records under
//! `attribution/answer/<id>/<node>`, and the asker reads the answers until every member
//! listed under `members/` has answered or [`ANSWER_WITHIN`] has passed (the silent ones
//! are named in the answer). Questions and answers are bound to an etcd lease of
//! [`RECORD_TTL`], so etcd forgets them by itself; no flow record is kept in etcd.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};

use super::query::{Attribution, WhoRequest};
use super::{AttributionError, FlowRecord};
use crate::cluster::etcd::Etcd;
use crate::config::ClusterConfig;

/// How long the asker waits for the other members.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// How long etcd keeps a question or an answer, seconds.
pub const RECORD_TTL: i64 = 30;
/// How often the asker reads the answers while waiting.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Question {
    from: String,
    request: WhoRequest,
}

/// This member's link to the others, for `who`.
pub struct PoolAsker {
    etcd: Etcd,
    node: String,
}

fn pool_err(e: impl std::fmt::Display) -> AttributionError {
    AttributionError::Pool(e.to_string())
}

impl PoolAsker {
    pub fn connect(cluster: &ClusterConfig) -> Result<PoolAsker, AttributionError> {
        Ok(PoolAsker {
            etcd: Etcd::connect(cluster).map_err(pool_err)?,
            node: cluster.node.clone(),
        })
    }

    fn ask_prefix(&self) -> String {
        self.etcd.key("attribution/ask/")
    }

    fn answer_prefix(&self, id: &str) -> String {
        self.etcd.key(&format!("attribution/answer/{id}/"))
    }

    /// Writes `value` at `key`, bound to a new etcd lease of [`RECORD_TTL`].
    /// Signed with the pool's secret, as every record members write is.
    async fn put_expiring(&self, key: String, value: Vec<u8>) -> Result<(), AttributionError> {
        let value = self.etcd.signed(&key, value);
        self.etcd
            .run("writing an attribution record", move |mut c| async move {
                let lease = c.lease_grant(RECORD_TTL, None).await?.id();
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
                    .map(|_| ())
            })
            .await
            .map_err(pool_err)
    }

    /// The signed records under `prefix`: keys relative to it, values checked (a record no
    /// member signed is logged and left out).
    async fn read(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, AttributionError> {
        self.etcd
            .verified_range("reading attribution records", prefix)
            .await
            .map_err(pool_err)
    }

    /// The other members' flows for `req`, and the members that did not answer in time.
    pub async fn ask(
        &self,
        req: WhoRequest,
    ) -> Result<(Vec<FlowRecord>, Vec<String>), AttributionError> {
        let mut waiting: Vec<String> = self
            .read(&self.etcd.members_prefix())
            .await?
            .into_iter()
            .map(|(node, _)| node)
            .filter(|n| *n != self.node)
            .collect();
        if waiting.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut id = [0u8; 12];
        getrandom::fill(&mut id).map_err(pool_err)?;
        let id = hex::encode(id);
        let question = Question {
            from: self.node.clone(),
            request: req,
        };
        let body = serde_json::to_vec(&question).map_err(pool_err)?;
        self.put_expiring(format!("{}{id}", self.ask_prefix()), body)
            .await?;
        let prefix = self.answer_prefix(&id);
        let mut answers: HashMap<String, Vec<FlowRecord>> = HashMap::new();
        let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
        while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            for (node, v) in self.read(&prefix).await? {
                match serde_json::from_slice::<Vec<FlowRecord>>(&v) {
                    Ok(flows) => {
                        answers.insert(node, flows);
                    }
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "unreadable attribution answer; ignored")
                    }
                }
            }
            waiting.retain(|n| !answers.contains_key(n));
        }
        Ok((answers.into_values().flatten().collect(), waiting))
    }
}

/// Answers the other members' questions from this member's records, for ever.
pub async fn answer_loop(attribution: Arc<Attribution>) {
    loop {
        if let Err(e) = answer_questions(&attribution).await {
            tracing::warn!(error = %e, "attribution questions from the pool: watch broke; watching again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn answer_questions(attribution: &Arc<Attribution>) -> Result<(), AttributionError> {
    let Some(pool) = &attribution.pool else {
        return Ok(());
    };
    let prefix = pool.ask_prefix();
    let key = prefix.clone();
    let mut stream = pool
        .etcd
        .run("watching attribution questions", |mut c| async move {
            c.watch(key, Some(WatchOptions::new().with_prefix())).await
        })
        .await
        .map_err(pool_err)?;
    while let Some(resp) = stream.message().await.map_err(pool_err)? {
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            if event.event_type() != EventType::Put {
                continue;
            }
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(id) = key.strip_prefix(&prefix).map(str::to_string) else {
                continue;
            };
            let Some(value) = pool.etcd.verified(kv.key(), kv.value()) else {
                continue;
            };
            let Ok(q) = serde_json::from_slice::<Question>(value) else {
                tracing::warn!(%key, "unreadable attribution question; ignored");
                continue;
            };
            if q.from == pool.node {
                continue;
            }
            let attribution = attribution.clone();
            tokio::spawn(async move { answer(&attribution, &id, q.request).await });
        }
    }
    Ok(())
}

async fn answer(attribution: &Attribution, id: &str, req: WhoRequest) {
    let Some(pool) = &attribution.pool else {
        return;
    };
    let at = req.at.unwrap_or_else(super::time::now);
    let flows = match attribution.local(req, at).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot answer an attribution question");
            return;
        }
    };
    let key = format!("{}{}", pool.answer_prefix(id), pool.node);
    match serde_json::to_vec(&flows) {
        Ok(body) => {
            if let Err(e) = pool.put_expiring(key, body).await {
                tracing::warn!(error = %e, "cannot answer an attribution question");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot encode an attribution answer"),
    }
}
