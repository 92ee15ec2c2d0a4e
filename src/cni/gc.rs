//! GC (spec 1.1.0): every attachment of this network recorded in `dataDir` that is not in
//! `cni.dev/valid-attachments` (or the older `cni.dev/attachments`) is detached: link removed,
//! lease released, state forgotten. Leases whose release failed at DEL are retried.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;

use crate::cni::client::Client;
use crate::cni::config::NetConf;
use crate::cni::error::{CniError, Code};
use crate::cni::stale::detach_each;
use crate::cni::state::{AttachmentState, StateDir};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The (container, ifname) pairs the runtime still uses.
pub fn valid_attachments(raw: &Value) -> Result<BTreeSet<(String, String)>, CniError> {
    let list = raw
        .get("cni.dev/valid-attachments")
        .or_else(|| raw.get("cni.dev/attachments"))
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    let list: Vec<ValidAttachment> = serde_json::from_value(list).map_err(|e| {
        CniError::new(
            Code::InvalidConfig,
            format!("config key \"cni.dev/valid-attachments\": {e}"),
        )
    })?;
    Ok(list
        .into_iter()
        .map(|a| (a.container_id, a.ifname))
        .collect())
}

pub async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = valid_attachments(&conf.raw)?;
    let dir = StateDir::open(&conf.data_dir)?;
    let client = conf
        .token()
        .ok()
        .and_then(|t| Client::new(&conf.servers, &conf.ca_file, t).ok());
    let unused = |s: &AttachmentState| {
        s.network == conf.name
            && (s.release_pending || !valid.contains(&(s.container_id.clone(), s.ifname.clone())))
    };
    match detach_each(&dir, conf, client.as_ref(), unused).await {
        (_, Some(e)) => Err(e),
        (_, None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_both_keys() {
        let v = json!({"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]});
        assert!(valid_attachments(&v)
            .unwrap()
            .contains(&("a".into(), "eth0".into())));
        let v = json!({"cni.dev/attachments": [{"containerID": "b", "ifname": "net1"}]});
        assert!(valid_attachments(&v)
            .unwrap()
            .contains(&("b".into(), "net1".into())));
        assert!(valid_attachments(&json!({})).unwrap().is_empty());
        let bad = json!({"cni.dev/valid-attachments": [{"ifname": "eth0"}]});
        assert_eq!(
            valid_attachments(&bad).unwrap_err().code,
            Code::InvalidConfig
        );
    }
}
