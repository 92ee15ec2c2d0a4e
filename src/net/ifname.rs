//! Interface names, checked once with the kernel's own rules.
//!
//! The kernel (`dev_valid_name`) accepts 1 to 15 bytes (`IFNAMSIZ` - 1), not `.` or `..`, and
//! no `/`, `:`, NUL or whitespace. Those rules also make a name safe as a file name, which the
//! userspace WireGuard backend relies on (`/var/run/wireguard/<name>.sock`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// A name the kernel accepts for a network interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid interface name (1 to 15 bytes; not \".\" or \"..\"; no '/', ':' or whitespace)")]
pub struct InvalidIfName(pub String);

impl IfName {
    pub fn new(name: &str) -> Result<IfName, InvalidIfName> {
        let valid = !name.is_empty()
            && name.len() <= MAX_IFNAME_LEN
            && name != "."
            && name != ".."
            && !name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
        if valid {
            Ok(IfName(name.to_string()))
        } else {
            Err(InvalidIfName(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IfName {
    type Err = InvalidIfName;
    fn from_str(s: &str) -> Result<IfName, InvalidIfName> {
        IfName::new(s)
    }
}

impl TryFrom<String> for IfName {
    type Error = InvalidIfName;
    fn try_from(s: String) -> Result<IfName, InvalidIfName> {
        IfName::new(&s)
    }
}

impl From<IfName> for String {
    fn from(n: IfName) -> String {
        n.0
    }
}

impl AsRef<str> for IfName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for IfName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_kernels_rules() {
        for ok in ["eth0", "wgx-acme", "a23456789012345", "v.1", "a_b", "ä"] {
            assert!(IfName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a234567890123456",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\0b",
        ] {
            assert_eq!(IfName::new(bad), Err(InvalidIfName(bad.into())), "{bad:?}");
        }
    }

    #[test]
    fn deserializing_checks_the_name() {
        let n: IfName = serde_json::from_str("\"eth0\"").unwrap();
        assert_eq!(n.as_str(), "eth0");
        assert!(serde_json::from_str::<IfName>("\"../x\"").is_err());
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"eth0\"");
    }
}
