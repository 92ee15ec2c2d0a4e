//! Bearer tokens: read from each egress's `token_file`, compared in constant time.
//!
//! A line is a token, or `name:token`. A named token's leases belong to its name, so the
//! token can be rotated (the line's secret replaced, the file re-read on SIGHUP or when it
//! changes) and the new one releases the leases the old one made. An unnamed token's leases
//! belong to a short digest of the token itself. Only SHA-256 digests are kept in memory;
//! no token is ever recorded or logged.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} holds no token (one per line; '#' starts a comment)")]
    Empty { path: PathBuf },
    #[error("token file {path}: line {line}: tokens must be at least 16 characters")]
    TooShort { path: PathBuf, line: usize },
}

/// The accepted tokens of one egress, each with the owner its leases belong to.
#[derive(Clone)]
pub struct Tokens {
    accepted: Vec<([u8; 32], String)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} accepted)", self.accepted.len())
    }
}

/// A token line's name (if it has one) and secret: `name:secret` when what precedes the
/// first ':' is a plain name (letters, digits, '-', '_', '.'; at most 64), else all secret.
pub fn split_line(line: &str) -> (Option<&str>, &str) {
    match line.split_once(':') {
        Some((name, secret)) if wgexit::api::valid_egress_name(name) => (Some(name), secret),
        _ => (None, line),
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Who owns the leases an unnamed token makes: a stable, non-reversible name for it.
pub fn owner_id(token: &str) -> String {
    hex::encode(&digest(token)[..12])
}

/// Who owns the leases a named token makes: its name (marked, so that no digest is
/// mistaken for it).
pub fn named_owner(name: &str) -> String {
    format!("@{name}")
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "token file is readable by group or others; chmod 600 it"
                );
            }
        }
        Tokens::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Tokens, TokenError> {
        let mut accepted = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, token) = split_line(line);
            if token.len() < 16 {
                return Err(TokenError::TooShort {
                    path: path.to_path_buf(),
                    line: i + 1,
                });
            }
            let owner = name.map_or_else(|| owner_id(token), named_owner);
            accepted.push((digest(token), owner));
        }
        if accepted.is_empty() {
            return Err(TokenError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Tokens { accepted })
    }

    /// How many owners the tokens stand for (a named token's lines count once).
    pub fn owners(&self) -> usize {
        let owners: std::collections::HashSet<&str> =
            self.accepted.iter().map(|(_, o)| o.as_str()).collect();
        owners.len()
    }

    /// The owner `token` stands for, if it is one of ours. Every stored digest is
    /// compared, in constant time.
    pub fn owner(&self, token: &str) -> Option<&str> {
        let d = digest(token);
        let mut found = None;
        for (known, owner) in &self.accepted {
            if bool::from(known.ct_eq(&d)) {
                found = Some(owner.as_str());
            }
        }
        found
    }

    /// Whether `token` is one of ours.
    pub fn accepts(&self, token: &str) -> bool {
        self.owner(token).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_listed_tokens_only() {
        let t = Tokens::parse(
            Path::new("t"),
            "# comment\n\n  token-number-one-1234  \ntoken-number-two-5678\n",
        )
        .unwrap();
        assert!(t.accepts("token-number-one-1234"));
        assert!(t.accepts("token-number-two-5678"));
        assert!(!t.accepts("token-number-three-9"));
        assert!(!t.accepts(""));
        assert!(!format!("{t:?}").contains("token"));
    }

    #[test]
    fn rejects_empty_and_short() {
        assert!(matches!(
            Tokens::parse(Path::new("t"), "# only a comment\n"),
            Err(TokenError::Empty { .. })
        ));
        assert!(matches!(
            Tokens::parse(Path::new("t"), "short\n"),
            Err(TokenError::TooShort { line: 1, .. })
        ));
    }

    #[test]
    fn a_named_token_owns_by_its_name_so_rotation_keeps_the_owner() {
        let old = Tokens::parse(Path::new("t"), "team-a:old-secret-0123456789\n").unwrap();
        let new = Tokens::parse(Path::new("t"), "team-a:new-secret-0123456789\n").unwrap();
        assert_eq!(old.owner("old-secret-0123456789"), Some("@team-a"));
        assert_eq!(new.owner("new-secret-0123456789"), Some("@team-a"));
        assert_eq!(new.owner("old-secret-0123456789"), None);
        // The whole line is not a token; a line whose prefix is no name is all token.
        assert_eq!(new.owner("team-a:new-secret-0123456789"), None);
        let plain = Tokens::parse(Path::new("t"), "a/b:c-0123456789abcdef\n").unwrap();
        assert!(plain.accepts("a/b:c-0123456789abcdef"));
        assert!(matches!(
            Tokens::parse(Path::new("t"), "team-a:short\n"),
            Err(TokenError::TooShort { line: 1, .. })
        ));
    }

    #[test]
    fn owners_count_each_name_once() {
        let text = "a:0123456789abcdef0\na:0123456789abcdef1\n0123456789abcdef2\n# c\n";
        let t = Tokens::parse(Path::new("t"), text).unwrap();
        assert_eq!(t.owners(), 2);
    }

    #[test]
    fn owner_ids_differ_and_hide_the_token() {
        let a = owner_id("token-number-one-1234");
        assert_ne!(a, owner_id("token-number-two-5678"));
        assert!(!a.contains("token"));
        assert_eq!(a.len(), 24);
    }
}
