//! GC (spec 1.1.0): every attachment of this network recorded in `dataDir` that is not in
//! `cni.dev/valid-attachments` (or the older `cni.dev/attachments`) is detached: link removed,
//! lease released, state forgotten. Only an explicit list, possibly empty, is acted on: a GC
//! without either key detaches nothing (and says so on stderr). Leases whose release failed
//! at DEL are retried either way: their attachments are already gone.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;

use crate::cni::config::NetConf;
use crate::cni::error::{CniError, Code};
use crate::cni::spares::Spares;
use crate::cni::stale::detach_each;
use crate::cni::state::{AttachmentState, StateDir};
use wgexit::client::Client;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The (container, ifname) pairs the runtime still uses; `None` when the config lists none
/// (neither key is there), which is not the same as an empty list.
pub fn valid_attachments(raw: &Value) -> Result<Option<BTreeSet<(String, String)>>, CniError> {
    let Some(list) = raw
        .get("cni.dev/valid-attachments")
        .or_else(|| raw.get("cni.dev/attachments"))
    else {
        return Ok(None);
    };
    let list: Vec<ValidAttachment> = serde_json::from_value(list.clone()).map_err(|e| {
        CniError::new(
            Code::InvalidConfig,
            format!("config key \"cni.dev/valid-attachments\": {e}"),
        )
    })?;
    Ok(Some(
        list.into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect(),
    ))
}

/// Whether GC undoes `state`: an attachment of `network` whose lease release is pending, or
/// one missing from the runtime's list when there is a list.
pub fn collected(
    state: &AttachmentState,
    network: &str,
    valid: Option<&BTreeSet<(String, String)>>,
) -> bool {
    let unlisted =
        || valid.is_some_and(|v| !v.contains(&(state.container_id.clone(), state.ifname.clone())));
    state.network == network && (state.release_pending || unlisted())
}

pub async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = valid_attachments(&conf.raw)?;
    if valid.is_none() {
        eprintln!(
            "wgexit: GC without \"cni.dev/valid-attachments\" (or \"cni.dev/attachments\") in the config: no attachment detached; only lease releases that failed at DEL are retried"
        );
    }
    let dir = StateDir::open(&conf.data_dir)?;
    let client = conf
        .token()
        .ok()
        .and_then(|t| Client::new(&conf.servers, &conf.ca_file, t).ok());
    // Spares belong to no container: kept, but for those whose wireguard-go is gone.
    let userspace = wgexit::wg::userspace::UserspaceBackend::open().ok();
    for name in Spares::of(&conf.data_dir)
        .remove_dead(userspace.as_ref())
        .await
    {
        eprintln!("wgexit: removed spare link {name}: its wireguard-go is gone");
    }
    let pick = |s: &AttachmentState| collected(s, &conf.name, valid.as_ref());
    match detach_each(&dir, conf, client.as_ref(), pick).await {
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
            .unwrap()
            .contains(&("a".into(), "eth0".into())));
        let v = json!({"cni.dev/attachments": [{"containerID": "b", "ifname": "net1"}]});
        assert!(valid_attachments(&v)
            .unwrap()
            .unwrap()
            .contains(&("b".into(), "net1".into())));
        let bad = json!({"cni.dev/valid-attachments": [{"ifname": "eth0"}]});
        assert_eq!(
            valid_attachments(&bad).unwrap_err().code,
            Code::InvalidConfig
        );
    }

    #[test]
    fn no_list_is_not_an_empty_list() {
        assert_eq!(valid_attachments(&json!({})).unwrap(), None);
        let empty = json!({"cni.dev/valid-attachments": []});
        assert_eq!(valid_attachments(&empty).unwrap(), Some(BTreeSet::new()));
    }

    fn state(container_id: &str, network: &str, release_pending: bool) -> AttachmentState {
        let (mut state, _) = crate::cni::state::sample(container_id, "eth0", None);
        state.network = network.into();
        state.host_ifname = "wgx0".into();
        state.in_netns = true;
        state.release_pending = release_pending;
        state
    }

    #[test]
    fn only_a_list_collects_and_only_this_networks_attachments() {
        let live = state("a", "egress", false);
        let pending = state("b", "egress", true);
        let elsewhere = state("c", "other", false);
        let listed: BTreeSet<_> = [("a".to_string(), "eth0".to_string())].into();
        let empty = BTreeSet::new();
        // No list: nothing live is collected; a pending release is retried.
        assert!(!collected(&live, "egress", None));
        assert!(collected(&pending, "egress", None));
        // A list: what it names stays, the rest of this network goes.
        assert!(!collected(&live, "egress", Some(&listed)));
        assert!(collected(&live, "egress", Some(&empty)));
        assert!(collected(&pending, "egress", Some(&listed)));
        assert!(!collected(&elsewhere, "egress", Some(&empty)));
    }
}
