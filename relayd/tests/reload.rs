//! `relayd run` under a service manager: READY=1 once bound, SIGHUP re-reads the configuration
//! (new limits enforced at once, restart-only keys named in the log, a broken file refused and
//! the old configuration kept, rotated onion keys taken), STOPPING=1 on SIGTERM.

mod common;

use cellproto::cell::CELL_LEN;
use cellproto::client::PathHop;
use cellproto::handshake::{ClientHandshake, ClientRequest, RelayKeys};
use cellproto::link::encode_create;
use common::{UdpClient, metrics, tmpdir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand_core::OsRng;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
    notify: UnixDatagram,
}

impl Daemon {
    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// The next sd_notify datagram (bounded wait).
    fn next_notify(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.notify.recv(&mut buf).expect("no sd_notify message within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Waits until the log holds `needle` (bounded).
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log.lock().unwrap().clone();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "log never said {needle:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_config(path: &Path, port: u16, metrics_port: u16, workers: usize, extra: &str) {
    std::fs::write(
        path,
        format!(
            "listen = \"127.0.0.1:{port}\"\nkey_dir = \"keys\"\nnickname = \"reload\"\nworkers = {workers}\npin_workers = false\n\
             {extra}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
        ),
    )
    .unwrap();
}

/// Sends `n` CREATEs from a fresh socket; returns how many were answered.
fn creates_answered(relay: SocketAddr, keys: &RelayKeys, n: u32) -> usize {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let req = ClientRequest { hop: 1, offer_aes: true, link_secret: None };
    for i in 0..n {
        let hs = ClientHandshake::start(keys, &req, &mut OsRng).unwrap();
        let mut cell = [0u8; CELL_LEN];
        encode_create(&mut cell, 0x4000_0000 + i, hs.message(), None, None, &mut OsRng);
        sock.send_to(&cell, relay).unwrap();
    }
    let mut buf = [0u8; 2048];
    let mut answered = 0;
    while let Ok((len, _)) = sock.recv_from(&mut buf) {
        if len == CELL_LEN {
            answered += 1;
        }
    }
    answered
}

#[test]
fn notify_and_sighup_reload() {
    let dir = tmpdir("reload-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let keydir = dir.join("keys");
    let keys = relayd::keys::keygen(&keydir).unwrap();
    let identity = keys.identity.public().0;
    let first_onion = *keys.onion[0].public();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let config = dir.join("relayd.toml");
    write_config(&config, port, metrics_port, 1, "");

    let mut child = Command::new(env!("CARGO_BIN_EXE_relayd"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let d = Daemon { child, log, notify };
    let ready = d.next_notify();
    assert!(ready.contains("READY=1") && ready.contains("STATUS=relaying on"), "{ready}");
    let relay: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let maddr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let hop_keys = RelayKeys { identity, onion_key: first_onion };
    assert_eq!(creates_answered(relay, &hop_keys, 20), 20, "default burst is 90");

    assert!(!d.log.lock().unwrap().contains("DEBUG"), "log_level is info at first");
    // Tighter limits (applied), a restart-only key (named, not applied), a new log level.
    write_config(
        &config,
        port,
        metrics_port,
        2,
        "log_level = \"debug\"\n[limits]\ncreate_burst = 5\ncreate_rate = 0.001",
    );
    d.signal(Signal::SIGHUP);
    let msg = d.next_notify();
    assert!(msg.contains("RELOADING=1") && msg.contains("MONOTONIC_USEC="), "{msg}");
    assert!(d.next_notify().contains("READY=1"));
    d.wait_log("reload: limits in force create_rate=0.001 create_burst=5");
    let text = d.wait_log("configuration reloaded");
    assert!(text.contains("key=\"limits.create_burst\"") && text.contains("reload: applied"), "{text}");
    assert!(text.contains("key=\"workers\"") && text.contains("needs a restart"), "{text}");
    let answered = creates_answered(relay, &hop_keys, 20);
    assert!(answered <= 5, "new burst of 5 enforced at once, got {answered}");
    let m = metrics(maddr);
    assert_eq!(m["relayd_config_reloads_total{result=\"ok\"}"], 1.0);
    assert!(m["relayd_handshakes_total{result=\"rate_limited\"}"] >= 15.0);
    assert_eq!(m.keys().filter(|k| k.starts_with("relayd_cells_in_total")).count(), 1, "still one worker");

    // A broken file: refused, old configuration kept, the relay keeps running.
    std::fs::write(&config, "listen = [not toml").unwrap();
    d.signal(Signal::SIGHUP);
    assert!(d.next_notify().contains("RELOADING=1"));
    assert!(d.next_notify().contains("READY=1"));
    d.wait_log("configuration reload failed, keeping the running configuration");
    let m = metrics(maddr);
    assert_eq!(m["relayd_config_reloads_total{result=\"failed\"}"], 1.0);

    // Onion key rotation: a client with the new key builds a circuit after SIGHUP, and one
    // holding the old descriptor still does.
    write_config(&config, port, metrics_port, 1, "log_level = \"debug\"");
    let out = Command::new(env!("CARGO_BIN_EXE_relayd")).args(["rotate-onion", "--dir"]).arg(&keydir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_onion = *relayd::keys::load(&keydir).unwrap().onion[0].public();
    assert_ne!(new_onion, first_onion);
    d.signal(Signal::SIGHUP);
    assert!(d.next_notify().contains("RELOADING=1"));
    assert!(d.next_notify().contains("READY=1"));
    d.wait_log("key=\"key_dir (onion keys)\"");
    d.wait_log("DEBUG relayd::control: reload: onion keys replaced keys=2");
    for (bind, onion_key) in [("127.0.0.3:0", new_onion), ("127.0.0.4:0", first_onion)] {
        let mut client = UdpClient::new(bind, vec![PathHop { keys: RelayKeys { identity, onion_key }, addr: relay }]);
        client.build(Duration::from_secs(5));
        assert!(client.ping(1, 7));
    }

    d.signal(Signal::SIGTERM);
    assert!(d.next_notify().contains("STOPPING=1"));
    d.wait_log("stopped");
    let _ = std::fs::remove_dir_all(&dir);
}
