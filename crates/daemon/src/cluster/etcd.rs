//! The connection to a pool's etcd cluster, and where things live in it.
//!
//! etcd's client is asynchronous; the lease store is called from the group-commit thread
//! and the daemon's runtime alike. So the client lives on a small runtime of its own, and
//! every call runs there, bounded by a timeout: a lost quorum answers "unavailable" within
//! that time instead of hanging a request.
//!
//! Keys, all under `/wgexit/<cluster>/`:
//!
//! | key | value |
//! |---|---|
//! | `leases/<egress>/<public key hex>` | the lease as JSON (`StoredLease`), signed |
//! | `addresses/<egress>/<address>` | public key (hex) holding the address, signed |
//! | `endpoints/<egress>/<public key hex>` | the peer's last seen endpoint, `ip:port`, signed |
//! | `identity/<egress>` | the egress's WireGuard private key (base64), sealed |
//! | `epoch` | the pool's identity, made with it ([`super::epoch`]), signed |
//! | `ca` | the API's CA, certificate and key (PEM, JSON), sealed |
//! | `leaders/<egress>` | the leading member's node name, bound to its etcd lease, signed |
//! | `pulses/<egress>` | the same, rewritten by the leader every fifth of `takeover_after`, bound to its etcd lease, signed |
//! | `members/<node>` | a member's info as JSON, bound to its etcd lease, signed |
//! | `settings/<node>` | the settings a member must share with the pool, as JSON, bound to its etcd lease, signed |
//!
//! "Signed" and "sealed" are [`PoolSecret`]'s: a signed value that does not verify was
//! not written by a member and is ignored; a sealed one is encrypted.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use super::secret::PoolSecret;
use crate::config::cluster::EtcdTls;
use crate::config::ClusterConfig;
use crate::leases::store::StoreError;
use wgexit::keys::Key;

/// How long one etcd call may take before the store counts as unavailable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Etcd {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    /// One client per endpoint, for calls sent to every member at once ([`Etcd::race`]).
    each: Vec<Client>,
    endpoints: Vec<String>,
    prefix: String,
    /// One client per endpoint, without `require_leader`, for asking each member about its
    /// raft leader ([`Etcd::status_each`]): kept connected, so a probe costs no TLS
    /// handshake.
    probes: Vec<Client>,
    secret: PoolSecret,
}

/// etcd's TLS settings from the member's files.
fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, String> {
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).map_err(|e| format!("cannot read {what} {}: {e}", p.display()))
    };
    let ca = read(&tls.ca, "etcd_ca")?;
    let cert = read(&tls.cert, "etcd_cert")?;
    let key = read(&tls.key, "etcd_key")?;
    Ok(TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key)))
}

