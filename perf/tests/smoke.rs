//! Runs the real `perf relay` (relayd's engine, its null forwarder and the tokio baseline, each
//! in its own process, on loopback) with a small load and checks the JSON it ends with. No
//! timing assertions: the figures depend on the machine; only their presence and sanity.

mod common;

use common::run_perf;

#[test]
fn perf_relay_reports_json() {
    let v = run_perf(&["relay", "--cells", "20000", "--circuits", "4", "--workers", "1", "--json"]);
    for key in ["cells_per_s", "gbps", "p50_us", "p99_us", "drops", "vs_null", "vs_tokio", "per_core_cells_per_s"] {
        assert!(v[key].is_number(), "{key} missing or not a number in {v}");
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
