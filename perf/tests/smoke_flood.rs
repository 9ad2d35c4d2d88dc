//! Runs the real `perf flood` (relayd's engine in its own process, the load generator, honest
//! builders and the floods, on loopback) small and checks the JSON it ends with: every field
//! is there and the goals' ratios are computed. No timing assertions: the figures depend on
//! the machine (the benchmark itself says whether the goals are met).

mod common;

use common::run_perf;

#[test]
fn perf_flood_reports_json() {
    let v = run_perf(&[
        "flood",
        "--cells",
        "20000",
        "--circuits",
        "4",
        "--workers",
        "1",
        "--pairs",
        "1",
        "--flood-rate",
        "3000",
        "--extend-rate",
        "1000",
        "--honest-rate",
        "10",
        "--json",
    ]);
    // The goals' ratios, computed from the phases.
    let ratio = v["throughput_ratio"].as_f64().expect("throughput_ratio");
    let base = v["baseline"]["cells_per_s"].as_f64().unwrap();
    let flood = v["flood"]["cells_per_s"].as_f64().unwrap();
    assert!(base > 0.0 && flood > 0.0, "no cells forwarded: {base} / {flood}");
    assert!((ratio - flood / base).abs() < 1e-9 * ratio.max(1.0), "{ratio} is not {flood} / {base}");
    let honest = v["honest_success"].as_f64().expect("honest_success");
    let h = &v["flood"]["honest"];
    let (built, tried) = (h["built"].as_u64().unwrap(), h["tried"].as_u64().unwrap());
    assert!(tried >= 1, "no honest build tried during the flood");
    assert!((honest - built as f64 / tried as f64).abs() < 1e-9, "{honest} is not {built} / {tried}");
    for goal in ["throughput", "honest"] {
        assert!(v["goals"][goal].is_boolean(), "goal {goal} missing");
    }
    // Every phase reports its figures; the flood phase its floods and what the relay did.
    for phase in ["baseline", "flood"] {
        let p = &v[phase];
        for key in ["cells_per_s", "gbps", "secs", "relay_cores", "control_cores"] {
            assert!(p[key].is_number(), "{phase}.{key} missing in {v}");
        }
        assert_eq!(p["sent"], 20_000, "{phase}: not every cell was sent");
        for key in ["handshakes_ok", "cookies_sent", "drops_cookie_limit", "creates_arrived", "under_load_entered"] {
            assert!(p["relay"][key].is_number(), "{phase}.relay.{key} missing");
        }
    }
    let rounds = v["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    assert_eq!((rounds[0]["kind"].as_str(), rounds[1]["kind"].as_str()), (Some("baseline"), Some("flood")));
    let pair = v["throughput_ratio_pairs"][0].as_f64().expect("per-pair ratio");
    let (b, f) = (rounds[0]["cells_per_s"].as_f64().unwrap(), rounds[1]["cells_per_s"].as_f64().unwrap());
    assert!((pair - f / b).abs() < 1e-9 * pair.max(1.0), "{pair} is not {f} / {b}");
    assert!(v["flood"]["creates_sent"].as_u64().unwrap() > 0, "no CREATE flood");
    assert!(v["flood"]["extends_sent"].as_u64().unwrap() > 0, "no EXTEND flood");
    assert!(v["flood"]["relay"]["creates_arrived"].as_f64().unwrap() > 0.0, "the relay saw no flood");
    for key in ["start_kib", "before_flood_kib", "after_flood_kib", "peak_kib"] {
        assert!(v["memory"][key].as_u64().unwrap() > 0, "memory.{key} missing or 0");
    }
    assert!(v["spoof"].is_string());
}
