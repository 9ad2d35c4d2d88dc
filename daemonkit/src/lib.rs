//! Daemon plumbing that relayd, exitd and the client `meshvpn` share, and nothing of the
//! protocol: it depends on no other meshvpn crate, so the daemons depend on it instead of on
//! each other.
//!
//! | module | concern |
//! | --- | --- |
//! | [`log`] | logging to stderr with a filter a SIGHUP can change |
//! | [`notify`] | systemd readiness notifications (`Type=notify`) |
//! | [`docs`] | man pages and shell completions from a clap definition (packaging) |
//! | [`config`] | reading a TOML configuration file, and the error that names the file and key |
//! | [`keyfile`] | 32-byte key files: created 0600, refused when others can read them |
//! | [`signals`] | SIGTERM/SIGINT (stop) and SIGHUP (reload) as flags the main loop polls |
//! | [`unix_now`] | the wall clock as Unix seconds (descriptor and directory times) |

pub mod config;
pub mod docs;
pub mod keyfile;
pub mod log;
pub mod notify;
pub mod signals;

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (descriptor and directory times); 0 if the clock is before it.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_now_is_after_2026() {
        // 2026-01-01T00:00Z: this code did not exist before.
        assert!(super::unix_now() > 1_767_225_600);
    }
}
