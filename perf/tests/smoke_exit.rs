//! Runs the real `perf exit` (exitd's engine in `perf exit-child` inside network namespaces it
//! creates, and plain kernel routing through the same namespaces) with a small load and checks
//! the JSON it ends with. Needs root (namespaces, TUN, nftables), as exitd's end-to-end test
//! does. No timing assertions: the figures depend on the machine; only their presence and sanity.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn perf_exit_reports_json() {
    assert!(nix::unistd::geteuid().is_root(), "perf exit's smoke test needs root (netns, TUN, nftables), as CI has");
    let mut child = Command::new(env!("CARGO_BIN_EXE_perf"))
        .args(["exit", "--packets", "2000", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start perf exit");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("perf exit did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = reader.join().unwrap();
    println!("{text}");
    assert!(status.success(), "perf exit failed: {status}");
    let last = text.lines().last().expect("no output");
    let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    for key in ["packets_per_s", "gbps", "p50_us", "p99_us", "losses", "vs_plain", "cpu_us_per_packet"] {
        assert!(v[key].is_number(), "{key} missing or not a number in {last}");
    }
    for run in ["exitd", "plain"] {
        let r = &v[run];
        let sent = r["sent"].as_u64().unwrap();
        let losses = r["losses"].as_u64().unwrap();
        assert_eq!(sent, 2000, "{run}: not every packet was sent");
        assert!(losses * 20 < sent, "{run}: {losses} of {sent} packets lost");
        assert!(r["packets_per_s"].as_f64().unwrap() > 0.0, "{run}: nothing came back");
        assert_eq!(r["bad"], 0, "{run}: sampled echoes that were wrong");
        assert!(r["samples"].as_u64().unwrap() > 0, "{run}: no latency samples");
        assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap(), "{run}: p99 < p50");
    }
    // Every packet exitd put on its TUN was one of ours, and what came back left by it.
    let counts = &v["exitd"]["exitd_packets"];
    assert!(counts["to_tun"].as_u64().unwrap_or(0) >= 2000, "exitd packets: {counts}");
    assert!(counts["from_tun"].as_u64().unwrap_or(0) >= 1900, "exitd packets: {counts}");
    let r = v["vs_plain"].as_f64().unwrap();
    assert!(r.is_finite() && r > 0.0, "vs_plain = {r}");
}
