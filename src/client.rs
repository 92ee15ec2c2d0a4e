//! The plugin's HTTPS client for the exit node's control API. The server is always verified
//! against `caFile`; there is no way to turn verification off.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use ureq::config::Config;
use ureq::http::Uri;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};
use ureq::Agent;

use serde::Serialize;

use crate::api::{
    self, ApiError, EgressInfo, LeaseGrant, LeaseRequest, MemberGrant, MemberList, MemberRequest,
    NetworkInfo, PeerRequest,
};
use crate::keys::Key;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("caFile {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("{server}: unreachable: {detail}")]
    Unreachable { server: String, detail: String },
    #[error("{server}: TLS verification failed ({detail}); is caFile the CA of this exit node (its state_dir/tls/ca.pem)?")]
    Tls { server: String, detail: String },
    #[error("{server}: {status} {}: {}", body.error, body.message)]
    Refused {
        server: String,
        status: u16,
        body: ApiError,
    },
    #[error("{server}: unexpected answer: {detail}")]
    Protocol { server: String, detail: String },
}

impl ClientError {
    /// Whether trying the next server (or again later) could help.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Refused { status, .. } if self.store_unavailable() => *status == 503,
            ClientError::Refused { status, .. } => *status >= 500 && *status != 503,
            _ => false,
        }
    }

    /// The server's lease store (a pool's etcd) cannot take writes right now.
    pub fn store_unavailable(&self) -> bool {
        matches!(self, ClientError::Refused { status: 503, body, .. } if body.error == api::STORE_UNAVAILABLE)
    }
}

/// A client for one or more exit servers of one egress. Cloning is cheap (the connection
/// settings are shared).
#[derive(Clone)]
pub struct Client {
    agent: Agent,
    servers: Vec<String>,
    token: String,
}

/// What a successful round trip answered.
enum Body<T> {
    Json(T),
    Empty,
}

