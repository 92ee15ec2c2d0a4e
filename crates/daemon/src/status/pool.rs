//! The pool's part of `wgexitd status` (with `[cluster]`): its members, who leads each
//! egress and how many leases each holds, read from etcd by the command itself (so it
//! answers the same on every member, and also while this member's daemon is down).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cluster::status::{read_config, ClusterStatus};
use crate::config::ClusterConfig;

/// What `wgexitd status --json` says under `pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolReport {
    /// This member's node name.
    pub node: String,
    #[serde(flatten)]
    pub status: Option<ClusterStatus>,
    /// Why etcd could not be read, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reads the pool's status from etcd; a failure is reported, not returned.
pub async fn fetch(cluster: &ClusterConfig, state_dir: &Path) -> PoolReport {
    let (status, error) = match read_config(cluster, state_dir).await {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e.to_string())),
    };
    PoolReport {
        node: cluster.node.clone(),
        status,
        error,
    }
}

/// The pool's lines, after the egresses'.
pub fn render(p: &PoolReport) -> String {
    let mut out = String::new();
    let Some(s) = &p.status else {
        let _ = writeln!(
            out,
            "pool (this member: {})\n  NOT READABLE: {}",
            p.node,
            p.error.as_deref().unwrap_or("unknown error")
        );
        return out;
    };
    let _ = writeln!(out, "pool {} (this member: {})", s.cluster, p.node);
    if let Some(problem) = &s.identity_problem {
        let _ = writeln!(out, "  IDENTITY LOST: {problem}");
    }
    let members: Vec<String> = s
        .members
        .iter()
        .map(|m| format!("{} (API {})", m.node, m.api))
        .collect();
    let members = if members.is_empty() {
        "none holds a live etcd lease".to_string()
    } else {
        members.join(", ")
    };
    let _ = writeln!(out, "  members     {members}");
    for (group, node) in &s.leaders {
        let _ = writeln!(out, "  leader      {group}: {node}");
    }
    for (egress, n) in &s.leases {
        let _ = writeln!(out, "  leases      {egress}: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::MemberRecord;

    #[test]
    fn renders_members_leaders_and_leases() {
        let status = ClusterStatus {
            cluster: "eu-1".into(),
            members: vec![
                MemberRecord {
                    node: "a".into(),
                    api: "198.51.100.11:7443".into(),
                },
                MemberRecord {
                    node: "b".into(),
                    api: "198.51.100.12:7443".into(),
                },
            ],
            leaders: [("acme".to_string(), "b".to_string())].into(),
            leases: [("acme".to_string(), 3)].into(),
            identity_problem: None,
        };
        let p = PoolReport {
            node: "a".into(),
            status: Some(status),
            error: None,
        };
        assert_eq!(
            render(&p),
            "pool eu-1 (this member: a)\n  members     a (API 198.51.100.11:7443), b (API 198.51.100.12:7443)\n  leader      acme: b\n  leases      acme: 3\n"
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["leaders"]["acme"], "b");
        assert_eq!(json["members"][1]["node"], "b");
        assert_eq!(json["node"], "a");
        let down = PoolReport {
            node: "a".into(),
            status: None,
            error: Some("etcd: no answer".into()),
        };
        assert!(render(&down).contains("NOT READABLE: etcd: no answer"));
        assert_eq!(
            serde_json::to_value(&down).unwrap()["error"],
            "etcd: no answer"
        );
    }
}
