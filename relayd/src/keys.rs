//! The relay's keys: its Ed25519 identity seed and X25519 onion key, 32 raw bytes each, mode
//! 0600 in a 0700 directory, written and read by [`daemonkit::keyfile`]. `keygen` refuses to
//! overwrite; loading refuses files that group or others can read, as ssh does, so a
//! misconfigured deployment fails loudly.

use cellproto::handshake::OnionSecret;
use cellproto::identity::RelayIdentity;
use daemonkit::keyfile::{create_dir, io_err, read_key, write_new};
use rand_core::{OsRng, RngCore};
use std::fs;
use std::path::Path;

pub use daemonkit::keyfile::KeyError;

/// File name of the identity seed inside the key directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// File name of the current onion key.
pub const ONION_FILE: &str = "onion.key";
/// File name of the previous onion key, kept during rotation.
pub const ONION_PREV_FILE: &str = "onion.key.prev";
/// File name of a directory authority's identity seed (`relayd authority keygen`).
pub const AUTHORITY_FILE: &str = "authority.key";

/// A relay's long-term keys.
pub struct RelayKeys {
    /// The Ed25519 identity.
    pub identity: RelayIdentity,
    /// Onion keys, current first, then the previous one if present.
    pub onion: Vec<OnionSecret>,
    /// Unix time the previous onion key became previous (the rotation: the change time of
    /// `onion.key.prev`). It is accepted until that plus the descriptor lifetime, when the last
    /// descriptor that certified it has expired everywhere.
    pub previous_since: Option<u64>,
}

impl RelayKeys {
    /// When a relay whose descriptors live `lifetime_secs` stops accepting the previous onion
    /// key, as an [`Instant`] for the control plane (`now_unix` is the current unix time).
    pub fn previous_until(&self, lifetime_secs: u64, now_unix: u64) -> Option<std::time::Instant> {
        let until = self.previous_since?.saturating_add(lifetime_secs);
        Some(std::time::Instant::now() + std::time::Duration::from_secs(until.saturating_sub(now_unix)))
    }
}

/// Creates `dir` (0700) with a new identity and onion key; refuses to overwrite either.
pub fn keygen(dir: &Path) -> Result<RelayKeys, KeyError> {
    create_dir(dir)?;
    for name in [IDENTITY_FILE, ONION_FILE] {
        let path = dir.join(name);
        if path.exists() {
            return Err(KeyError::Exists(path));
        }
    }
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let identity = RelayIdentity::from_seed(&seed);
    write_new(&dir.join(IDENTITY_FILE), &seed)?;
    let mut onion_secret = [0u8; 32];
    OsRng.fill_bytes(&mut onion_secret);
    write_new(&dir.join(ONION_FILE), &onion_secret)?;
    let onion = OnionSecret::from_bytes(&onion_secret);
    seed.fill(0);
    onion_secret.fill(0);
    Ok(RelayKeys { identity, onion: vec![onion], previous_since: None })
}

/// Loads the keys from `dir`.
pub fn load(dir: &Path) -> Result<RelayKeys, KeyError> {
    let mut seed = read_key(&dir.join(IDENTITY_FILE))?;
    let identity = RelayIdentity::from_seed(&seed);
    seed.fill(0);
    let mut onion = Vec::with_capacity(2);
    let mut previous_since = None;
    for name in [ONION_FILE, ONION_PREV_FILE] {
        let path = dir.join(name);
        if name == ONION_PREV_FILE {
            if !path.exists() {
                break;
            }
            // The rename that made it previous set its change time.
            let meta = fs::metadata(&path).map_err(io_err(&path))?;
            previous_since = Some(u64::try_from(std::os::unix::fs::MetadataExt::ctime(&meta)).unwrap_or(0));
        }
        let mut secret = read_key(&path)?;
        onion.push(OnionSecret::from_bytes(&secret));
        secret.fill(0);
    }
    Ok(RelayKeys { identity, onion, previous_since })
}

