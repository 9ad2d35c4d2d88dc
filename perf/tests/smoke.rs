//! Runs the real `perf relay` (relayd's engine, its null forwarder and the tokio baseline, each
//! in its own process, on loopback) with a small load and checks the JSON it ends with. No
//! timing assertions: the figures depend on the machine; only their presence and sanity.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn perf_relay_reports_json() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_perf"))
        .args(["relay", "--cells", "20000", "--circuits", "4", "--workers", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start perf relay");
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
            panic!("perf relay did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = reader.join().unwrap();
    println!("{text}");
    assert!(status.success(), "perf relay failed: {status}");
    let last = text.lines().last().expect("no output");
    let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    for key in ["cells_per_s", "gbps", "p50_us", "p99_us", "drops", "vs_null", "vs_tokio", "per_core_cells_per_s"] {
        assert!(v[key].is_number(), "{key} missing or not a number in {last}");
    }
    assert_eq!(v["workers"], 1);
    for run in ["relayd", "null", "tokio"] {
        let r = &v[run];
        assert!(r["cells_per_s"].as_f64().unwrap() > 0.0, "{run}: no cells forwarded");
        let sent = r["sent"].as_u64().unwrap();
        let drops = r["drops"].as_u64().unwrap();
        assert_eq!(sent, 20_000, "{run}: not every cell was sent");
        assert!(drops * 20 < sent, "{run}: {drops} of {sent} cells lost");
        assert_eq!(r["bad"], 0, "{run}: cells the sink could not open");
        assert!(r["samples"].as_u64().unwrap() > 0, "{run}: no latency samples");
    }
    assert!(v["cells_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["p99_us"].as_f64().unwrap() >= v["p50_us"].as_f64().unwrap());
    for key in ["vs_null", "vs_tokio"] {
        let r = v[key].as_f64().unwrap();
        assert!(r.is_finite() && r > 0.0, "{key} = {r}");
    }
}
