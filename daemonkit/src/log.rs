//! Logging: stderr with `RUST_LOG`-style filtering, and a handle that changes the filter of a
//! running daemon (SIGHUP with a new `log_level`).

use thiserror::Error;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Why a log filter could not be applied.
#[derive(Debug, Error)]
pub enum LogError {
    /// The text is not an `EnvFilter` directive.
    #[error("invalid log_level {level:?}: {message}")]
    Filter {
        /// The directive as given.
        level: String,
        /// The parser's message.
        message: String,
    },
    /// The subscriber is gone (cannot happen while the daemon runs).
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

/// Whether `level` is a valid filter (`info`, `relayd=debug,warn`, ...), for configuration
/// checks that must refuse a bad `log_level` before anything starts.
pub fn is_valid_filter(level: &str) -> bool {
    EnvFilter::try_new(level).is_ok()
}

/// Logs to stderr with `RUST_LOG` filtering (default `info`), colours only on a terminal (journald
/// and files get plain text).
pub fn init_logging() {
    let _ = init_logging_with("info");
}

/// Changes the log filter of a running daemon (SIGHUP with a new `log_level`).
pub struct LogControl {
    handle: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    /// `RUST_LOG` was set: it wins over the configuration, at start and on reload.
    env_override: bool,
}

impl LogControl {
    /// Applies `level` (an `EnvFilter` directive such as `info` or `relayd=debug,warn`).
    /// Returns false when `RUST_LOG` is set, which keeps precedence.
    pub fn set(&self, level: &str) -> Result<bool, LogError> {
        if self.env_override {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(level)
            .map_err(|e| LogError::Filter { level: level.to_string(), message: e.to_string() })?;
        self.handle.reload(filter).map_err(|e| LogError::Reload(e.to_string()))?;
        Ok(true)
    }
}

/// As [`init_logging`], with `level` (the configuration's `log_level`) as the filter unless
/// `RUST_LOG` is set; the returned control changes it later.
pub fn init_logging_with(level: &str) -> LogControl {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_override = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
    LogControl { handle, env_override }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked() {
        assert!(is_valid_filter("info"));
        assert!(is_valid_filter("relayd=debug,warn"));
        assert!(!is_valid_filter("relayd=loud"));
    }
}
