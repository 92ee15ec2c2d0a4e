//! The exit node's WireGuard identities: one key pair per egress, made on first start and
//! kept in `state_dir/keys/<egress>.key` (0600), and one per private network in
//! `state_dir/keys/networks/<network>.key`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::{EgressConfig, NetworkConfig};
use wgexit::fsutil;
use wgexit::keys::Key;

#[derive(Debug, thiserror::Error)]
#[error("WireGuard key {path}: {detail}")]
pub struct IdentityError {
    pub path: PathBuf,
    pub detail: String,
}

/// Every egress's private key, and its public key derived once (a Curve25519 scalar
/// multiplication per lease showed in profiles).
pub struct Identities {
    private: HashMap<String, Key>,
    public: HashMap<String, Key>,
}

impl Identities {
    /// Reads each egress's key from `state_dir/keys`, making the ones that are missing.
    pub fn load_or_create(
        state_dir: &Path,
        egresses: &[EgressConfig],
    ) -> Result<Identities, IdentityError> {
        let names: Vec<&str> = egresses.iter().map(|e| e.name.as_str()).collect();
        Identities::load_or_create_in(&state_dir.join("keys"), &names)
    }

    /// Each private network's key, from `state_dir/keys/networks`.
    pub fn load_or_create_networks(
        state_dir: &Path,
        networks: &[NetworkConfig],
    ) -> Result<Identities, IdentityError> {
        let names: Vec<&str> = networks.iter().map(|n| n.name.as_str()).collect();
        let keys = state_dir.join("keys");
        fsutil::private_dir(&keys).map_err(|e| IdentityError {
            path: keys.clone(),
            detail: e.to_string(),
        })?;
        Identities::load_or_create_in(&keys.join("networks"), &names)
    }

    fn load_or_create_in(dir: &Path, names: &[&str]) -> Result<Identities, IdentityError> {
        fsutil::private_dir(dir).map_err(|e| IdentityError {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        let mut private = HashMap::new();
        for name in names {
            private.insert(
                name.to_string(),
                load_or_create(&dir.join(format!("{name}.key")))?,
            );
        }
        let public = private
            .iter()
            .map(|(n, k)| (n.clone(), k.public()))
            .collect();
        Ok(Identities { private, public })
    }

    /// Identities kept elsewhere (a pool's, in etcd): egress name → private key.
    pub fn from_private(private: HashMap<String, Key>) -> Identities {
        let public = private
            .iter()
            .map(|(n, k)| (n.clone(), k.public()))
            .collect();
        Identities { private, public }
    }

    pub fn private(&self, egress: &str) -> Option<&Key> {
        self.private.get(egress)
    }

    pub fn public(&self, egress: &str) -> Option<Key> {
        self.public.get(egress).copied()
    }
}

fn load_or_create(path: &Path) -> Result<Key, IdentityError> {
    let err = |detail: String| IdentityError {
        path: path.to_path_buf(),
        detail,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => Key::from_base64(&text).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate_private().map_err(|e| err(e.to_string()))?;
            fsutil::write_private(path, format!("{key}\n").as_bytes())
                .map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::egress;

    #[test]
    fn keys_are_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let egresses = [egress("a", "100.96.0.0/24"), egress("b", "100.97.0.0/24")];
        let first = Identities::load_or_create(dir.path(), &egresses).unwrap();
        let again = Identities::load_or_create(dir.path(), &egresses).unwrap();
        assert_eq!(first.private("a"), again.private("a"));
        assert_ne!(first.private("a"), first.private("b"));
        assert_eq!(first.public("a"), first.private("a").map(Key::public));
        assert_eq!(first.public("zzz"), None);
        let mode = std::fs::metadata(dir.path().join("keys/a.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
}
