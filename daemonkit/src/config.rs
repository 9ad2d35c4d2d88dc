//! Configuration files: TOML read into a daemon's serde types, and the error that names the
//! file and, where it can, the key. Each daemon validates its own values and reports them as
//! [`ConfigError::Value`].

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a configuration file was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type (the message names the key).
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value out of range.
    #[error("invalid config {path}: `{key}` {problem}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The text of the configuration file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })
}

/// `text` as TOML into `T` (`path` only names the file in errors). Values are not checked
/// beyond their types: that is the caller's.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
}

/// Reads the TOML file at `path` into `T`: [`read`], then [`parse_toml`].
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    parse_toml(&read(path)?, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        port: u16,
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let path = Path::new("demo.toml");
        assert_eq!(parse_toml::<Demo>("port = 9001", path).unwrap(), Demo { port: 9001 });
        let err = parse_toml::<Demo>("port = 9001\nprot = 1", path).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("demo.toml") && text.contains("prot"), "{text}");
        let missing = std::env::temp_dir().join(format!("daemonkit-missing-{}.toml", std::process::id()));
        let err = read_toml::<Demo>(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }) && err.to_string().contains("cannot read config"), "{err}");
        let value = ConfigError::Value { path: path.into(), key: "port", problem: "must not be 0".into() };
        assert_eq!(value.to_string(), "invalid config demo.toml: `port` must not be 0");
    }
}