impl Etcd {
    /// Starts the client's runtime and connects (lazily: no etcd member needs to answer
    /// yet).
    pub fn connect(cluster: &ClusterConfig) -> Result<Etcd, StoreError> {
        let name = cluster.etcd.join(",");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::failed(&name, format!("cannot start its runtime: {e}")))?;
        let secret = PoolSecret::load(&cluster.secret_file)
            .map_err(|e| StoreError::failed(&name, e.to_string()))?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true)
            // A member without a raft leader refuses at once instead of queueing.
            .with_require_leader(true);
        match &cluster.etcd_tls {
            Some(tls) => {
                let tls = tls_options(tls).map_err(|e| StoreError::failed(&name, e))?;
                options = options.with_tls(tls);
            }
            None => tracing::warn!(
                etcd = %name,
                "etcd is reached WITHOUT TLS (http:// on loopback): anyone on this machine can read and write the pool's store; use https:// endpoints with etcd_ca, etcd_cert and etcd_key"
            ),
        }
        let status_options = options.clone().with_require_leader(false);
        let endpoints = cluster.etcd.clone();
        let eps = endpoints.clone();
        // Connected on its own runtime (whose tasks then carry the connection), waited for
        // without entering it, so this works from inside another runtime too.
        let connecting = runtime.spawn(async move {
            let client = Client::connect(&eps, Some(options.clone())).await?;
            let (mut each, mut probes) = (Vec::new(), Vec::new());
            for ep in &eps {
                each.push(Client::connect([ep], Some(options.clone())).await?);
                probes.push(Client::connect([ep], Some(status_options.clone())).await?);
            }
            Ok::<_, etcd_client::Error>((client, each, probes))
        });
        let (client, each, probes) = futures::executor::block_on(connecting)
            .map_err(|e| StoreError::failed(&name, e.to_string()))?
            .map_err(|e| StoreError::failed(&name, e.to_string()))?;
        Ok(Etcd {
            runtime: Some(runtime),
            client,
            each,
            endpoints,
            prefix: cluster.prefix(),
            probes,
            secret,
        })
    }

    /// Every etcd member's status, asked at once, each within `within`: `Err(None)` when
    /// one did not answer in time.
    pub async fn status_each(
        &self,
        within: Duration,
    ) -> Vec<Result<etcd_client::StatusResponse, Option<etcd_client::Error>>> {
        let Some(runtime) = &self.runtime else {
            return Vec::new();
        };
        let calls: Vec<_> = self
            .probes
            .iter()
            .map(|c| {
                let mut c = c.clone();
                runtime.spawn(async move { tokio::time::timeout(within, c.status()).await })
            })
            .collect();
        let mut out = Vec::new();
        for call in calls {
            out.push(match call.await {
                Ok(Ok(Ok(s))) => Ok(s),
                Ok(Ok(Err(e))) => Err(Some(e)),
                Ok(Err(_)) | Err(_) => Err(None),
            });
        }
        out
    }

    /// The pool's secret, which seals and signs what members store.
    pub fn secret(&self) -> &PoolSecret {
        &self.secret
    }

    /// The value of a signed record at `key`, or `None` (logged) when it was not written
    /// by a member of this pool.
    pub fn verified<'a>(&self, key: &[u8], stored: &'a [u8]) -> Option<&'a [u8]> {
        let key = String::from_utf8_lossy(key);
        match self.secret.verify(&key, stored) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(%key, reason = %e, "a record in etcd fails its check; ignored");
                None
            }
        }
    }

    /// The signed records under `prefix`: keys relative to it, values checked and unwrapped
    /// (a record that fails its check is logged and left out, as [`Etcd::verified`] does).
    pub async fn verified_range(
        &self,
        what: &str,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let p = prefix.to_string();
        let resp = self
            .run(what, |mut c| async move {
                c.get(p, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let value = self.verified(kv.key(), kv.value())?;
                let key = String::from_utf8_lossy(kv.key());
                let relative = key.strip_prefix(prefix).unwrap_or(&key).to_string();
                Some((relative, value.to_vec()))
            })
            .collect())
    }

    /// `value` signed for `key`.
    pub fn signed(&self, key: &str, value: impl AsRef<[u8]>) -> Vec<u8> {
        self.secret.sign(key, value.as_ref())
    }

    /// The etcd endpoints, for messages.
    pub fn name(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A handle of the client (cheap; shares the connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `call` with a client on the etcd runtime, bounded by `timeout`. `what` says
    /// what was being done, for the error.
    pub async fn run_for<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        call: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let Some(runtime) = &self.runtime else {
            return Err(StoreError::failed(self.name(), "the etcd client stopped"));
        };
        let fut = call(self.client.clone());
        let handle = runtime.spawn(async move { tokio::time::timeout(timeout, fut).await });
        match handle.await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(self.classify(what, e)),
            Ok(Err(_)) => Err(self.no_answer(what, timeout)),
            Err(e) => Err(StoreError::failed(self.name(), format!("{what}: {e}"))),
        }
    }

    /// Runs `call` on every etcd member at once (each through its own connection), bounded
    /// by `timeout`, and returns the first answer; an error only when none answers. Only for
    /// calls that may be applied more than once: a renewal, a conditional write.
    ///
    /// One balanced connection sends a call to one member; when that member has just died
    /// or restarted (it takes connections before it serves them) the call fails or waits
    /// out its timeout although a quorum answers. A renewal lost that way can let the
    /// member's etcd lease expire.
    pub async fn race<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        call: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let Some(runtime) = &self.runtime else {
            return Err(StoreError::failed(self.name(), "the etcd client stopped"));
        };
        let mut calls: futures::stream::FuturesUnordered<_> = self
            .each
            .iter()
            .map(|c| {
                let fut = call(c.clone());
                runtime.spawn(async move { tokio::time::timeout(timeout, fut).await })
            })
            .collect();
        let mut last = None;
        while let Some(answer) = futures::StreamExt::next(&mut calls).await {
            match answer {
                Ok(Ok(Ok(v))) => {
                    for c in calls.iter() {
                        c.abort();
                    }
                    return Ok(v);
                }
                Ok(Ok(Err(e))) => last = Some(self.classify(what, e)),
                Ok(Err(_)) | Err(_) => {}
            }
        }
        Err(last.unwrap_or_else(|| self.no_answer(what, timeout)))
    }

    /// The error of a call nobody answered within `timeout`.
    fn no_answer(&self, what: &str, timeout: Duration) -> StoreError {
        StoreError::unavailable(
            self.name(),
            format!(
                "{what}: no answer within {} ms; is a majority of the etcd members up and reachable?",
                timeout.as_millis()
            ),
        )
    }

    /// [`Etcd::run_for`] with the usual [`CALL_TIMEOUT`].
    pub async fn run<T, F, Fut>(&self, what: &str, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        self.run_for(what, CALL_TIMEOUT, call).await
    }

    /// [`Etcd::run`] for callers outside any runtime (or that may block one briefly).
    pub fn block<T, F, Fut>(&self, what: &str, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        futures::executor::block_on(self.run(what, call))
    }

    /// Unreachable members, a lost quorum and timeouts are "unavailable"; the rest failures.
    fn classify(&self, what: &str, e: etcd_client::Error) -> StoreError {
        let detail = format!("{what}: {e}");
        let transient = match &e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(s) => {
                matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                        | tonic::Code::Aborted
                ) || s.message().contains("leader")
                    || s.message().contains("timed out")
            }
            etcd_client::Error::WatchError(_) | etcd_client::Error::LeaseKeepAliveError(_) => true,
            _ => false,
        };
        if transient {
            StoreError::unavailable(self.name(), detail)
        } else {
            StoreError::failed(self.name(), detail)
        }
    }

    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub fn leases_prefix(&self) -> String {
        self.key("leases/")
    }

    pub fn lease_key(&self, egress: &str, public_key: &Key) -> String {
        self.key(&format!("leases/{egress}/{}", public_key.to_hex()))
    }

    pub fn address_key(&self, egress: &str, address: &IpAddr) -> String {
        self.key(&format!("addresses/{egress}/{address}"))
    }

    pub fn endpoints_prefix(&self, egress: &str) -> String {
        self.key(&format!("endpoints/{egress}/"))
    }

    pub fn endpoint_key(&self, egress: &str, public_key: &Key) -> String {
        format!("{}{}", self.endpoints_prefix(egress), public_key.to_hex())
    }

    pub fn identity_key(&self, egress: &str) -> String {
        self.key(&format!("identity/{egress}"))
    }

    pub fn epoch_key(&self) -> String {
        self.key("epoch")
    }

    pub fn ca_key(&self) -> String {
        self.key("ca")
    }

    pub fn leader_key(&self, egress: &str) -> String {
        self.key(&format!("leaders/{egress}"))
    }

    pub fn pulse_key(&self, egress: &str) -> String {
        self.key(&format!("pulses/{egress}"))
    }

    pub fn members_prefix(&self) -> String {
        self.key("members/")
    }

    pub fn member_key(&self, node: &str) -> String {
        format!("{}{node}", self.members_prefix())
    }

    pub fn settings_prefix(&self) -> String {
        self.key("settings/")
    }

    pub fn settings_key(&self, node: &str) -> String {
        format!("{}{node}", self.settings_prefix())
    }
}

