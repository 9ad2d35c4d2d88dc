//! DNS through the tunnel: resolv.conf points at the exit's resolver while up.
//!
//! The file is rewritten in place (same inode), not renamed over: that also works where it is a
//! bind mount (containers, `ip netns exec`). A symlinked resolv.conf (systemd-resolved's stub)
//! is replaced by a file and the link put back on restore.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// resolv.conf as it was before `up`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    /// The file.
    pub path: PathBuf,
    /// Its content, if it was a file.
    pub content: Option<String>,
    /// Its target, if it was a symlink.
    pub symlink: Option<PathBuf>,
}

impl Saved {
    /// Saves `path` as it is now.
    pub fn read(path: &Path) -> Result<Self> {
        let symlink = std::fs::read_link(path).ok();
        let content = if symlink.is_some() {
            None
        } else {
            match std::fs::read_to_string(path) {
                Ok(c) => Some(c),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            }
        };
        Ok(Self { path: path.into(), content, symlink })
    }

    /// Puts the file back as it was.
    pub fn restore(&self) -> Result<()> {
        let ctx = || format!("cannot restore {}", self.path.display());
        if let Some(target) = &self.symlink {
            let _ = std::fs::remove_file(&self.path);
            return std::os::unix::fs::symlink(target, &self.path).with_context(ctx);
        }
        match &self.content {
            Some(c) => std::fs::write(&self.path, c).with_context(ctx),
            None => std::fs::remove_file(&self.path)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                })
                .with_context(ctx),
        }
    }
}

/// Writes a resolv.conf naming only `servers`.
pub fn write(path: &Path, servers: &[IpAddr]) -> Result<()> {
    let mut text = String::from("# written by meshvpn while the tunnel is up; restored by `meshvpn down`\n");
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    if std::fs::read_link(path).is_ok() {
        std::fs::remove_file(path).with_context(|| format!("cannot replace the symlink {}", path.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
