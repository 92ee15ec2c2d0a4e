//! Connection state on the standbys.
//!
//! The leader of an egress source-NATs its containers' flows; the kernel's conntrack
//! table holds each flow's mapping (overlay address and port to egress IP and port). A
//! member that takes over without those entries sees the server's next packet as a packet
//! to its own address and answers it with a reset. So the leader copies the entries of
//! its egresses to etcd (`conntrack/<egress>`, in `conntrack -o save` form) whenever they
//! change, at most every [`SYNC_EVERY`], and the next leader loads them into its own table
//! (`conntrack -R`) before it takes the addresses: the flows go on with the same egress IP
//! and port whoever speaks first.
//!
//! Entries are read and written with conntrack-tools' `conntrack`, which speaks ctnetlink.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::election::Leading;
use super::etcd::Etcd;
use crate::config::EgressConfig;
use crate::dataplane::SpaceDevice;
use crate::leases::store::StoreError;

/// How often the leader looks for changed entries: a flow opened (or changed state, such
/// as a TCP handshake completing) less than this before the leader dies may be lost.
pub const SYNC_EVERY: Duration = Duration::from_millis(200);
/// How long a takeover waits for the copy before it takes the addresses without it.
const RESTORE_WAIT: Duration = Duration::from_millis(500);
/// The largest copy written (etcd refuses requests over 1.5 MiB by default).
const MAX_COPY: usize = 1024 * 1024;
/// The program that reads and writes the kernel's table.
const CONNTRACK: &str = "conntrack";

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot run {CONNTRACK} (is conntrack-tools installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("{CONNTRACK} {args}: {stderr}")]
    Failed { args: String, stderr: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct ConntrackSync {
    pub etcd: Arc<Etcd>,
}

/// The addresses an egress's flows are translated to: its static IPv4s and IPv6s.
fn egress_addresses(e: &EgressConfig) -> HashSet<String> {
    let v4 = e.ips().iter().map(|ip| ip.to_string());
    let v6 =
        e.v6.iter()
            .flat_map(|v6| v6.ips.iter().map(|ip| ip.to_string()));
    v4.chain(v6).collect()
}

/// The entries (`-A` lines) of a `conntrack -L -o save` dump source-NATed (`-n`, the reply
/// direction's destination) to one of `addresses`. Also what a takeover loads of a copy, so
/// nothing but such entries ever reaches `conntrack -R` (no flush, no delete).
pub fn entries_of<'a>(dump: &'a str, addresses: &HashSet<String>) -> Vec<&'a str> {
    dump.lines()
        .filter(|line| {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            tokens.first() == Some(&"-A")
                && tokens
                    .windows(2)
                    .any(|w| matches!(w[0], "-n" | "--src-nat") && addresses.contains(w[1]))
        })
        .collect()
}

/// An entry without its remaining timeout, which changes every second: what tells
/// whether the copy in etcd is out of date.
fn without_timeout(line: &str) -> String {
    let mut out = Vec::new();
    let mut tokens = line.split_whitespace();
    while let Some(t) = tokens.next() {
        if t == "-t" || t == "--timeout" {
            tokens.next();
        } else {
            out.push(t);
        }
    }
    out.join(" ")
}

