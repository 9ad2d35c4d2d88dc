//! Pieces the daemons' command lines share (relayd, exitd).

use std::time::{SystemTime, UNIX_EPOCH};

/// Logs to stderr with `RUST_LOG` filtering (default `info`), colours only on a terminal (journald
/// and files get plain text).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Seconds since the Unix epoch (descriptor times).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
