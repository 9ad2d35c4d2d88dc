//! `relayd authority sign` as a directory authority uses it: it signs what relays describe,
//! but refuses a descriptor whose self-declared bandwidth no single relay can have (a relay
//! claiming u64::MAX would otherwise be picked by almost every client).

use std::path::{Path, PathBuf};
use std::process::Command;

fn relayd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relayd"))
}

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relayd-authority-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Keys and a signed descriptor (base64 file) for a relay declaring `bandwidth` bytes/s.
fn descriptor(dir: &Path, name: &str, port: u16, bandwidth: u64) -> PathBuf {
    let node = dir.join(name);
    let out = relayd().args(["keygen", "--dir"]).arg(node.join("keys")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = node.join("relayd.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{port}\"\nkey_dir = \"keys\"\nnickname = \"{name}\"\nbandwidth = {bandwidth}\n"),
    )
    .unwrap();
    let out = relayd().args(["descriptor", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = node.join("descriptor.b64");
    std::fs::write(&file, &out.stdout).unwrap();
    file
}

fn sign(dir: &Path, descriptors: &[&Path]) -> std::process::Output {
    relayd()
        .args(["authority", "sign", "--dir"])
        .arg(dir.join("authority"))
        .arg("--out")
        .arg(dir.join("directory.bin"))
        .args(descriptors)
        .output()
        .unwrap()
}

#[test]
fn authority_refuses_absurd_bandwidth_claims() {
    let dir = tmpdir("bandwidth");
    let out = relayd().args(["authority", "keygen", "--dir"]).arg(dir.join("authority")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 10 Gbit/s is believable; the bound is 100 Gbit/s (12.5 GB/s).
    let honest = descriptor(&dir, "honest", 9101, 1_250_000_000);
    let at_bound = descriptor(&dir, "atbound", 9102, 12_500_000_000);
    let liar = descriptor(&dir, "liar", 9103, 1_000_000_000_000_000);
    let out = sign(&dir, &[&honest, &at_bound]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = sign(&dir, &[&honest, &liar]);
    assert!(!out.status.success(), "a relay claiming 1 PB/s was signed into the directory");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("liar") && err.contains("bandwidth") && err.contains("12500000000"), "{err}");
}
