//! The pool's secret (`[cluster] secret_file`): the same bytes on every member, never in
//! etcd. Two keys are derived from it (HKDF-SHA256):
//!
//! - a sealing key: the egresses' WireGuard private keys and the CA's private key are
//!   stored in etcd encrypted with ChaCha20-Poly1305 ([`PoolSecret::seal`]), the etcd key
//!   they are stored under as associated data, so the value neither reveals them nor can
//!   be moved to another key;
//! - a signing key: every other record members write carries an HMAC-SHA256 over its etcd
//!   key and value ([`PoolSecret::sign`]). A record that does not verify was not written
//!   by a member (an `etcdctl put`, a record copied to another key) and is ignored.
//!
//! Both primitives come from `ring`, the library the TLS stack already uses.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::aead::{self, LessSafeKey, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};

/// The least secret material accepted, in bytes.
pub const MIN_SECRET: usize = 32;
/// What a signed value starts with; the tag and the value follow, '.'-separated.
const SIGNED: &[u8] = b"wgx1.";
/// What a sealed value starts with; the nonce and ciphertext follow in base64.
const SEALED: &[u8] = b"wgxs1.";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret_file {path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("cannot make a nonce: the system's random source failed")]
    Random,
}

/// Why a stored value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Forged {
    #[error("it is not signed by a member of this pool (written with etcdctl, copied from another key, or with another secret_file)")]
    Unsigned,
    #[error(
        "it is not sealed with this pool's secret_file (is secret_file the same on every member?)"
    )]
    Unsealed,
}

pub struct PoolSecret {
    seal: LessSafeKey,
    sign: hmac::Key,
    random: SystemRandom,
}

impl std::fmt::Debug for PoolSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolSecret(..)")
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(prk: &hkdf::Prk, info: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    // Lengths of 32 bytes are far below HKDF-SHA256's limit: expand cannot fail.
    if let Ok(okm) = prk.expand(&[info], Len(len)) {
        let _ = okm.fill(&mut out);
    }
    out
}

impl PoolSecret {
    /// Reads `path`: owned by this user, readable by nobody else, at least
    /// [`MIN_SECRET`] bytes (surrounding whitespace is not counted).
    pub fn load(path: &Path) -> Result<PoolSecret, SecretError> {
        let fail = |detail: String| SecretError::File {
            path: path.to_path_buf(),
            detail,
        };
        let mut file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(fail(format!(
                "mode {mode:o} lets other users read or change it; chmod 600 it"
            )));
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(fail(format!(
                "owned by uid {}, not by the user wgexitd runs as",
                meta.uid()
            )));
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| fail(e.to_string()))?;
        let material = bytes.trim_ascii();
        if material.len() < MIN_SECRET {
            return Err(fail(format!(
                "{} bytes; write at least {MIN_SECRET} random bytes, e.g. `openssl rand -base64 48`",
                material.len()
            )));
        }
        Ok(PoolSecret::from_material(material))
    }

    pub fn from_material(material: &[u8]) -> PoolSecret {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"wgexit pool secret").extract(material);
        let seal_key = derive(&prk, b"seal", CHACHA20_POLY1305.key_len());
        let sign_key = derive(&prk, b"sign", 32);
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &seal_key)
            .unwrap_or_else(|_| unreachable!("a key of the algorithm's length"));
        PoolSecret {
            seal: LessSafeKey::new(unbound),
            sign: hmac::Key::new(hmac::HMAC_SHA256, &sign_key),
            random: SystemRandom::new(),
        }
    }

    fn tag(&self, key: &str, value: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.sign);
        ctx.update(&(key.len() as u64).to_be_bytes());
        ctx.update(key.as_bytes());
        ctx.update(value);
        ctx.sign()
    }

    /// `value` as stored at etcd key `key`: `wgx1.<tag>.<value>`. The same input always
    /// gives the same output (etcd's compares on values keep working).
    pub fn sign(&self, key: &str, value: &[u8]) -> Vec<u8> {
        let tag = URL_SAFE_NO_PAD.encode(self.tag(key, value).as_ref());
        let mut out = SIGNED.to_vec();
        out.extend_from_slice(tag.as_bytes());
        out.push(b'.');
        out.extend_from_slice(value);
        out
    }

    /// The value of a record signed by [`PoolSecret::sign`] for `key`.
    pub fn verify<'a>(&self, key: &str, stored: &'a [u8]) -> Result<&'a [u8], Forged> {
        let rest = stored.strip_prefix(SIGNED).ok_or(Forged::Unsigned)?;
        let dot = rest
            .iter()
            .position(|&b| b == b'.')
            .ok_or(Forged::Unsigned)?;
        let (tag, value) = (&rest[..dot], &rest[dot + 1..]);
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| Forged::Unsigned)?;
        if same(self.tag(key, value).as_ref(), &tag) {
            Ok(value)
        } else {
            Err(Forged::Unsigned)
        }
    }

    /// `plain` encrypted for etcd key `key`: `wgxs1.<base64(nonce | ciphertext | tag)>`.
    pub fn seal(&self, key: &str, plain: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| SecretError::Random)?;
        let mut body = plain.to_vec();
        self.seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(key.as_bytes()),
                &mut body,
            )
            .map_err(|_| SecretError::Random)?;
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&body);
        let mut out = SEALED.to_vec();
        out.extend_from_slice(URL_SAFE_NO_PAD.encode(raw).as_bytes());
        Ok(out)
    }

    /// The plaintext of a value sealed by [`PoolSecret::seal`] for `key`.
    pub fn open(&self, key: &str, stored: &[u8]) -> Result<Vec<u8>, Forged> {
        let rest = stored.strip_prefix(SEALED).ok_or(Forged::Unsealed)?;
        let mut raw = URL_SAFE_NO_PAD.decode(rest).map_err(|_| Forged::Unsealed)?;
        if raw.len() < NONCE_LEN {
            return Err(Forged::Unsealed);
        }
        let mut body = raw.split_off(NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(&raw).map_err(|_| Forged::Unsealed)?;
        let plain = self
            .seal
            .open_in_place(nonce, aead::Aad::from(key.as_bytes()), &mut body)
            .map_err(|_| Forged::Unsealed)?;
        Ok(plain.to_vec())
    }
}

