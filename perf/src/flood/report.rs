//! `perf flood`'s figures: one [`Phase`] per round, merged per kind, and the report (a table
//! for people, one JSON line for machines).

use super::attack::Spoof;
use super::honest::HonestStats;
use crate::blast::ratio;
use crate::sys;
use anyhow::Result;
use cellproto::cell::CELL_LEN;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

/// Goals from the issue.
pub const GOAL_THROUGHPUT: f64 = 0.8;
/// Share of honest builds that must succeed during the flood.
pub const GOAL_HONEST: f64 = 0.95;

/// One round's figures (or several rounds' merged).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    /// "baseline" or "flood".
    pub kind: String,
    /// Cells of the established circuits that reached the sink, per second of blast.
    pub cells_per_s: f64,
    /// `cells_per_s` × 1452 × 8 / 1e9.
    pub gbps: f64,
    /// Cells sent.
    pub sent: u64,
    /// Cells received.
    pub received: u64,
    /// Seconds of blast.
    pub secs: f64,
    /// Honest circuit builds.
    pub honest: HonestStats,
    /// Spoofed CREATEs sent.
    pub creates_sent: u64,
    /// EXTENDs sent on the flood's circuit.
    pub extends_sent: u64,
    /// Seconds the floods ran.
    pub flood_secs: f64,
    /// Cores the relay process used (over the round's wall time: from its start, floods
    /// included, to the end of its blast).
    pub relay_cores: f64,
    /// Of which its control thread (handshakes).
    pub control_cores: f64,
    /// Relay CPU microseconds per cell the sink received (all the relay did, flood included).
    pub relay_us_per_cell: f64,
    /// Cores of the load generator (sender and sink).
    pub loadgen_cores: f64,
    /// Cores of this process: the floods and the honest builders (the attacker shares the
    /// machine here; on the internet it would not).
    pub attacker_cores: f64,
    /// Cores in soft interrupts (the loopback receive path of every process).
    pub softirq_cores: f64,
    /// Cores busy on the machine in all (other processes included).
    pub busy_cores: f64,
    /// relayd counters: increase over the round.
    pub relay: BTreeMap<String, f64>,
    /// CPU seconds behind the `*_cores` figures, and the wall time.
    #[serde(skip)]
    cpu: CpuSecs,
}

/// CPU seconds used: relay, its control thread, load generator, this process, machine busy,
/// machine soft interrupts; and wall seconds.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSecs {
    relay: f64,
    control: f64,
    loadgen: f64,
    me: f64,
    busy: f64,
    softirq: f64,
    wall: f64,
}

impl std::ops::AddAssign for CpuSecs {
    fn add_assign(&mut self, o: Self) {
        self.relay += o.relay;
        self.control += o.control;
        self.loadgen += o.loadgen;
        self.me += o.me;
        self.busy += o.busy;
        self.softirq += o.softirq;
        self.wall += o.wall;
    }
}

/// A reading of the CPU counters.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    secs: CpuSecs,
    at: Instant,
}

impl Cpu {
    /// Reads the counters of the relay process `relay` and the load generator `loadgen`.
    pub fn read(relay: u32, loadgen: u32) -> Self {
        let (busy, softirq) = sys::machine_cpu();
        let secs = CpuSecs {
            relay: sys::process_cpu(relay).unwrap_or(0.0),
            control: sys::thread_cpu(relay).get("control").copied().unwrap_or(0.0),
            loadgen: sys::process_cpu(loadgen).unwrap_or(0.0),
            me: sys::process_cpu(std::process::id()).unwrap_or(0.0),
            busy,
            softirq,
            wall: 0.0,
        };
        Self { secs, at: Instant::now() }
    }

    /// What was used from `self` to `end`.
    fn since(&self, end: &Cpu) -> CpuSecs {
        let (a, b) = (&self.secs, &end.secs);
        CpuSecs {
            relay: b.relay - a.relay,
            control: b.control - a.control,
            loadgen: b.loadgen - a.loadgen,
            me: b.me - a.me,
            busy: b.busy - a.busy,
            softirq: b.softirq - a.softirq,
            wall: end.at.duration_since(self.at).as_secs_f64(),
        }
    }
}

