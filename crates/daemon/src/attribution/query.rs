//! The questions the records answer: `who` held an egress address and port at a time
//! (here, and in a pool on every member), and the `flows` since a time, for export.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::event::Proto;
use super::pool::PoolAsker;
use super::store::FlowStore;
use super::time::{now, rfc3339};
use super::{AttributionError, FlowRecord};

/// `wgexitd who IP:PORT [--proto] [--at]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoRequest {
    pub ip: IpAddr,
    pub port: u16,
    /// TCP and UDP when absent.
    #[serde(default)]
    pub proto: Option<Proto>,
    /// Unix microseconds; now when absent.
    #[serde(default)]
    pub at: Option<u64>,
}

impl WhoRequest {
    fn protos(&self) -> Vec<Proto> {
        match self.proto {
            Some(p) => vec![p],
            None => vec![Proto::Tcp, Proto::Udp],
        }
    }
}

/// What `who` answers: every flow that held the address and port then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAnswer {
    pub egress_ip: IpAddr,
    pub egress_port: u16,
    /// The time asked about, RFC 3339.
    pub at: String,
    pub flows: Vec<FlowRecord>,
    /// Pool members that did not answer in time (their flows are missing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unanswered: Vec<String>,
}

/// The recorder's store as the control socket asks it, and the pool when there is one.
pub struct Attribution {
    pub store: Arc<FlowStore>,
    /// This member's name in a pool.
    pub node: Option<String>,
    pub pool: Option<PoolAsker>,
}

impl Attribution {
    /// This node's own flows for `req` (`at` filled in by the caller).
    pub async fn local(
        &self,
        req: WhoRequest,
        at: u64,
    ) -> Result<Vec<FlowRecord>, AttributionError> {
        let store = self.store.clone();
        let mut flows =
            tokio::task::spawn_blocking(move || store.who(req.ip, req.port, &req.protos(), at))
                .await
                .map_err(|e| AttributionError::Store {
                    path: "attribution".into(),
                    detail: e.to_string(),
                })??;
        for f in &mut flows {
            f.node = self.node.clone();
        }
        Ok(flows)
    }

    /// Every flow, here and on the pool's other members, that held `req`'s address.
    pub async fn who(&self, req: WhoRequest) -> Result<WhoAnswer, AttributionError> {
        let at = req.at.unwrap_or_else(now);
        let mut flows = self.local(req, at).await?;
        let mut unanswered = Vec::new();
        if let Some(pool) = &self.pool {
            let (theirs, silent) = pool
                .ask(WhoRequest {
                    at: Some(at),
                    ..req
                })
                .await?;
            flows.extend(theirs);
            unanswered = silent;
        }
        flows.sort_by(|a, b| (&a.first, &a.node).cmp(&(&b.first, &b.node)));
        flows.dedup();
        Ok(WhoAnswer {
            egress_ip: req.ip,
            egress_port: req.port,
            at: rfc3339(at),
            flows,
            unanswered,
        })
    }

    /// Sends every flow that started at or after `since` to `out`, in order.
    pub fn export(&self, since: u64, out: mpsc::Sender<FlowRecord>) {
        let store = self.store.clone();
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || {
            let result = store.since(since, |mut f| {
                f.node = node.clone();
                out.blocking_send(f).is_ok()
            });
            if let Err(e) = result {
                tracing::error!(error = %e, "flow export failed");
            }
        });
    }
}

/// `who`'s answer for people: one line per flow.
pub fn render(answer: &WhoAnswer) -> String {
    let mut out = String::new();
    let (ip, port, at) = (answer.egress_ip, answer.egress_port, &answer.at);
    if answer.flows.is_empty() {
        out.push_str(&format!("{ip} port {port} at {at}: no recorded flow\n"));
    }
    for f in &answer.flows {
        let lease = match &f.lease {
            Some(l) => format!(
                "egress {} container {} host {} owner {} overlay {}",
                l.egress, l.container_id, l.host, l.owner, l.overlay
            ),
            None => "no lease held its overlay source".into(),
        };
        out.push_str(&format!(
            "{ip} {} port {port} at {at}: {lease}; to {} port {}; first {} last {}{}\n",
            f.proto,
            f.destination,
            f.destination_port,
            f.first.as_deref().unwrap_or("unknown"),
            f.last.as_deref().unwrap_or("open"),
            f.node
                .as_ref()
                .map(|n| format!(" (member {n})"))
                .unwrap_or_default(),
        ));
    }
    for m in &answer.unanswered {
        out.push_str(&format!(
            "member {m} did not answer: its flows are missing\n"
        ));
    }
    out
}