/// Compares two byte strings in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && subtle::ConstantTimeEq::ct_eq(a, b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> PoolSecret {
        PoolSecret::from_material(&[byte; 40])
    }

    #[test]
    fn a_signed_record_verifies_only_at_its_key_and_with_its_secret() {
        let s = secret(1);
        let stored = s.sign("/wgexit/p/leases/a/01", b"{\"x\":1}");
        assert_eq!(
            s.verify("/wgexit/p/leases/a/01", &stored),
            Ok(&b"{\"x\":1}"[..])
        );
        assert_eq!(
            s.verify("/wgexit/p/leases/a/02", &stored),
            Err(Forged::Unsigned)
        );
        assert_eq!(
            secret(2).verify("/wgexit/p/leases/a/01", &stored),
            Err(Forged::Unsigned)
        );
        assert_eq!(s.verify("k", b"{\"x\":1}"), Err(Forged::Unsigned));
        let mut changed = stored.clone();
        *changed.last_mut().unwrap() = b'2';
        assert_eq!(
            s.verify("/wgexit/p/leases/a/01", &changed),
            Err(Forged::Unsigned)
        );
        assert_eq!(stored, s.sign("/wgexit/p/leases/a/01", b"{\"x\":1}"));
    }

    #[test]
    fn a_sealed_value_hides_the_plaintext_and_opens_only_at_its_key() {
        let s = secret(1);
        let plain = b"the private key of an egress, base64";
        let stored = s.seal("/wgexit/p/identity/a", plain).unwrap();
        assert!(!stored.windows(7).any(|w| w == b"private"));
        assert_eq!(s.open("/wgexit/p/identity/a", &stored).unwrap(), plain);
        assert_eq!(
            s.open("/wgexit/p/identity/b", &stored),
            Err(Forged::Unsealed)
        );
        assert_eq!(
            secret(2).open("/wgexit/p/identity/a", &stored),
            Err(Forged::Unsealed)
        );
        assert_eq!(s.open("/wgexit/p/identity/a", plain), Err(Forged::Unsealed));
    }

    #[test]
    fn a_secret_file_others_can_read_or_too_short_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.secret");
        std::fs::write(&path, "x".repeat(48)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PoolSecret::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(PoolSecret::load(&path).is_ok());
        std::fs::write(&path, "short\n").unwrap();
        let e = PoolSecret::load(&path).unwrap_err().to_string();
        assert!(e.contains("at least 32"), "{e}");
    }
}