impl Client {
    pub fn new(servers: &[String], ca_file: &Path, token: String) -> Result<Client, ClientError> {
        let ca_err = |detail: String| ClientError::CaFile {
            path: ca_file.display().to_string(),
            detail,
        };
        let pem = std::fs::read(ca_file).map_err(|e| ca_err(e.to_string()))?;
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("holds no PEM certificate".into()));
        }
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::Specific(Arc::new(certs)))
            .unversioned_rustls_crypto_provider(crate::crypto::tls_provider())
            .build();
        let config = Agent::config_builder()
            .tls_config(tls)
            .https_only(true)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(3)))
            .timeout_global(Some(Duration::from_secs(10)))
            .max_redirects(0)
            .build();
        let agent = Agent::with_parts(config, DefaultConnector::new(), LiteralFirst::default());
        Ok(Client {
            agent,
            servers: servers.to_vec(),
            token,
        })
    }

    /// Runs `call` against each server in turn until one answers; transient failures move on
    /// to the next server, other failures are final.
    fn each_server<T>(
        &self,
        call: impl Fn(&str) -> Result<Body<T>, ClientError>,
    ) -> Result<(String, Body<T>), ClientError> {
        let mut last = None;
        for server in &self.servers {
            match call(server.trim_end_matches('/')) {
                Ok(v) => return Ok((server.clone(), v)),
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Unreachable {
            server: "(no servers)".into(),
            detail: "no servers configured".into(),
        }))
    }

    fn request<T: DeserializeOwned>(
        &self,
        server: &str,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Body<T>, ClientError> {
        let url = format!("{server}{path}");
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            _ => self.agent.get(&url).header("Authorization", &auth).call(),
        };
        let mut resp = result.map_err(|e| classify(server, e))?;
        let status = resp.status().as_u16();
        if status == 204 {
            return Ok(Body::Empty);
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| classify(server, e))?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&body)
                .map(Body::Json)
                .map_err(|e| ClientError::Protocol {
                    server: server.to_string(),
                    detail: format!("{status} with a body that is not the expected JSON: {e}"),
                })
        } else {
            let body = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
                error: "http_error".into(),
                message: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
            Err(ClientError::Refused {
                server: server.to_string(),
                status,
                body,
            })
        }
    }

    /// POSTs `body` to `path` on the first server that answers; returns that server too.
    fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(String, T), ClientError> {
        let body = serde_json::to_value(body).map_err(|e| ClientError::Protocol {
            server: "(none)".into(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        match self.each_server(|s| self.request(s, "POST", path, Some(&body)))? {
            (server, Body::Json(answer)) => Ok((server, answer)),
            (server, Body::Empty) => Err(ClientError::Protocol {
                server,
                detail: format!("POST {path} answered with no body"),
            }),
        }
    }

    /// GETs `path` from the first server that answers.
    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        match self.each_server(|s| self.request(s, "GET", path, None))? {
            (_, Body::Json(answer)) => Ok(answer),
            (server, Body::Empty) => Err(ClientError::Protocol {
                server,
                detail: "no body".into(),
            }),
        }
    }

    /// Leases an address for `req.public_key`; returns the server that answered too.
    pub fn lease(
        &self,
        egress: &str,
        req: &LeaseRequest,
    ) -> Result<(String, LeaseGrant), ClientError> {
        self.post(&api::leases_path(egress), req)
    }

    /// Joins private network `network` as a container; returns the server that answered too.
    pub fn lease_member(
        &self,
        network: &str,
        req: &MemberRequest,
    ) -> Result<(String, MemberGrant), ClientError> {
        self.post(&api::members_path(network), req)
    }

    /// Leaves `network` (the member of `key`) on `server`; not there counts as done.
    pub fn release_member(
        &self,
        server: &str,
        network: &str,
        key: &Key,
    ) -> Result<(), ClientError> {
        let path = api::member_path(network, key);
        match self.request::<serde_json::Value>(server.trim_end_matches('/'), "DELETE", &path, None)
        {
            Ok(_) | Err(ClientError::Refused { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The network as the first server that answers sees it.
    pub fn network_info(&self, network: &str) -> Result<NetworkInfo, ClientError> {
        self.get(&api::network_path(network))
    }

    /// Joins `network` as a peer (a laptop).
    pub fn add_peer(
        &self,
        network: &str,
        req: &PeerRequest,
    ) -> Result<(String, MemberGrant), ClientError> {
        self.post(&api::peers_path(network), req)
    }

    /// The peers of `network`.
    pub fn list_peers(&self, network: &str) -> Result<MemberList, ClientError> {
        self.get(&api::peers_path(network))
    }

    /// Removes the peer of `key` from `network`.
    pub fn remove_peer(&self, network: &str, key: &Key) -> Result<(), ClientError> {
        let path = api::peer_path(network, key);
        self.each_server(|s| self.request::<serde_json::Value>(s, "DELETE", &path, None))
            .map(|_| ())
    }

    /// Releases the lease of `key`, asking `server` (the one that granted it) first and,
    /// when it cannot be reached, the other servers (a pool's members share leases). A
    /// lease that is not there counts as released.
    pub fn release(&self, server: &str, egress: &str, key: &Key) -> Result<(), ClientError> {
        let path = api::lease_path(egress, key);
        let first = server.trim_end_matches('/');
        let others = self
            .servers
            .iter()
            .map(|s| s.trim_end_matches('/'))
            .filter(|s| *s != first);
        let mut last = None;
        for s in std::iter::once(first).chain(others) {
            match self.request::<serde_json::Value>(s, "DELETE", &path, None) {
                Ok(_) | Err(ClientError::Refused { status: 404, .. }) => return Ok(()),
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Unreachable {
            server: server.to_string(),
            detail: "no server answered".into(),
        }))
    }

    /// The egress as the first server that answers sees it.
    pub fn egress_info(&self, egress: &str) -> Result<EgressInfo, ClientError> {
        self.get(&api::egress_path(egress))
    }
}

/// Takes an IP address in a server URL as it is; resolves names as ureq does. (ureq's own
/// resolver starts a thread per request to bound the lookup's time, even for an address,
/// and servers are usually given as addresses.)
#[derive(Debug, Default)]
struct LiteralFirst(DefaultResolver);

impl Resolver for LiteralFirst {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        match literal(uri) {
            Some(addr) => {
                let mut out = self.empty();
                out.push(addr);
                Ok(out)
            }
            None => self.0.resolve(uri, config, timeout),
        }
    }
}

/// The socket address of an `https://ADDRESS[:PORT]/…` URL whose host is an IP address.
fn literal(uri: &Uri) -> Option<std::net::SocketAddr> {
    let authority = uri.authority()?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: std::net::IpAddr = host.parse().ok()?;
    let port = authority.port_u16().unwrap_or(443);
    (uri.scheme_str() == Some("https")).then_some(std::net::SocketAddr::new(ip, port))
}

fn classify(server: &str, e: ureq::Error) -> ClientError {
    let server = server.to_string();
    let detail = e.to_string();
    match e {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) => ClientError::Tls { server, detail },
        ureq::Error::Io(ref io) if io.to_string().contains("certificate") => {
            ClientError::Tls { server, detail }
        }
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed => ClientError::Unreachable { server, detail },
        _ => ClientError::Protocol { server, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::literal;

    #[test]
    fn addresses_in_server_urls_need_no_lookup() {
        let at = |u: &str| literal(&u.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(
            at("https://198.51.100.2:7443/v1/egress/acme/leases").as_deref(),
            Some("198.51.100.2:7443")
        );
        assert_eq!(
            at("https://[2001:db8::2]:7443/v1").as_deref(),
            Some("[2001:db8::2]:7443")
        );
        assert_eq!(
            at("https://198.51.100.2/").as_deref(),
            Some("198.51.100.2:443")
        );
        // Names go to the system's resolver.
        assert_eq!(at("https://exit.example:7443/"), None);
    }
}
