//! Per-job shared secret and the HMAC-SHA256 proofs built from it.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

pub const TOKEN_ENV: &str = "RINGMASTER_TOKEN";
pub const TOKEN_FILE_ENV: &str = "RINGMASTER_TOKEN_FILE";

pub const NONCE_LEN: usize = 32;
pub const TAG_LEN: usize = 32;

/// The job's shared secret. Debug output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes redacted>)", self.0.len())
    }
}

impl Token {
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self> {
        let secret = secret.into();
        if secret.is_empty() {
            return Err(Error::Config(
                "the job token is empty; set RINGMASTER_TOKEN (or RINGMASTER_TOKEN_FILE) to the same non-empty secret on every rank".into(),
            ));
        }
        Ok(Token(secret))
    }

    /// A fresh random token for launchers that start all ranks themselves.
    pub fn random() -> Result<Self> {
        Ok(Token(hex(&random_bytes::<16>()?).into_bytes()))
    }

    /// The token as text, for handing it to child processes through the environment.
    pub fn expose(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// Reads `RINGMASTER_TOKEN`, else the file named by `RINGMASTER_TOKEN_FILE` (trailing
    /// whitespace trimmed, so `echo secret > file` works).
    pub fn from_env() -> Result<Self> {
        if let Ok(t) = std::env::var(TOKEN_ENV) {
            return Token::new(t);
        }
        match std::env::var(TOKEN_FILE_ENV) {
            Ok(path) => Token::from_file(Path::new(&path)),
            Err(_) => Err(Error::Config(format!(
                "no job token: set {TOKEN_ENV} or {TOKEN_FILE_ENV} to the same secret on every rank"
            ))),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::io(format!("reading token file {}", path.display()), e))?;
        let trimmed = bytes.trim_ascii_end();
        Token::new(trimmed.to_vec())
            .map_err(|_| Error::Config(format!("token file {} is empty", path.display())))
    }

    /// HMAC-SHA256 over the concatenated parts; callers prefix a label so a proof made for
    /// one purpose cannot be replayed for another.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// Constant-time check, so a probing peer learns nothing from response timing.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        for p in parts {
            mac.update(p);
        }
        mac.verify_slice(tag).is_ok()
    }
}

pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| Error::Config(format!("no OS randomness available: {e}")))?;
    Ok(b)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_depend_on_secret_and_parts() {
        let a = Token::new("alpha").unwrap();
        let b = Token::new("beta").unwrap();
        let t = a.tag(&[b"x", b"y"]);
        assert!(a.verify(&[b"xy"], &t), "concatenation is what is signed");
        assert!(!b.verify(&[b"x", b"y"], &t));
        assert!(!a.verify(&[b"x", b"z"], &t));
        assert!(Token::new("").is_err());
        assert!(!format!("{a:?}").contains("alpha"));
    }
}