impl Phase {
    /// A round of `kind` that received `received` of `sent` cells in `secs` of blast, with the
    /// CPU used from `cpu0` to `cpu1`.
    pub fn new(kind: &str, sent: u64, received: u64, secs: f64, cpu0: &Cpu, cpu1: &Cpu) -> Self {
        let mut p = Self { kind: kind.into(), sent, received, secs, cpu: cpu0.since(cpu1), ..Default::default() };
        p.derive();
        p
    }

    /// Rates and cores from the sums.
    fn derive(&mut self) {
        let secs = self.secs.max(1e-9);
        self.cells_per_s = self.received as f64 / secs;
        self.gbps = self.cells_per_s * CELL_LEN as f64 * 8.0 / 1e9;
        let c = &self.cpu;
        let wall = c.wall.max(1e-9);
        self.relay_cores = c.relay / wall;
        self.control_cores = c.control / wall;
        self.loadgen_cores = c.loadgen / wall;
        self.attacker_cores = c.me / wall;
        self.softirq_cores = c.softirq / wall;
        self.busy_cores = c.busy / wall;
        self.relay_us_per_cell = c.relay / self.received.max(1) as f64 * 1e6;
    }

    /// The rounds of one kind together: sums, and rates over the sums.
    pub fn merge(kind: &str, rounds: &[&Phase]) -> Phase {
        let mut all = Phase { kind: kind.into(), ..Default::default() };
        for r in rounds {
            all.sent += r.sent;
            all.received += r.received;
            all.secs += r.secs;
            all.creates_sent += r.creates_sent;
            all.extends_sent += r.extends_sent;
            all.flood_secs += r.flood_secs;
            all.cpu += r.cpu;
            for (k, v) in &r.relay {
                *all.relay.entry(k.clone()).or_insert(0.0) += v;
            }
        }
        all.honest = HonestStats::merge(rounds.iter().map(|r| &r.honest));
        all.derive();
        all
    }

    fn handshakes(&self) -> f64 {
        self.get("handshakes_ok") + self.get("handshakes_failed")
    }

    fn get(&self, key: &str) -> f64 {
        self.relay.get(key).copied().unwrap_or(0.0)
    }
}

/// The relay's memory, KiB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// Once the load generator's circuits were built.
    pub start_kib: u64,
    /// Before the first flood.
    pub before_flood_kib: u64,
    /// After the last flood.
    pub after_flood_kib: u64,
    /// Peak (VmHWM) at the end.
    pub peak_kib: u64,
}

/// The relayd series that say what a flood did: (name, series prefix, label the series must
/// have), summed over workers.
const SERIES: [(&str, &str, &str); 14] = [
    ("handshakes_ok", "relayd_handshakes_total", "result=\"ok\""),
    ("handshakes_failed", "relayd_handshakes_total", "result=\"failed\""),
    ("creates_arrived", "relayd_creates_total", ""),
    ("cookies_sent", "relayd_cookies_total", "result=\"sent\""),
    ("cookies_valid", "relayd_cookies_total", "result=\"valid\""),
    ("drops_cookie_limit", "relayd_drops_total", "reason=\"cookie_limit\""),
    ("drops_overload", "relayd_drops_total", "reason=\"overload\""),
    ("drops_protocol", "relayd_drops_total", "reason=\"protocol\""),
    ("refused_source_rate", "relayd_creates_refused_total", "reason=\"source_rate\""),
    ("refused_circuit_cap", "relayd_creates_refused_total", "reason=\"circuit_cap\""),
    ("under_load_entered", "relayd_under_load_entered_total", ""),
    ("extends_ok", "relayd_extends_total", "result=\"ok\""),
    ("extends_failed", "relayd_extends_total", "result=\"failed\""),
    ("circuits_created", "relayd_circuit_cap", "what=\"used\""),
];

/// The increase of each of [`SERIES`] from `before` to `after`.
pub fn counter_deltas(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let pick = |m: &BTreeMap<String, f64>, prefix: &str, label: &str| -> f64 {
        m.iter().filter(|(k, _)| k.split('{').next() == Some(prefix) && k.contains(label)).map(|(_, v)| v).sum()
    };
    SERIES
        .iter()
        .map(|(name, prefix, label)| (name.to_string(), pick(after, prefix, label) - pick(before, prefix, label)))
        .collect()
}

/// Everything one run found.
pub struct Report {
    /// Every round, in order.
    pub rounds: Vec<Phase>,
    /// The relay's memory.
    pub memory: Memory,
    /// How the flood's sources were made.
    pub spoof: Spoof,
}

