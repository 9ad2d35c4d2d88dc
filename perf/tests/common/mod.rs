//! Runs the real `perf` binary with some arguments and returns the JSON line it ends with, the
//! whole output printed (for the test log). Bounded: the run is killed after five minutes.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `perf ARGS`, asserts it succeeds within 300 s, and returns its last line as JSON.
pub fn run_perf(args: &[&str]) -> serde_json::Value {
    let what = format!("perf {}", args.first().copied().unwrap_or_default());
    let mut child = Command::new(env!("CARGO_BIN_EXE_perf"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
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
            panic!("{what} did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = reader.join().unwrap();
    println!("{text}");
    assert!(status.success(), "{what} failed: {status}");
    let last = text.lines().last().expect("no output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{what}: the last line is not JSON ({e}): {last}"))
}
