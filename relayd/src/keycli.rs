//! The relay-identity subcommands, written once for both daemons that own such an identity:
//! `keygen`, `rotate-onion` and `descriptor`. relayd and exitd flatten [`KeyCmd`] into their
//! command lines (`#[command(flatten)]`) and call [`run`]; only how a configuration file turns
//! into a descriptor differs (an exit adds its policy summary), which the caller passes.

use crate::config::Config;
use anyhow::{Context, Result};
use base64::Engine as _;
use cellproto::descriptor::ExitPolicySummary;
use clap::Subcommand;
use std::path::{Path, PathBuf};

/// `keygen`, `rotate-onion`, `descriptor`.
#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create the identity and onion keys (files mode 0600; never overwrites).
    Keygen {
        /// Directory for identity.key and onion.key (created 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Onion key rotation: onion.key becomes onion.key.prev and a new onion.key is made; the
    /// running daemon takes both on SIGHUP (`systemctl reload`). Publish a new descriptor.
    RotateOnion {
        /// The key directory (`key_dir`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print this relay's signed descriptor (base64), for the directory; an exit's carries the
    /// exit flag and its policy summary.
    Descriptor {
        /// Configuration file (see relayd.example.toml, or exitd.example.toml for an exit).
        #[arg(long)]
        config: PathBuf,
    },
}

/// What a descriptor is made from: the relay part of a daemon's configuration and, for an
/// exit, the summary of its policy (which also sets the EXIT flag).
pub struct DescriptorSource {
    /// The relay configuration (`key_dir`, addresses, nickname, bandwidth, lifetime...).
    pub relay: Config,
    /// The exit policy summary; `None` for a relay.
    pub exit_policy: Option<ExitPolicySummary>,
}

/// Runs `cmd` for the daemon `name` (`relayd` or `exitd`, in messages); `load` reads its
/// configuration file into a [`DescriptorSource`] (only `descriptor` calls it).
pub fn run(cmd: KeyCmd, name: &str, load: impl FnOnce(&Path) -> Result<DescriptorSource>) -> Result<()> {
    match cmd {
        KeyCmd::Keygen { dir } => {
            let keys = crate::keys::keygen(&dir)?;
            println!("identity {}", keys.identity.public());
            eprintln!("keys written to {} (mode 0600)", dir.display());
        }
        KeyCmd::RotateOnion { dir } => {
            let public = crate::keys::rotate_onion(&dir)?;
            println!("onion {}", hex(&public));
            eprintln!(
                "new onion key in {}; the previous one is kept as onion.key.prev. Reload {name} (SIGHUP), then publish a new descriptor",
                dir.display()
            );
        }
        KeyCmd::Descriptor { config } => {
            let DescriptorSource { relay, exit_policy } = load(&config)?;
            let keys = crate::keys::load(&relay.key_dir)
                .with_context(|| format!("cannot load keys from {} (key_dir)", relay.key_dir.display()))?;
            let signed = crate::descriptor::signed(&relay, &keys, daemonkit::unix_now(), exit_policy)?;
            println!("{}", base64::engine::general_purpose::STANDARD.encode(signed));
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A daemon's command line with the key commands flattened in, as relayd and exitd have it.
    #[derive(Parser, Debug)]
    struct Demo {
        #[command(subcommand)]
        cmd: DemoCmd,
    }

    #[derive(Subcommand, Debug)]
    enum DemoCmd {
        #[command(flatten)]
        Keys(KeyCmd),
        /// Run.
        Run,
    }

    #[test]
    fn flattened_commands_parse_and_document_themselves() {
        let cmd = Demo::command();
        let names: Vec<_> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
        assert_eq!(names, ["keygen", "rotate-onion", "descriptor", "run"]);
        assert!(cmd.get_subcommands().all(|s| s.get_about().is_some()), "every subcommand has a help line");
        let parsed = Demo::try_parse_from(["demo", "rotate-onion", "--dir", "/k"]).unwrap();
        assert!(matches!(parsed.cmd, DemoCmd::Keys(KeyCmd::RotateOnion { dir }) if dir == Path::new("/k")));
        assert!(Demo::try_parse_from(["demo", "keygen"]).is_err(), "--dir is required");
    }

    #[test]
    fn keygen_then_rotate_through_run() {
        let dir = std::env::temp_dir().join(format!("relayd-keycli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let never = |_: &Path| -> Result<DescriptorSource> { unreachable!("only descriptor loads a configuration") };
        run(KeyCmd::Keygen { dir: dir.clone() }, "relayd", never).unwrap();
        let first = *crate::keys::load(&dir).unwrap().onion[0].public();
        run(KeyCmd::RotateOnion { dir: dir.clone() }, "relayd", never).unwrap();
        let keys = crate::keys::load(&dir).unwrap();
        assert_eq!(keys.onion.len(), 2);
        assert_eq!(*keys.onion[1].public(), first);
        let again = run(KeyCmd::Keygen { dir: dir.clone() }, "relayd", never).unwrap_err();
        assert!(again.to_string().contains("refusing to overwrite"), "{again}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
