//! `wgexit peer create|list|remove`: laptops (or any WireGuard peer) joining a private
//! network. `create` makes the key pair here, sends only the public key, and writes a plain
//! wg-quick config (0600, never over an existing file) that `wg-quick up` and the WireGuard
//! apps take as it is. Peers are never collected as idle; `remove` takes one out.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use wgexit::api::{valid_dns_label, MemberGrant, PeerRequest};
use wgexit::client::{Client, ClientError};
use wgexit::keys::Key;

/// The keepalive in the configs `create` writes: laptops sit behind NATs.
pub const PEER_KEEPALIVE: u16 = 15;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0}")]
    Usage(String),
    #[error("{path} exists already; wgexit never overwrites a WireGuard config (remove it, or choose another --out)")]
    Exists { path: PathBuf },
    #[error("cannot read {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("cannot write {path}: {detail}")]
    Write { path: PathBuf, detail: String },
    #[error("cannot make a key pair: {0}")]
    Key(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("network {network} has no peer named {name:?}")]
    NoSuchPeer { network: String, name: String },
}

/// Where and as whom to talk to the gateway.
pub struct Gateway {
    pub server: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    pub network: String,
}

impl Gateway {
    fn client(&self) -> Result<Client, PeerError> {
        if !self.server.starts_with("https://") {
            return Err(PeerError::Usage(format!(
                "--server {:?} must be an https:// URL",
                self.server
            )));
        }
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| PeerError::Read {
            path: self.token_file.clone(),
            detail: e.to_string(),
        })?;
        Ok(Client::new(
            std::slice::from_ref(&self.server),
            &self.ca_file,
            token.trim().to_string(),
        )?)
    }
}

/// The wg-quick config of a peer: its key and address, the network's resolver, the gateway.
pub fn wg_quick_config(private_key: &Key, grant: &MemberGrant) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "[Interface]");
    let _ = writeln!(c, "PrivateKey = {private_key}");
    let _ = writeln!(c, "Address = {}/128", grant.address.addr());
    let _ = writeln!(c, "DNS = {}", grant.dns);
    let _ = writeln!(c);
    let _ = writeln!(c, "[Peer]");
    let _ = writeln!(c, "PublicKey = {}", grant.server_public_key);
    let _ = writeln!(c, "AllowedIPs = {}", grant.prefix);
    let _ = writeln!(c, "Endpoint = {}", grant.endpoint);
    let _ = writeln!(c, "PersistentKeepalive = {PEER_KEEPALIVE}");
    c
}

/// Writes `text` to a new file `path`, owner-only; refuses an existing one.
fn write_new(path: &Path, text: &str) -> Result<(), PeerError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => PeerError::Exists {
                path: path.to_path_buf(),
            },
            _ => PeerError::Write {
                path: path.to_path_buf(),
                detail: e.to_string(),
            },
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| PeerError::Write {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

/// Joins the network as `name` and writes the config to `out`; returns the grant.
pub fn create(gw: &Gateway, name: &str, out: &Path) -> Result<MemberGrant, PeerError> {
    if !valid_dns_label(name) {
        return Err(PeerError::Usage(format!(
            "--name {name:?} must be a DNS label (1-63 letters, digits or '-'): it becomes {name}._peer.internal"
        )));
    }
    // Refuse before anything is asked of the gateway; the write below refuses again.
    if out.exists() {
        return Err(PeerError::Exists {
            path: out.to_path_buf(),
        });
    }
    let client = gw.client()?;
    let private_key = Key::generate_private().map_err(|e| PeerError::Key(e.to_string()))?;
    let request = PeerRequest {
        public_key: private_key.public(),
        name: name.to_string(),
    };
    let (_, grant) = client.add_peer(&gw.network, &request)?;
    if let Err(e) = write_new(out, &wg_quick_config(&private_key, &grant)) {
        // Nobody holds the private key of this peer now: take it out again.
        let _ = client.remove_peer(&gw.network, &request.public_key);
        return Err(e);
    }
    Ok(grant)
}

/// The network's peers, one line each: name, address, public key.
pub fn list(gw: &Gateway) -> Result<String, PeerError> {
    let peers = gw.client()?.list_peers(&gw.network)?;
    let mut out = String::new();
    for p in peers.members {
        let _ = writeln!(out, "{}\t{}\t{}", p.name, p.address, p.public_key);
    }
    Ok(out)
}

/// Takes peer `name` out of the network.
pub fn remove(gw: &Gateway, name: &str) -> Result<(), PeerError> {
    let client = gw.client()?;
    let peer = client
        .list_peers(&gw.network)?
        .members
        .into_iter()
        .find(|p| p.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| PeerError::NoSuchPeer {
            network: gw.network.clone(),
            name: name.to_string(),
        })?;
    client.remove_peer(&gw.network, &peer.public_key)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgexit::api::{Member, MemberKind};

    fn grant() -> MemberGrant {
        MemberGrant {
            member: Member {
                network: "acme".into(),
                kind: MemberKind::Peer,
                public_key: Key([1; 32]),
                address: "fdaa:0:1:1234::5".parse().unwrap(),
                created_at: 0,
                app: String::new(),
                region: String::new(),
                name: "alice".into(),
                attachment: Default::default(),
            },
            address: "fdaa:0:1:1234::5/128".parse().unwrap(),
            prefix: "fdaa:0:1::/48".parse().unwrap(),
            server_public_key: Key([2; 32]),
            endpoint: "198.51.100.2:51830".parse().unwrap(),
            gateway: "fdaa:0:1::1".parse().unwrap(),
            dns: "fdaa:0:1::3".parse().unwrap(),
            persistent_keepalive: 25,
        }
    }

    #[test]
    fn the_config_is_plain_wg_quick() {
        let key = Key([3; 32]);
        let c = wg_quick_config(&key, &grant());
        assert_eq!(
            c,
            format!(
                "[Interface]\nPrivateKey = {key}\nAddress = fdaa:0:1:1234::5/128\nDNS = fdaa:0:1::3\n\n\
                 [Peer]\nPublicKey = {}\nAllowedIPs = fdaa:0:1::/48\nEndpoint = 198.51.100.2:51830\n\
                 PersistentKeepalive = 15\n",
                Key([2; 32])
            )
        );
    }

    #[test]
    fn configs_are_owner_only_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("acme.conf");
        write_new(&path, "one").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_new(&path, "two"),
            Err(PeerError::Exists { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one");
    }
}
