//! Man pages and shell completions, generated from a binary's clap definition so they never
//! disagree with `--help`. Used at packaging time (`relayd generate-docs --dir DIR`, hidden;
//! likewise exitd and meshvpn).

use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why the docs could not be written.
#[derive(Debug, Error)]
pub enum DocsError {
    /// A directory or file could not be created or written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A man page could not be rendered.
    #[error("cannot render the man page {title}: {source}")]
    Render {
        /// The page (`NAME` or `NAME-SUBCOMMAND`).
        title: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes man pages (section 8: `NAME.8` and `NAME-SUBCOMMAND.8` for every visible
/// subcommand) into `dir/man8` and bash, zsh and fish completions into `dir/completions`.
pub fn write_docs(cmd: clap::Command, dir: &Path) -> Result<(), DocsError> {
    let man_dir = dir.join("man8");
    let comp_dir = dir.join("completions");
    for d in [&man_dir, &comp_dir] {
        std::fs::create_dir_all(d).map_err(|source| DocsError::Write { path: d.clone(), source })?;
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    write_man(&cmd, &man_dir)?;
    let name = cmd.get_name().to_string();
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &comp_dir)
            .map_err(|source| DocsError::Write { path: comp_dir.clone(), source })?;
    }
    Ok(())
}

fn write_man(cmd: &clap::Command, dir: &Path) -> Result<(), DocsError> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man(sub, dir)?;
    }
    let title = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let path = dir.join(format!("{title}.8"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(&title)
        .section("8")
        .manual("meshvpn")
        .source(format!("meshvpn {}", env!("CARGO_PKG_VERSION")))
        .render(&mut out)
        .map_err(|source| DocsError::Render { title: title.clone(), source })?;
    std::fs::write(&path, out).map_err(|source| DocsError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_cover_every_subcommand() {
        let cmd = clap::Command::new("demo")
            .version("1")
            .subcommand(clap::Command::new("keygen").about("make keys").arg(clap::arg!(--dir <DIR>)))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = std::env::temp_dir().join(format!("daemonkit-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_docs(cmd, &dir).unwrap();
        let page = std::fs::read_to_string(dir.join("man8/demo-keygen.8")).unwrap();
        assert!(page.contains("make keys") && page.contains("dir"), "{page}");
        assert!(dir.join("man8/demo.8").exists());
        assert!(!dir.join("man8/demo-secret.8").exists(), "hidden subcommands get no page");
        for f in ["demo.bash", "_demo", "demo.fish"] {
            let text = std::fs::read_to_string(dir.join("completions").join(f)).unwrap();
            assert!(text.contains("keygen"), "{f}: {text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
