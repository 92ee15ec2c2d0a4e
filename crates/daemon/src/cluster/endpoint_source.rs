//! While a member leads a space, its WireGuard packets leave from the floating endpoint
//! address, not from the member's own address on the segment.
//!
//! A WireGuard device listens on every address; a packet it starts (the handshakes of a
//! takeover, its replies before it has heard from a peer) gets the source the kernel's route
//! picks: the member's own address. Containers would then roam to that address and stay
//! there. So the leader holds, besides the addresses, one small table of its own,
//! `inet wgexitd-float-<group>`, whose `output` chain (type route, priority raw: before
//! connection tracking, and routed again after the change) rewrites the source of UDP
//! packets from each space's `listen_port` to the endpoint's address. The rewrite is
//! stateless: no connection-tracking entry can clash with one the containers' own packets
//! made, and packets already leaving from the endpoint are left alone. The table is
//! written after the addresses are added and deleted before they are given up.

use std::net::IpAddr;
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::election::Group;
use super::ClusterError;

/// The table that makes `group`'s WireGuard traffic leave from its endpoints.
pub fn table_name(group: &Group) -> String {
    format!("wgexitd-float-{}", group.name)
}

/// (listen port, endpoint address) of each space whose endpoint address floats.
fn sources(group: &Group) -> Vec<(u16, IpAddr)> {
    let mut out = Vec::new();
    for led in &group.spaces {
        let source = (led.listen_port(), led.endpoint().ip());
        if led.endpoint_interface().is_some() && !out.contains(&source) {
            out.push(source);
        }
    }
    out
}

fn table(name: &str) -> Value {
    json!({"table": {"family": "inet", "name": name}})
}

/// The batch that deletes the table if it is there (adding it first makes the delete safe).
fn delete_batch(name: &str) -> Vec<Value> {
    vec![json!({"add": table(name)}), json!({"delete": table(name)})]
}

/// The batch (nft's JSON) that replaces the table with the rewrites for `group`, or only
/// deletes it when no endpoint of the group floats.
pub fn set_batch(group: &Group) -> Value {
    let name = table_name(group);
    let mut batch = delete_batch(&name);
    let sources = sources(group);
    if !sources.is_empty() {
        batch.push(json!({"add": table(&name)}));
        batch.push(json!({"add": {"chain": {
            "family": "inet", "table": name, "name": "output",
            "type": "route", "hook": "output", "prio": -300, "policy": "accept",
        }}}));
    }
    for (port, ip) in sources {
        let saddr = json!({"payload": {
            "protocol": if ip.is_ipv6() { "ip6" } else { "ip" }, "field": "saddr",
        }});
        let ip = ip.to_string();
        batch.push(json!({"add": {"rule": {
            "family": "inet", "table": name, "chain": "output",
            "comment": format!("WireGuard from port {port} leaves from the endpoint {ip}"),
            "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": port}},
                {"match": {"op": "!=", "left": saddr, "right": ip}},
                {"mangle": {"key": saddr, "value": ip}},
            ],
        }}}));
    }
    json!({ "nftables": batch })
}

/// Makes `group`'s WireGuard traffic leave from its endpoint addresses (one transaction).
pub async fn set(group: &Group) -> Result<(), ClusterError> {
    run_nft(&set_batch(group), group).await
}

/// Lets `group`'s WireGuard traffic leave from wherever the routes say (no error if the
/// table is not there).
pub async fn clear(group: &Group) -> Result<(), ClusterError> {
    let batch = json!({ "nftables": delete_batch(&table_name(group)) });
    run_nft(&batch, group).await
}

async fn run_nft(batch: &Value, group: &Group) -> Result<(), ClusterError> {
    let table = table_name(group);
    let fail = |what: String| {
        ClusterError::Float(format!(
            "nftables table inet {table} (WireGuard's source address): {what}"
        ))
    };
    let mut child = tokio::process::Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // nft reads all of its input before it answers; a write error shows in its status.
        let _ = stdin.write_all(batch.to_string().as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| fail(format!("nft: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(fail(
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::led::Led;
    use crate::config::tests::egress;
    use wgexit::net::IfName;

    fn group(egresses: Vec<crate::config::EgressConfig>) -> Group {
        Group {
            name: egresses[0].name.clone(),
            spaces: egresses.into_iter().map(Led::Egress).collect(),
        }
    }

    #[test]
    fn each_floating_endpoint_gets_one_rewrite_of_its_port() {
        let mut a = egress("a", "100.96.0.0/24");
        a.endpoint = "198.51.100.2:51820".parse().unwrap();
        a.listen_port = 51820;
        a.endpoint_interface = Some(IfName::new("core0").unwrap());
        let mut b = a.clone();
        b.name = "b".into();
        let mut c = a.clone();
        c.name = "c".into();
        c.listen_port = 51821;
        c.endpoint = "[2001:db8::2]:51821".parse().unwrap();
        let batch = set_batch(&group(vec![a, b, c]));
        let ops = batch["nftables"].as_array().unwrap();
        // delete-if-present, the table, its chain, then one rule per (port, endpoint).
        assert_eq!(ops[1]["delete"]["table"]["name"], "wgexitd-float-a");
        assert_eq!(ops[3]["add"]["chain"]["hook"], "output");
        let rules: Vec<&Value> = ops.iter().filter_map(|o| o["add"].get("rule")).collect();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0]["expr"][0]["match"]["right"], 51820);
        assert_eq!(rules[0]["expr"][2]["mangle"]["value"], "198.51.100.2");
        assert_eq!(
            rules[1]["expr"][2]["mangle"]["key"]["payload"]["protocol"],
            "ip6"
        );
        assert_eq!(rules[1]["expr"][2]["mangle"]["value"], "2001:db8::2");
    }

    #[test]
    fn an_endpoint_that_does_not_float_only_deletes_the_table() {
        let mut a = egress("a", "100.96.0.0/24");
        a.endpoint_interface = None;
        let batch = set_batch(&group(vec![a]));
        assert_eq!(batch["nftables"].as_array().unwrap().len(), 2);
    }
}
