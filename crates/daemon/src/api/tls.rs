//! The API's TLS material.
//!
//! When the config names no certificate, the first start creates a private CA
//! (`state_dir/tls/ca.pem`, which clients use as `caFile`) and a server certificate for the
//! listen address signed by it; later starts reuse them, and re-issue the server
//! certificate (same CA) when the names it must cover change.
//!
//! Generated keys are Ed25519: every lease is a new TLS connection, and an Ed25519 signature
//! is cheaper to make (the server, per handshake) and to check (the plugin, per handshake
//! and per certificate) than ECDSA P-256. A state directory from an older version keeps
//! its CA (whatever its key), so the plugins' `caFile` stays valid; only its server
//! certificate, when its key is not Ed25519, is issued anew under that CA at start.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ApiConfig;
use wgexit::fsutil;

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

/// A new key of the kind generated material uses.
fn new_key() -> Result<KeyPair, TlsError> {
    KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(gen_err)
}

/// Whether the server key at `path` is one [`new_key`] would make; an unreadable key is
/// not (so it is made anew).
fn is_current_key(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|pem| KeyPair::from_pem(&pem).ok())
        .is_some_and(|k| k.algorithm() == &rcgen::PKCS_ED25519)
}

fn ca_params() -> Result<(CertificateParams, KeyPair), TlsError> {
    let key = new_key()?;
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
    if current != wanted || !g.cert().exists() || !is_current_key(&g.key()) {
        let key = new_key()?;
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
    let mut config = rustls::ServerConfig::builder_with_provider(wgexit::crypto::tls_provider())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> ApiConfig {
        ApiConfig {
            listen: "198.51.100.2:7443".parse().unwrap(),
            tls_files: None,
            san: vec![],
            max_connections: 1,
            header_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(1),
        }
    }

    fn algorithm(path: &Path) -> &'static rcgen::SignatureAlgorithm {
        KeyPair::from_pem(&std::fs::read_to_string(path).unwrap())
            .unwrap()
            .algorithm()
    }

    /// A TLS handshake in memory between the API's server config and a client trusting
    /// only `ca` for 198.51.100.2: Ok when the client accepts the server.
    fn handshake(cert: &Path, key: &Path, ca: &Path) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client_config =
            rustls::ClientConfig::builder_with_provider(wgexit::crypto::tls_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("198.51.100.2").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_config), name)?;
        let mut server = rustls::ServerConnection::new(server_config(cert, key).unwrap())?;
        let mut buf = Vec::new();
        while client.is_handshaking() || server.is_handshaking() {
            buf.clear();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets()?;
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
        }
        Ok(())
    }

    #[test]
    fn new_material_is_ed25519_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ensure_generated(dir.path(), &api()).unwrap();
        let g = Generated::new(dir.path());
        assert_eq!(algorithm(&key), &rcgen::PKCS_ED25519);
        assert_eq!(algorithm(&g.ca_key()), &rcgen::PKCS_ED25519);
        handshake(&cert, &key, &g.ca_cert()).unwrap();
        // Reused as it is on the next start.
        let before = std::fs::read(&cert).unwrap();
        ensure_generated(dir.path(), &api()).unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), before);
    }

    #[test]
    fn an_older_p256_state_dir_keeps_its_ca_and_gets_an_ed25519_server_key() {
        let dir = tempfile::tempdir().unwrap();
        let g = Generated::new(dir.path());
        // What an older version made: a P-256 CA and a P-256 server certificate under it.
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (params, _) = ca_params().unwrap();
        let ca_cert = params.self_signed(&ca_key).unwrap();
        install_ca(dir.path(), &ca_cert.pem(), &ca_key.serialize_pem()).unwrap();
        let issuer = Issuer::new(params, ca_key);
        let old_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut old = CertificateParams::new(vec!["198.51.100.2".to_string()]).unwrap();
        old.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let old = old.signed_by(&old_key, &issuer).unwrap();
        std::fs::write(g.cert(), old.pem()).unwrap();
        std::fs::write(g.key(), old_key.serialize_pem()).unwrap();
        std::fs::write(g.names(), "198.51.100.2").unwrap();
        handshake(&g.cert(), &g.key(), &g.ca_cert()).unwrap();
        let ca_before = std::fs::read(g.ca_cert()).unwrap();

        let (cert, key) = ensure_generated(dir.path(), &api()).unwrap();
        assert_eq!(
            std::fs::read(g.ca_cert()).unwrap(),
            ca_before,
            "the CA changed"
        );
        assert_eq!(algorithm(&key), &rcgen::PKCS_ED25519);
        // The plugins' existing caFile verifies the new server certificate.
        handshake(&cert, &key, &g.ca_cert()).unwrap();
    }

    #[test]
    fn a_server_certificate_from_another_ca_is_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (cert, key) = ensure_generated(a.path(), &api()).unwrap();
        ensure_generated(b.path(), &api()).unwrap();
        let err = handshake(&cert, &key, &Generated::new(b.path()).ca_cert()).unwrap_err();
        assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
    }
}