/// How the run was set up (for the report).
pub struct Setup {
    /// Cells per round.
    pub cells: u64,
    /// Established circuits.
    pub circuits: usize,
    /// relayd workers.
    pub workers: usize,
    /// CPU cores.
    pub cores: usize,
    /// Spoofed sources.
    pub sources: u32,
    /// Requested rates: CREATE flood, EXTEND flood, honest builds.
    pub rates: (f64, f64, f64),
    /// Honest sources.
    pub honest_sources: u8,
    /// Print JSON too.
    pub json: bool,
}

/// Prints the table (and the JSON line).
pub fn print(s: &Setup, r: &Report) -> Result<()> {
    let of = |kind: &str| r.rounds.iter().filter(|p| p.kind == kind).collect::<Vec<_>>();
    let baseline = Phase::merge("baseline", &of("baseline"));
    let flood = Phase::merge("flood", &of("flood"));
    let throughput = ratio(flood.cells_per_s, baseline.cells_per_s);
    let honest = flood.honest.success;
    let pairs: Vec<f64> =
        r.rounds.chunks(2).filter(|c| c.len() == 2).map(|c| ratio(c[1].cells_per_s, c[0].cells_per_s)).collect();
    let (lo, hi) = pairs.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let mib = |k: u64| k as f64 / 1024.0;
    let mut out = std::io::stdout().lock();
    let sources = if r.spoof == Spoof::Raw { s.sources } else { s.sources.min(256) };
    writeln!(
        out,
        "\nperf flood: {} circuits, {} cells per round, baseline and flood rounds alternating; relayd {} worker(s); {} CPU core(s) shared by everything",
        s.circuits, s.cells, s.workers, s.cores
    )?;
    writeln!(
        out,
        "flood: {:.0} CREATEs/s from {sources} spoofed sources ({}), {:.0} EXTENDs/s on one circuit; honest builds {}/s from {} sources in every round",
        ratio(flood.creates_sent as f64, flood.flood_secs),
        r.spoof.label(),
        ratio(flood.extends_sent as f64, flood.flood_secs),
        s.rates.2,
        s.honest_sources
    )?;
    writeln!(
        out,
        "{:<12} {:>8} {:>5} {:>12} {:>13} {:>10} {:>8} {:>9} {:>7} {:>8} {:>7} {:>5}",
        "round",
        "cells/s",
        "Gb/s",
        "honest built",
        "build p50/95",
        "handshakes",
        "relay µs",
        "relay/ctl",
        "loadgen",
        "attacker",
        "softirq",
        "busy"
    )?;
    let rows = r.rounds.iter().chain([&baseline, &flood]);
    for (i, p) in rows.enumerate() {
        let name = if i < r.rounds.len() { format!("{} {}", p.kind, i / 2 + 1) } else { format!("{} all", p.kind) };
        writeln!(
            out,
            "{:<12} {:>8.0} {:>5.2} {:>7}/{:<4} {:>5.0}/{:<4.0}ms {:>10.0} {:>8.2} {:>4.2}/{:<4.2} {:>7.2} {:>8.2} {:>7.2} {:>5.2}",
            name,
            p.cells_per_s,
            p.gbps,
            p.honest.built,
            p.honest.tried,
            p.honest.p50_ms,
            p.honest.p95_ms,
            p.handshakes(),
            p.relay_us_per_cell,
            p.relay_cores,
            p.control_cores,
            p.loadgen_cores,
            p.attacker_cores,
            p.softirq_cores,
            p.busy_cores,
        )?;
    }
    writeln!(
        out,
        "(relay µs: the relay's CPU per forwarded cell, flood work included; then cores used: relay/its control thread, the load generator, the attacker (floods and honest builders), soft interrupts, the whole machine)"
    )?;
    writeln!(
        out,
        "during the floods, relayd: {:.0} CREATEs arrived, {:.0} COOKIEs sent, {:.0} not answered (cookie_limit), {:.0} CREATEs with a valid cookie, {:.0} handshakes, {:.0} shed (overload), {:.0} EXTENDs dropped as protocol errors",
        flood.get("creates_arrived"),
        flood.get("cookies_sent"),
        flood.get("drops_cookie_limit"),
        flood.get("cookies_valid"),
        flood.handshakes(),
        flood.get("drops_overload"),
        flood.get("drops_protocol"),
    )?;
    writeln!(
        out,
        "relay memory (RSS): {:.1} MiB at start, {:.1} before the first flood, {:.1} after the last, peak {:.1}",
        mib(r.memory.start_kib),
        mib(r.memory.before_flood_kib),
        mib(r.memory.after_flood_kib),
        mib(r.memory.peak_kib)
    )?;
    let verdict = |ok: bool| if ok { "goal met" } else { "below goal" };
    writeln!(out, "ratios:")?;
    writeln!(
        out,
        "  established circuits' throughput, flood / baseline  {throughput:>6.2}   goal ≥ {GOAL_THROUGHPUT}    {}   (per pair of rounds {:.2}–{:.2})",
        verdict(throughput >= GOAL_THROUGHPUT),
        if pairs.is_empty() { 0.0 } else { lo },
        hi
    )?;
    writeln!(
        out,
        "  honest builds that succeeded during the floods      {:>5.1} %   goal ≥ {:.0} %   {}",
        honest * 100.0,
        GOAL_HONEST * 100.0,
        verdict(honest >= GOAL_HONEST)
    )?;
    crate::report::end(&mut out, s.json, || {
        Ok(serde_json::json!({
            "throughput_ratio": throughput,
            "throughput_ratio_pairs": pairs,
            "honest_success": honest,
            "goals": { "throughput": throughput >= GOAL_THROUGHPUT, "honest": honest >= GOAL_HONEST },
            "baseline": serde_json::to_value(&baseline)?,
            "flood": serde_json::to_value(&flood)?,
            "rounds": serde_json::to_value(&r.rounds)?,
            "memory": serde_json::to_value(&r.memory)?,
            "spoof": r.spoof.label(),
            "workers": s.workers,
            "cores": s.cores,
            "cells": s.cells,
            "circuits": s.circuits,
            "flood_rate": s.rates.0,
            "extend_rate": s.rates.1,
            "honest_rate": s.rates.2,
            "sources": sources,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_pick_series_by_name_and_label() {
        let before: BTreeMap<String, f64> = [
            ("relayd_cookies_total{worker=\"0\",result=\"sent\"}", 5.0),
            ("relayd_cookies_total{worker=\"1\",result=\"sent\"}", 1.0),
            ("relayd_cookies_total{worker=\"0\",result=\"valid\"}", 2.0),
            ("relayd_handshakes_total{result=\"ok\"}", 10.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut after = before.clone();
        *after.get_mut("relayd_cookies_total{worker=\"1\",result=\"sent\"}").unwrap() += 7.0;
        *after.get_mut("relayd_handshakes_total{result=\"ok\"}").unwrap() += 3.0;
        after.insert("relayd_creates_total{worker=\"0\"}".into(), 4.0);
        let d = counter_deltas(&before, &after);
        assert_eq!(d["cookies_sent"], 7.0);
        assert_eq!(d["cookies_valid"], 0.0);
        assert_eq!(d["handshakes_ok"], 3.0);
        assert_eq!(d["creates_arrived"], 4.0);
        assert_eq!(d.len(), SERIES.len());
    }

    #[test]
    fn merged_rounds_are_rates_over_sums() {
        let cpu = Cpu::read(std::process::id(), std::process::id());
        let mut a = Phase::new("flood", 100, 100, 1.0, &cpu, &cpu);
        a.honest =
            HonestStats::merge([&HonestStats { tried: 4, built: 4, times_ms: vec![1.0; 4], ..Default::default() }]);
        a.relay.insert("handshakes_ok".into(), 2.0);
        let mut b = Phase::new("flood", 300, 200, 3.0, &cpu, &cpu);
        b.honest =
            HonestStats::merge([&HonestStats { tried: 4, built: 2, times_ms: vec![9.0; 2], ..Default::default() }]);
        b.relay.insert("handshakes_ok".into(), 1.0);
        let all = Phase::merge("flood", &[&a, &b]);
        assert_eq!((all.sent, all.received), (400, 300));
        assert!((all.cells_per_s - 75.0).abs() < 1e-9);
        assert_eq!((all.honest.tried, all.honest.built), (8, 6));
        assert!((all.honest.success - 0.75).abs() < 1e-9);
        assert_eq!(all.honest.p95_ms, 9.0);
        assert_eq!(all.relay["handshakes_ok"], 3.0);
    }
}
