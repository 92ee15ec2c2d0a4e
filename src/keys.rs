//! WireGuard keys: 32-byte Curve25519 values, written as standard base64 on the wire
//! and in configs, as hex on the userspace (UAPI) protocol.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A WireGuard public or private key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a WireGuard key (expected 32 bytes as base64, e.g. the output of `wg genkey`)")]
pub struct KeyParseError;

impl Key {
    /// A new random private key, clamped as Curve25519 requires.
    pub fn generate_private() -> Result<Key, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Ok(Key(bytes))
    }

    /// The public key belonging to this private key.
    pub fn public(&self) -> Key {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Key(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// URL-safe base64, for use in request paths.
    pub fn to_base64_url(&self) -> String {
        URL_SAFE.encode(self.0)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Accepts standard or URL-safe base64, padded or not.
    pub fn from_base64(s: &str) -> Result<Key, KeyParseError> {
        let s = s.trim();
        let bytes = [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(s).ok())
            .ok_or(KeyParseError)?;
        Ok(Key(bytes.try_into().map_err(|_| KeyParseError)?))
    }

    pub fn from_hex(s: &str) -> Result<Key, KeyParseError> {
        let bytes = hex::decode(s.trim()).map_err(|_| KeyParseError)?;
        Ok(Key(bytes.try_into().map_err(|_| KeyParseError)?))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Debug never prints key material in full: private keys end up in logs otherwise.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", &self.to_base64()[..8])
    }
}

impl FromStr for Key {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Key::from_base64(s)
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Key::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_wg_pubkey() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        let private = Key::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            private.public().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn round_trips_and_rejects() {
        let k = Key::generate_private().unwrap();
        assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(Key::from_base64(&k.to_base64_url()).unwrap(), k);
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(Key::from_base64("abc"), Err(KeyParseError));
        assert_eq!(Key::from_base64(""), Err(KeyParseError));
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
