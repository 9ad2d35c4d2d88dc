//! The `relayd` binary as an operator uses it: keygen, descriptor, run and SIGTERM, --version,
//! and clear errors.

mod common;

use base64::Engine as _;
use cellproto::descriptor::RelayDescriptor;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn relayd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relayd"))
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("relayd-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let port = free_udp_port();
    let path = dir.join("relayd.toml");
    std::fs::write(
        &path,
        format!("listen = \"127.0.0.1:{port}\"\nkey_dir = \"keys\"\nnickname = \"clitest\"\nworkers = 1\n{extra}"),
    )
    .unwrap();
    path
}

#[test]
fn version() {
    let out = relayd().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn keygen_descriptor_and_refusals() {
    let dir = tmpdir("keygen");
    let keys = dir.join("keys");
    let out = relayd().args(["keygen", "--dir"]).arg(&keys).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = relayd().args(["keygen", "--dir"]).arg(&keys).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    let config = write_config(&dir, "");
    let out = relayd().args(["descriptor", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let signed = base64::engine::general_purpose::STANDARD.decode(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let desc = RelayDescriptor::decode_and_verify(&signed, now).unwrap();
    assert_eq!(desc.nickname, "clitest");

    // A wildcard listen address cannot be published: the error says what to set.
    let wildcard = dir.join("wildcard.toml");
    std::fs::write(&wildcard, "listen = \"0.0.0.0:9001\"\nkey_dir = \"keys\"\nnickname = \"clitest\"\n").unwrap();
    let out = relayd().args(["descriptor", "--config"]).arg(&wildcard).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set public_addresses"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A key readable by others is refused with the fix in the message.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(keys.join("identity.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = relayd().args(["descriptor", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[test]
fn bad_config_names_the_key() {
    let dir = tmpdir("badconfig");
    let config = write_config(&dir, "idle_timeout_secs = \"soon\"\n");
    let out = relayd().args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("idle_timeout_secs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    let dir = tmpdir("run");
    assert!(relayd().args(["keygen", "--dir"]).arg(dir.join("keys")).output().unwrap().status.success());
    let config = write_config(&dir, "");
    let mut child = relayd().args(["run", "--config"]).arg(&config).stderr(Stdio::piped()).spawn().unwrap();
    // Collect stderr as it comes, and signal only once relayd says it is listening.
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (pipe, stderr) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok) {
                let mut text = stderr.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        })
    };
    let listening = common::wait_until(Duration::from_secs(10), || {
        stderr.lock().unwrap().contains("relay listening") || child.try_wait().unwrap().is_some()
    });
    assert!(listening, "relayd never said it was listening: {}", stderr.lock().unwrap());
    assert!(child.try_wait().unwrap().is_none(), "relayd exited early: {}", stderr.lock().unwrap());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "relayd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let stderr = stderr.lock().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("relay listening") && stderr.contains("stopped"), "{stderr}");
}
