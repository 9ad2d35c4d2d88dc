//! The `exitd` binary as an operator uses it: --version, keygen, a descriptor with the exit
//! flag and the policy summary, and a config error that names the key.

use base64::Engine as _;
use cellproto::descriptor::RelayDescriptor;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn exitd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_exitd"))
}

#[test]
fn version_keygen_descriptor_and_errors() {
    let out = exitd().arg("--version").output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    let dir = std::env::temp_dir().join(format!("exitd-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(exitd().args(["keygen", "--dir"]).arg(dir.join("keys")).output().unwrap().status.success());
    let again = exitd().args(["keygen", "--dir"]).arg(dir.join("keys")).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    let config = dir.join("exitd.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:9001\"\nkey_dir = \"keys\"\nnickname = \"exitcli\"\n[exit]\nwan = \"eth0\"\n\
         [policy]\nallow_ports = [80, 443]\n",
    )
    .unwrap();
    let out = exitd().args(["descriptor", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let signed = base64::engine::general_purpose::STANDARD.decode(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let desc = RelayDescriptor::decode_and_verify(&signed, now).unwrap();
    assert!(desc.is_exit());
    let policy = desc.exit_policy.unwrap();
    assert!(policy.accept && policy.allows_port(443) && !policy.allows_port(25));

    std::fs::write(&config, "listen = \"127.0.0.1:9001\"\nkey_dir = \"keys\"\nnickname = \"x\"\n[exit]\nwan = \"eth0\"\npool_v4 = \"10.0.0.0/30\"\n").unwrap();
    let out = exitd().args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exit.pool_v4"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
