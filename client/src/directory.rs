//! Where the relays come from: a [`DirectorySource`] hands the client a verified set of relays.
//! Today the one source is the authority-signed file ([`SignedFile`]); a DHT is the next. Every
//! refusal is a [`LoadError`] that says what is wrong and what to do.

use crate::config::Config;
use crate::relays::{Relay, Relays};
use cellproto::client::PathHop;
use cellproto::directory::{Directory, DirectoryError};
use cellproto::identity::IdentityKey;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A source of verified directories.
pub trait DirectorySource {
    /// The relays it vouches for at unix time `now`, every signature checked.
    fn load(&self, now: u64) -> Result<Relays, LoadError>;
}

/// The directory file `relayd authority sign` writes, verified against the authority's key.
#[derive(Debug, Clone)]
pub struct SignedFile {
    /// The file.
    pub path: PathBuf,
    /// The authority whose signature it must carry.
    pub authority: IdentityKey,
}

impl SignedFile {
    /// The file and authority of a configuration (`directory`, `authority`).
    pub fn from_config(config: &Config) -> Self {
        SignedFile { path: config.directory.clone(), authority: config.authority }
    }
}

impl DirectorySource for SignedFile {
    fn load(&self, now: u64) -> Result<Relays, LoadError> {
        let path = &self.path;
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.clone(), source })?;
        from_bytes(&bytes, path, &self.authority, now)
    }
}

/// Why the directory file was refused.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read the directory {path}: {source}; check `directory` in the configuration")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The signature does not verify, and the body does not even parse: cut short or damaged.
    #[error("directory {path} is truncated or damaged ({detail}); fetch a fresh copy from your directory authority")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        detail: String,
    },
    /// Any other refusal (bad signature, expired, bad descriptor), with the library's reason.
    #[error("directory {path} refused: {source}; fetch a fresh, signed copy from your directory authority")]
    Refused {
        /// The file.
        path: PathBuf,
        /// Why.
        source: DirectoryError,
    },
    /// Nothing usable in it.
    #[error("directory {path} lists no relay with an IPv4 address and a current onion key")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Reads and verifies `config.directory` under `config.authority` at the current time.
pub fn load_directory(config: &Config) -> Result<Relays, LoadError> {
    SignedFile::from_config(config).load(daemonkit::unix_now())
}

/// Verifies a directory's bytes (`path` only names it in errors).
pub fn from_bytes(bytes: &[u8], path: &Path, authority: &IdentityKey, now: u64) -> Result<Relays, LoadError> {
    let dir = Directory::decode_and_verify(bytes, authority, now).map_err(|source| {
        // A truncated file fails the signature check first (its last 64 bytes are not the
        // signature), which would send the user hunting for a wrong key: parse the body
        // unverified, only to name the real problem.
        if matches!(source, DirectoryError::BadSignature { .. })
            && let Some(body) = bytes.len().checked_sub(64).map(|n| &bytes[..n])
            && let Err(DirectoryError::Codec(e)) = Directory::diagnose_unverified(body, now)
        {
            return LoadError::Damaged { path: path.into(), detail: e.to_string() };
        }
        if bytes.len() < 64 {
            return LoadError::Damaged { path: path.into(), detail: format!("only {} bytes", bytes.len()) };
        }
        LoadError::Refused { path: path.into(), source }
    })?;
    let Directory { relays, published, expires } = dir;
    let relays: Vec<Relay> = relays
        .into_iter()
        .filter_map(|desc| {
            let hop = PathHop::from_descriptor(&desc, now, false)?;
            Some(Relay { desc, hop, rtt: None })
        })
        .collect();
    if relays.is_empty() {
        return Err(LoadError::Empty { path: path.into() });
    }
    Ok(Relays { relays, published, expires })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_directories_are_refused_with_the_reason() {
        let auth = cellproto::identity::RelayIdentity::from_seed(&[9; 32]);
        let other = cellproto::identity::RelayIdentity::from_seed(&[8; 32]);
        let doc = Directory::sign(&[], 100, 200, &auth).unwrap();
        let p = Path::new("dir.bin");
        let key = auth.public();
        let err = |bytes: &[u8], now| from_bytes(bytes, p, &key, now).unwrap_err().to_string();
        assert!(err(&doc, 150).contains("no relay"));
        assert!(err(&doc, 250).contains("expired"));
        assert!(err(&doc[..doc.len() - 10], 150).contains("truncated"));
        let mut flipped = doc.clone();
        flipped[5] ^= 1;
        assert!(err(&flipped, 150).contains("signature"));
        let foreign = Directory::sign(&[], 100, 200, &other).unwrap();
        assert!(err(&foreign, 150).contains("signature"));
    }
}
