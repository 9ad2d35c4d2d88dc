//! Key files: 32 raw bytes, mode 0600, in a 0700 directory. Writing never overwrites; reading
//! refuses a file that group or others can read, as ssh does, so a misconfigured deployment
//! fails loudly. What the 32 bytes mean (an Ed25519 seed, an X25519 secret) is the caller's.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Length of every key file.
pub const KEY_LEN: usize = 32;

/// Why a key file could not be created or read.
#[derive(Debug, Error)]
pub enum KeyError {
    /// A key file already exists (keygen never overwrites).
    #[error("{0} already exists; refusing to overwrite a key (move it away first)")]
    Exists(PathBuf),
    /// A file system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The file does not hold a 32-byte key.
    #[error("{path} is not a key file: expected 32 bytes, found {len}")]
    Length {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
}

/// A closure turning an I/O error on `path` into [`KeyError::Io`].
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.into(), source }
}

/// Creates `dir` and its parents, mode 0700 (an existing directory is left as it is).
pub fn create_dir(dir: &Path) -> Result<(), KeyError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))
}

/// Writes `bytes` to a new file at `path`, mode 0600, and syncs it; refuses an existing file
/// ([`KeyError::Exists`]).
pub fn write_new(path: &Path, bytes: &[u8; KEY_LEN]) -> Result<(), KeyError> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists { KeyError::Exists(path.into()) } else { io_err(path)(e) }
    })?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_err(path))
}

/// Reads the key at `path`: refused if group or others may read it
/// ([`KeyError::Permissions`]) or if it is not 32 bytes ([`KeyError::Length`]).
pub fn read_key(path: &Path) -> Result<[u8; KEY_LEN], KeyError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: path.into(), mode });
    }
    let bytes = fs::read(path).map_err(io_err(path))?;
    bytes.as_slice().try_into().map_err(|_| KeyError::Length { path: path.into(), len: meta.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("daemonkit-keys-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn written_0600_in_0700_read_back_never_overwritten() {
        let dir = tmp("rt").join("keys");
        create_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let path = dir.join("a.key");
        write_new(&path, &[7; KEY_LEN]).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_key(&path).unwrap(), [7; KEY_LEN]);
        assert!(matches!(write_new(&path, &[8; KEY_LEN]), Err(KeyError::Exists(_))));
        assert_eq!(read_key(&path).unwrap(), [7; KEY_LEN], "the refused write left the key alone");
        fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tmp("perm");
        create_dir(&dir).unwrap();
        let path = dir.join("a.key");
        write_new(&path, &[1; KEY_LEN]).unwrap();
        for mode in [0o644, 0o640, 0o604] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_key(&path).unwrap_err();
            assert!(matches!(err, KeyError::Permissions { mode: m, .. } if m == mode), "{err}");
            assert!(err.to_string().contains("chmod 600"));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_length_and_missing_are_refused() {
        let dir = tmp("len");
        create_dir(&dir).unwrap();
        let path = dir.join("a.key");
        fs::write(&path, b"short").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(read_key(&path), Err(KeyError::Length { len: 5, .. })));
        assert!(matches!(read_key(&dir.join("none.key")), Err(KeyError::Io { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