async fn conntrack(args: &[&str], input: Option<&str>) -> Result<String, ConntrackError> {
    let mut child = Command::new(CONNTRACK)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(ConntrackError::Spawn)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(ConntrackError::Spawn)?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(ConntrackError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ConntrackError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl ConntrackSync {
    fn key(&self, egress: &str) -> String {
        self.etcd.key(&format!("conntrack/{egress}"))
    }

    /// While this member leads egresses, copies their entries to etcd when they change.
    pub async fn publish(self: Arc<Self>, egresses: Vec<EgressConfig>, leading: Leading) {
        let mut published: HashMap<String, Vec<String>> = HashMap::new();
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let led: Vec<&EgressConfig> = egresses
                .iter()
                .filter(|e| leading.leads(&e.space()))
                .collect();
            if led.is_empty() {
                published.clear();
                continue;
            }
            let dump = match conntrack(&["-L", "-o", "save"], None).await {
                Ok(d) => d,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the connection table; standbys keep an older copy");
                    continue;
                }
            };
            for e in led {
                if let Err(err) = self.publish_egress(e, &dump, &mut published).await {
                    tracing::debug!(egress = %e.name, error = %err, "cannot copy connection state");
                }
            }
        }
    }

    async fn publish_egress(
        &self,
        e: &EgressConfig,
        dump: &str,
        published: &mut HashMap<String, Vec<String>>,
    ) -> Result<(), ConntrackError> {
        let entries = entries_of(dump, &egress_addresses(e));
        let mut seen: Vec<String> = entries.iter().map(|l| without_timeout(l)).collect();
        seen.sort();
        if published.get(&e.name) == Some(&seen) {
            return Ok(());
        }
        let copy = entries.join("\n");
        if copy.len() > MAX_COPY {
            tracing::warn!(egress = %e.name, entries = entries.len(), "too many connections to copy to the standbys; a failover resets them");
            return Ok(());
        }
        let key = self.key(&e.name);
        let copy = self.etcd.signed(&key, copy);
        self.etcd
            .run("copying connection state", |mut c| async move {
                c.put(key, copy, None).await
            })
            .await?;
        published.insert(e.name.clone(), seen);
        Ok(())
    }

    /// Loads the last copy of `e`'s entries into this member's table. Returns how many
    /// entries the copy held.
    pub async fn restore(&self, e: &EgressConfig) -> Result<usize, ConntrackError> {
        let key = self.key(&e.name);
        // Asked of every etcd member at once and briefly: the addresses wait for it.
        let resp = self
            .etcd
            .race("reading connection state", RESTORE_WAIT, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        // A copy no member signed is logged and ignored (as every record is).
        let Some(copy) = resp
            .kvs()
            .first()
            .and_then(|kv| self.etcd.verified(kv.key(), kv.value()))
            .and_then(|v| std::str::from_utf8(v).ok())
        else {
            return Ok(0);
        };
        let entries = entries_of(copy, &egress_addresses(e));
        if !entries.is_empty() {
            // Entries already in the table are left as they are; the others are added.
            let text = entries.join("\n") + "\n";
            conntrack(&["-R", "/dev/stdin"], Some(&text)).await?;
        }
        Ok(entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "\
-A -t 431999 -u SEEN_REPLY,ASSURED -s 100.96.0.2 -d 198.18.5.1 -r 198.18.5.1 -n 203.0.113.77 -p tcp --sport 39940 --dport 7000 --reply-port-src 7000 --reply-port-dst 39940 --state ESTABLISHED
-A -t 29 -u SEEN_REPLY -s 198.51.100.31 -d 198.51.100.21 -r 198.51.100.21 -q 198.51.100.31 -p tcp --sport 4000 --dport 2379 --reply-port-src 2379 --reply-port-dst 4000 --state ESTABLISHED
-A -t 50 -u SEEN_REPLY -s 203.0.113.77 -d 203.0.113.1 -r 203.0.113.1 -q 203.0.113.77 -p tcp --sport 4001 --dport 22 --reply-port-src 22 --reply-port-dst 4001 --state ESTABLISHED
-A -t 25 -s 100.96.0.3 -d 198.18.5.1 -r 198.18.5.1 -n 203.0.113.78 -p udp --sport 5000 --dport 7001 --reply-port-src 7001 --reply-port-dst 5000";

    #[test]
    fn only_flows_nated_to_the_egress_are_copied() {
        let ips: HashSet<String> = ["203.0.113.77".to_string()].into();
        let got = entries_of(DUMP, &ips);
        assert_eq!(got.len(), 1);
        assert!(got[0].contains("--sport 39940"));
        let both: HashSet<String> = ["203.0.113.77".into(), "203.0.113.78".into()].into();
        assert_eq!(entries_of(DUMP, &both).len(), 2);
        // Only entries: a flush or a delete naming the address is never loaded.
        let hostile = "-F\n-D -n 203.0.113.77\n-A -t 5 -s 100.96.0.9 -n 203.0.113.77 -p udp";
        assert_eq!(
            entries_of(hostile, &ips),
            vec!["-A -t 5 -s 100.96.0.9 -n 203.0.113.77 -p udp"]
        );
    }

    #[test]
    fn a_changed_timeout_alone_is_no_change() {
        let a = "-A -t 431999 -s 198.18.0.4 -p tcp";
        let b = "-A -t 431990 -s 198.18.0.4 -p tcp";
        assert_eq!(without_timeout(a), without_timeout(b));
        assert_ne!(
            without_timeout(a),
            without_timeout("-A -t 1 -s 198.18.0.5 -p tcp")
        );
    }
}
