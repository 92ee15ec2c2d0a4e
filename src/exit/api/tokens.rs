//! Bearer tokens: read from each egress's `token_file`, compared in constant time.
//!
//! Only SHA-256 digests are kept in memory; the owner of a lease is recorded as a short
//! digest of the token that made it, never the token.

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

/// The accepted tokens of one egress.
#[derive(Clone)]
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} accepted)", self.digests.len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A stable, non-reversible name for a token: who owns a lease.
pub fn owner_id(token: &str) -> String {
    hex::encode(&digest(token)[..12])
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
        let mut digests = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if token.len() < 16 {
                return Err(TokenError::TooShort {
                    path: path.to_path_buf(),
                    line: i + 1,
                });
            }
            digests.push(digest(token));
        }
        if digests.is_empty() {
            return Err(TokenError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Tokens { digests })
    }

    /// Whether `token` is one of ours. Every stored digest is compared, in constant time.
    pub fn accepts(&self, token: &str) -> bool {
        let d = digest(token);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, known| acc | known.ct_eq(&d))
            .into()
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
    fn owner_ids_differ_and_hide_the_token() {
        let a = owner_id("token-number-one-1234");
        assert_ne!(a, owner_id("token-number-two-5678"));
        assert!(!a.contains("token"));
        assert_eq!(a.len(), 24);
    }
}
