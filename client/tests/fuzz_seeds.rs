//! The `control` fuzz target's seeds (`client/fuzz/seeds/control/`), made by the control
//! socket's own encoder: every request and answer as the daemon and `meshvpn status` write
//! them. `fuzz_seeds_are_current` fails when a committed seed no longer matches; regenerate with
//!
//! ```sh
//! cargo test -p meshvpn --test fuzz_seeds -- --ignored write_fuzz_seeds
//! ```

use meshvpn::control::{Answer, HopStatus, Request, Status, Trigger, Update};
use meshvpn::tunnel::State;
use std::path::PathBuf;

fn hop(nickname: &str, address: &str) -> HopStatus {
    HopStatus { nickname: nickname.into(), identity: "52".repeat(32), address: address.into() }
}

/// A status with every optional field filled.
fn status() -> Status {
    Status {
        state: State::Up,
        reason: Some("rebuilt after the middle stopped answering".into()),
        path: vec![hop("guard", "192.0.2.1:9001"), hop("middle", "[2001:db8::2]:9001"), hop("exit", "192.0.2.3:9001")],
        exit: Some(hop("exit", "192.0.2.3:9001")),
        inner_ipv4: Some("10.64.0.2/10".into()),
        inner_ipv6: Some("fd00:64::2/64".into()),
        dns: vec!["10.64.0.1".into(), "fd00:64::1".into()],
        bytes_sent: 1 << 31,
        bytes_received: 5 << 20,
        packets_sent: 1000,
        packets_received: 2000,
        packets_dropped: 3,
        cells_rejected: 4,
        stray_datagrams: 9,
        send_errors: 5,
        tun_write_errors: 6,
        tun_read_errors: 7,
        rtt_ms: Some(12.5),
        suites: vec!["aes-256-gcm".into(), "chacha20-poly1305".into(), "aes-256-gcm".into()],
        uptime_secs: 3600,
        circuit_age_secs: Some(600),
        circuit_build_ms: Some(85.25),
        rebuilds: 1,
        exit_changes: 0,
        control_refused: 8,
        session_changes: 1,
        tampered: 2,
        directory_expires: 1_800_000_000,
        directory_expired: false,
        guards: vec!["52".repeat(32), "53".repeat(32)],
        kill_switch: true,
        kill_switch_drops: Some(42),
        tun: Some("meshvpn0".into()),
    }
}

/// Every seed: (file name, one line as written to the socket, without its newline).
fn seeds() -> Vec<(&'static str, String)> {
    vec![
        ("request-status", json(&Request::Status)),
        ("request-down", json(&Request::Down)),
        ("request-watch", json(&Request::Watch)),
        ("request-netcheck", json(&Request::Netcheck)),
        ("answer-stopping", json(&Answer::Stopping)),
        ("answer-status", json(&Answer::Status(Box::new(status())))),
        ("answer-update", json(&Answer::Update(Box::new(Update { trigger: Trigger::Change, status: status() })))),
        ("answer-status-connecting", json(&Answer::Status(Box::new(Status { state: State::Connecting, ..empty() })))),
    ]
}

/// The status of a client that has nothing yet.
fn empty() -> Status {
    Status {
        reason: None,
        path: vec![],
        exit: None,
        inner_ipv4: None,
        inner_ipv6: None,
        dns: vec![],
        rtt_ms: None,
        suites: vec![],
        circuit_age_secs: None,
        circuit_build_ms: None,
        kill_switch_drops: None,
        tun: None,
        ..status()
    }
}

/// One line as the daemon or a command writes it.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap()
}

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/control")
}

/// Each seed parses as what it is.
#[test]
fn fuzz_seeds_are_valid_inputs() {
    for (name, line) in seeds() {
        if name.starts_with("request") {
            Request::parse(&line).unwrap();
        } else {
            Answer::parse(&line).unwrap();
        }
    }
}

/// The committed seeds are the encoder's output today (see the module docs to regenerate).
#[test]
fn fuzz_seeds_are_current() {
    for (name, line) in seeds() {
        let path = seed_dir().join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == line,
            "{} is stale or missing: run `cargo test -p meshvpn --test fuzz_seeds -- --ignored write_fuzz_seeds`",
            path.display()
        );
    }
}

/// Writes the seeds into `client/fuzz/seeds/control/` (run on purpose: `--ignored`).
#[test]
#[ignore = "writes into the source tree; run to regenerate the committed fuzz seeds"]
fn write_fuzz_seeds() {
    std::fs::create_dir_all(seed_dir()).unwrap();
    for (name, line) in seeds() {
        std::fs::write(seed_dir().join(name), line).unwrap();
    }
}