/// Onion key rotation: the current `onion.key` becomes `onion.key.prev` (replacing an older
/// one) and a new `onion.key` is written (0600). A running relay picks both up on SIGHUP and
/// answers handshakes made with either, so clients holding the previous descriptor still
/// connect until the new descriptor has spread; rotate again no sooner than that. Returns the
/// new onion public key. The identity is untouched.
pub fn rotate_onion(dir: &Path) -> Result<[u8; 32], KeyError> {
    // Refuse a directory without an identity: it is not a key directory.
    read_key(&dir.join(IDENTITY_FILE))?;
    let current = dir.join(ONION_FILE);
    let prev = dir.join(ONION_PREV_FILE);
    if current.exists() {
        read_key(&current)?;
        fs::rename(&current, &prev).map_err(io_err(&current))?;
    }
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut secret);
    let written = write_new(&current, &secret);
    let public = *OnionSecret::from_bytes(&secret).public();
    secret.fill(0);
    written.map(|()| public)
}

/// Creates `dir` (0700) with a new directory-authority identity; refuses to overwrite it.
pub fn authority_keygen(dir: &Path) -> Result<RelayIdentity, KeyError> {
    create_dir(dir)?;
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let identity = RelayIdentity::from_seed(&seed);
    let written = write_new(&dir.join(AUTHORITY_FILE), &seed);
    seed.fill(0);
    written.map(|()| identity)
}

/// Loads the directory-authority identity from `dir`.
pub fn load_authority(dir: &Path) -> Result<RelayIdentity, KeyError> {
    let mut seed = read_key(&dir.join(AUTHORITY_FILE))?;
    let identity = RelayIdentity::from_seed(&seed);
    seed.fill(0);
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relayd-keys-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn keygen_then_load_round_trips_and_never_overwrites() {
        let dir = tmp("rt");
        let made = keygen(&dir).unwrap();
        let loaded = load(&dir).unwrap();
        assert_eq!(made.identity.public(), loaded.identity.public());
        assert_eq!(made.onion[0].public(), loaded.onion[0].public());
        assert_eq!(fs::metadata(dir.join(IDENTITY_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(keygen(&dir), Err(KeyError::Exists(_))));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_keeps_the_previous_onion_key() {
        let dir = tmp("rotate");
        let made = keygen(&dir).unwrap();
        let first = *made.onion[0].public();
        let new = rotate_onion(&dir).unwrap();
        let loaded = load(&dir).unwrap();
        assert_eq!(loaded.identity.public(), made.identity.public());
        assert_eq!(loaded.onion.iter().map(|k| *k.public()).collect::<Vec<_>>(), vec![new, first]);
        // The previous key is accepted for one descriptor lifetime after the rotation.
        let now = daemonkit::unix_now();
        let since = loaded.previous_since.expect("rotation time");
        assert!(since.abs_diff(now) <= 5, "rotation time {since} vs now {now}");
        let until = loaded.previous_until(86_400, now).unwrap();
        let left = until.saturating_duration_since(std::time::Instant::now()).as_secs();
        assert!((86_390..=86_405).contains(&left), "{left}");
        assert_eq!(
            load(&dir).map(|k| k.previous_until(60, now + 61)).ok().flatten().map(|t| t <= std::time::Instant::now()),
            Some(true)
        );
        assert_eq!(made.previous_since, None);
        let newer = rotate_onion(&dir).unwrap();
        let loaded = load(&dir).unwrap();
        assert_eq!(loaded.onion.iter().map(|k| *k.public()).collect::<Vec<_>>(), vec![newer, new]);
        assert_eq!(fs::metadata(dir.join(ONION_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(rotate_onion(&tmp("rotate-empty")).is_err(), "no identity, no rotation");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tmp("perm");
        keygen(&dir).unwrap();
        fs::set_permissions(dir.join(ONION_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&dir).err().unwrap();
        assert!(matches!(err, KeyError::Permissions { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_length_is_refused() {
        let dir = tmp("len");
        keygen(&dir).unwrap();
        fs::write(dir.join(IDENTITY_FILE), b"short").unwrap();
        assert!(matches!(load(&dir), Err(KeyError::Length { len: 5, .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
