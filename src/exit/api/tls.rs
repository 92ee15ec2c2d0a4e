//! The API's TLS material.
//!
//! When the config names no certificate, the first start creates a private CA
//! (`state_dir/tls/ca.pem`, which clients use as `caFile`) and a server certificate for the
//! listen address signed by it; later starts reuse them, and re-issue the server
//! certificate (same CA) when the names it must cover change.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::exit::config::ApiConfig;
use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("cannot create TLS material: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn gen_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// Paths of the generated material under `state_dir/tls`.
pub struct Generated {
    pub dir: PathBuf,
}

impl Generated {
    pub fn new(state_dir: &Path) -> Generated {
        Generated {
            dir: state_dir.join("tls"),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    fn names(&self) -> PathBuf {
        self.dir.join("cert.names")
    }
}

/// The names the server certificate must cover: the listen address (unless unspecified)
/// and the configured extra names.
fn server_names(api: &ApiConfig) -> Vec<String> {
    let mut names = Vec::new();
    if !api.listen.ip().is_unspecified() {
        names.push(api.listen.ip().to_string());
    }
    names.extend(api.san.iter().cloned());
    names.sort();
    names.dedup();
    names
}

fn ca_params() -> Result<(CertificateParams, KeyPair), TlsError> {
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "wgexitd private CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    Ok((params, key))
}

/// A new private CA: (certificate PEM, key PEM).
pub fn new_ca() -> Result<(String, String), TlsError> {
    let (params, key) = ca_params()?;
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes `cert_pem`/`key_pem` the CA under `state_dir/tls` (a pool's members share one,
/// so one `caFile` verifies them all). A changed CA has the server certificate issued
/// anew by the next [`ensure_generated`].
pub fn install_ca(state_dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
    let g = Generated::new(state_dir);
    fsutil::private_dir(&g.dir).map_err(|e| file_err(&g.dir, e))?;
    let same = std::fs::read_to_string(g.ca_cert()).is_ok_and(|c| c == cert_pem)
        && std::fs::read_to_string(g.ca_key()).is_ok_and(|k| k == key_pem);
    if same {
        return Ok(());
    }
    fsutil::write_private(&g.ca_key(), key_pem.as_bytes()).map_err(|e| file_err(&g.ca_key(), e))?;
    fsutil::write_atomic(&g.ca_cert(), cert_pem.as_bytes(), 0o644)
        .map_err(|e| file_err(&g.ca_cert(), e))?;
    // A new CA invalidates any server certificate from an older one.
    let _ = fsutil::remove_if_exists(&g.names());
    Ok(())
}

/// Creates or reuses the generated CA and server certificate; returns (cert, key) paths.
pub fn ensure_generated(state_dir: &Path, api: &ApiConfig) -> Result<(PathBuf, PathBuf), TlsError> {
    let g = Generated::new(state_dir);
    fsutil::private_dir(&g.dir).map_err(|e| file_err(&g.dir, e))?;
    let names = server_names(api);
    if names.is_empty() {
        return Err(TlsError::Config(
            "api.listen is an unspecified address: list the names clients use in api.san so a certificate can be made for them".into(),
        ));
    }

    let issuer = if g.ca_cert().exists() && g.ca_key().exists() {
        let key_pem = std::fs::read_to_string(g.ca_key()).map_err(|e| file_err(&g.ca_key(), e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&g.ca_key(), e))?;
        let cert_pem =
            std::fs::read_to_string(g.ca_cert()).map_err(|e| file_err(&g.ca_cert(), e))?;
        Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| file_err(&g.ca_cert(), e))?
    } else {
        let (params, key) = ca_params()?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        install_ca(state_dir, &cert.pem(), &key.serialize_pem())?;
        Issuer::new(params, key)
    };

    let wanted = names.join("\n");
    let current = std::fs::read_to_string(g.names()).unwrap_or_default();
    if current != wanted || !g.cert().exists() || !g.key().exists() {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(|_| {
                    TlsError::Config(format!("api.san: {n:?} is not a DNS name or IP address"))
                }),
            })
            .collect::<Result<_, _>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0].clone());
        params.distinguished_name = dn;
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        fsutil::write_private(&g.key(), key.serialize_pem().as_bytes())
            .map_err(|e| file_err(&g.key(), e))?;
        fsutil::write_atomic(&g.cert(), cert.pem().as_bytes(), 0o644)
            .map_err(|e| file_err(&g.cert(), e))?;
        fsutil::write_private(&g.names(), wanted.as_bytes())
            .map_err(|e| file_err(&g.names(), e))?;
    }
    Ok((g.cert(), g.key()))
}

/// The rustls server config for the API.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e))?;
    if certs.is_empty() {
        return Err(file_err(cert, "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::crypto::tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Our order (see `crypto`) wins over a client that prefers a costlier suite.
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}
