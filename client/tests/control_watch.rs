//! `meshvpn status --watch` against a fake daemon: the real control server
//! ([`meshvpn::control::serve`]) on a Unix socket in a temporary directory, with a driver task
//! whose state the test changes. No root, no tunnel.

use meshvpn::control::{self, Answer, Request, Status, Trigger, Update};
use meshvpn::tunnel::State;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};

fn status(state: State, reason: Option<&str>) -> Status {
    let text = serde_json::json!({
        "state": state, "reason": reason, "path": [], "exit": null, "inner_ipv4": null, "inner_ipv6": null,
        "dns": [], "bytes_sent": 0, "bytes_received": 0, "packets_sent": 0, "packets_received": 0,
        "packets_dropped": 0, "cells_rejected": 0, "send_errors": 0, "tun_write_errors": 0,
        "tun_read_errors": 0, "rtt_ms": null, "suites": [], "uptime_secs": 1, "circuit_age_secs": null,
        "circuit_build_ms": null, "rebuilds": 0, "exit_changes": 0, "kill_switch": false,
        "kill_switch_drops": null, "tun": null
    });
    serde_json::from_value(text).expect("an older daemon's status still parses")
}

/// A fake daemon on a fresh socket: answers status requests with `current`, and tells watchers
/// of each change the test publishes on the returned sender.
struct FakeDaemon {
    socket: PathBuf,
    current: Arc<Mutex<(State, Option<String>)>>,
    changes: watch::Sender<(State, Option<String>)>,
}

impl FakeDaemon {
    fn start() -> FakeDaemon {
        let dir = std::env::temp_dir().join(format!("meshvpn-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("meshvpn.sock");
        let current = Arc::new(Mutex::new((State::Connecting, Some("building the first circuit".to_owned()))));
        let (changes, watching) = watch::channel(current.lock().unwrap().clone());
        let (to_driver, mut requests) = mpsc::channel::<(Request, oneshot::Sender<Answer>)>(8);
        let listener = UnixListener::bind(&socket).unwrap();
        let state = current.clone();
        tokio::spawn(async move {
            while let Some((_, reply)) = requests.recv().await {
                let (s, r) = state.lock().unwrap().clone();
                let _ = reply.send(Answer::Status(Box::new(status(s, r.as_deref()))));
            }
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(control::serve(stream, to_driver.clone(), watching.clone()));
            }
        });
        FakeDaemon { socket, current, changes }
    }

    fn set(&self, state: State, reason: Option<&str>) {
        let now = (state, reason.map(str::to_owned));
        *self.current.lock().unwrap() = now.clone();
        self.changes.send_replace(now);
    }
}

/// Reads the next line within 5 s.
fn next_line(lines: &mut std::io::Lines<BufReader<std::process::ChildStdout>>) -> String {
    lines.next().expect("meshvpn status --watch ended").expect("readable output")
}

#[tokio::test]
async fn status_watch_streams_changes_and_ticks() {
    let daemon = FakeDaemon::start();

    // The library: first update at once, then one on change (well before the tick), then ticks.
    let socket = daemon.socket.clone();
    let (tx, mut updates) = mpsc::unbounded_channel::<(Instant, Update)>();
    let watcher = std::thread::spawn(move || {
        let mut n = 0;
        control::watch(&socket, |u| {
            n += 1;
            Ok(tx.send((Instant::now(), u)).is_ok() && n < 3)
        })
    });
    let (_, first) = updates.recv().await.unwrap();
    assert_eq!((first.trigger, first.status.state), (Trigger::Start, State::Connecting));
    assert_eq!(first.status.reason.as_deref(), Some("building the first circuit"));
    let changed_at = Instant::now();
    daemon.set(State::Up, None);
    let (at, second) = updates.recv().await.unwrap();
    assert_eq!((second.trigger, second.status.state, second.status.reason), (Trigger::Change, State::Up, None));
    assert!(at - changed_at < Duration::from_millis(900), "the change came with a tick, not at once");
    let (at, third) = updates.recv().await.unwrap();
    assert_eq!((third.trigger, third.status.state), (Trigger::Tick, State::Up));
    assert!(at - changed_at >= Duration::from_millis(900), "a tick before a second passed");
    tokio::task::spawn_blocking(move || watcher.join().unwrap().unwrap()).await.unwrap();

    // The command: `meshvpn status --watch --json`, one object per line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshvpn"))
        .args(["status", "--watch", "--json", "--socket"])
        .arg(&daemon.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (first, lines) = tokio::task::spawn_blocking(move || (next_line(&mut lines), lines)).await.unwrap();
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!((first["trigger"].as_str(), first["status"]["state"].as_str()), (Some("start"), Some("up")));
    daemon.set(State::Rebuilding, Some("no cell from the exit for 2000 ms"));
    let mut lines = lines;
    let second = tokio::task::spawn_blocking(move || next_line(&mut lines)).await.unwrap();
    let second: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["trigger"], "change", "{second}");
    assert_eq!(second["status"]["state"], "rebuilding", "{second}");
    assert_eq!(second["status"]["reason"], "no cell from the exit for 2000 ms", "{second}");
    let _ = child.kill();
    let _ = child.wait();

    // Text: a header per update, then the usual status.
    let mut text_watch = Command::new("timeout");
    text_watch.args(["2", env!("CARGO_BIN_EXE_meshvpn"), "status", "--watch", "--socket"]).arg(&daemon.socket);
    // Blocking, so off this (single) thread, which the fake daemon needs.
    let out = tokio::task::spawn_blocking(move || text_watch.output().unwrap()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("--- rebuilding (start) ---\nstate:        rebuilding\n"), "{text}");
    assert!(text.contains("--- rebuilding (tick) ---"), "{text}");
    let _ = std::fs::remove_dir_all(daemon.socket.parent().unwrap());
}