/// `(egress, public key)` of a lease record's key, relative to `leases/`.
pub fn parse_lease_key(rest: &str) -> Option<(String, Key)> {
    let (egress, hex) = rest.split_once('/')?;
    Some((egress.to_string(), Key::from_hex(hex).ok()?))
}

impl Drop for Etcd {
    /// The runtime may be dropped from inside another one (the daemon's): let it go in
    /// the background instead of blocking.
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::test_etcd::{free_port, TestEtcd};

    #[test]
    fn a_race_is_answered_by_a_live_member_when_another_is_down() {
        let Some(live) = TestEtcd::start() else {
            return;
        };
        let dead = format!("http://127.0.0.1:{}", free_port());
        let mut cluster = live.cluster("race", "a");
        cluster.etcd = vec![dead.clone(), live.url.clone()];
        let etcd = Etcd::connect(&cluster).unwrap();
        let key = etcd.key("k");
        for _ in 0..5 {
            let k = key.clone();
            let got = futures::executor::block_on(etcd.race(
                "putting",
                Duration::from_secs(1),
                move |mut c| {
                    let k = k.clone();
                    async move { c.put(k, "v", None).await }
                },
            ));
            assert!(got.is_ok(), "{got:?}");
        }
        cluster.etcd = vec![dead];
        let alone = Etcd::connect(&cluster).unwrap();
        let got = futures::executor::block_on(alone.race(
            "reading",
            Duration::from_millis(500),
            |mut c| async move { c.get("k", None).await },
        ));
        let Err(e) = got else {
            panic!("an answer with no etcd member up")
        };
        assert!(e.unavailable, "{e}");
    }
}
