//! Runs the real `perf exit` (exitd's engine in `perf exit-child` inside network namespaces it
//! creates, and plain kernel routing through the same namespaces) with a small load and checks
//! the JSON it ends with. Needs root (namespaces, TUN, nftables), as exitd's end-to-end test
//! does. No timing assertions: the figures depend on the machine; only their presence and sanity.

mod common;

use common::run_perf;

#[test]
fn perf_exit_reports_json() {
    assert!(nix::unistd::geteuid().is_root(), "perf exit's smoke test needs root (netns, TUN, nftables), as CI has");
    let v = run_perf(&["exit", "--packets", "2000", "--json"]);
    for key in ["packets_per_s", "gbps", "p50_us", "p99_us", "losses", "vs_plain", "cpu_us_per_packet"] {
        assert!(v[key].is_number(), "{key} missing or not a number in {v}");
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
