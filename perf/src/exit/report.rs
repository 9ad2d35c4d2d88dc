//! `perf exit`'s figures: one run's [`ExitReport`] from what the load generator measured, and
//! the printed table (and JSON with `--json`).

use super::Ctx;
use super::load::DriveResult;
use crate::blast::{percentile, ratio};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;

/// One run's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExitReport {
    /// Which run.
    pub name: String,
    /// Round trips per second (packets back / time from first send to last arrival).
    pub packets_per_s: f64,
    /// `packets_per_s` × packet size × 8 / 1e9: IP packet bytes, each way.
    pub gbps: f64,
    /// Round-trip latency, sampled, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest sample, µs.
    pub max_us: f64,
    /// Latency samples.
    pub samples: u64,
    /// Round-trip latency of single packets, one in flight at a time (before the blast), µs.
    pub idle_p50_us: f64,
    /// 99th percentile of those, µs.
    pub idle_p99_us: f64,
    /// Single round trips measured (of `PINGS`; a lost one is left out).
    pub pings: u64,
    /// Packets sent.
    pub sent: u64,
    /// Packets that came back.
    pub received: u64,
    /// sent − received.
    pub losses: u64,
    /// losses / sent.
    pub loss_ratio: f64,
    /// Measured seconds (sum over rounds).
    pub blast_secs: f64,
    /// Rounds of preparing and sending.
    pub rounds: u32,
    /// exitd process CPU µs per round trip (exitd run only).
    pub exitd_cpu_us_per_packet: Option<f64>,
    /// Of that, in user space (opening and sealing cells, exitd's own logic).
    pub exitd_user_us_per_packet: Option<f64>,
    /// Of that, in the kernel on exitd's behalf: its UDP and TUN system calls, and what the
    /// kernel does within them (a TUN write carries the packet on through NAT and the veth to
    /// the echo server's socket; a UDP send, through the veth to the client's socket).
    pub exitd_sys_us_per_packet: Option<f64>,
    /// Cores exitd used on average during the blasts.
    pub exitd_cores: Option<f64>,
    /// exitd's cores by thread name.
    pub exitd_threads: BTreeMap<String, f64>,
    /// Cores this process used (load generator and echo server).
    pub harness_cores: f64,
    /// Cores in soft interrupts (the network stack, accounted to no process).
    pub softirq_cores: f64,
    /// Cores busy with anything else.
    pub other_cores: f64,
    /// Datagrams the kernel dropped at the client's socket.
    pub client_socket_drops: u64,
    /// Datagrams the kernel dropped at the echo server's socket.
    pub echo_socket_drops: u64,
    /// Datagrams the kernel dropped at exitd's socket(s).
    pub exitd_socket_drops: Option<u64>,
    /// `exitd_packets_total` by outcome (to_tun, from_tun, handed_off, drops by reason).
    pub exitd_packets: Option<BTreeMap<String, u64>>,
    /// `relayd_drops_total` by reason.
    pub relay_drops: Option<BTreeMap<String, u64>>,
    /// Packets the kernel dropped queueing them for exitd on its TUN (TUN tx dropped).
    pub tun_to_exitd_drops: Option<u64>,
    /// Packets exitd wrote to its TUN that the kernel dropped (TUN rx dropped).
    pub tun_from_exitd_drops: Option<u64>,
    /// Times the window stalled (packets written off).
    pub stalls: u64,
    /// Sampled packets that came back wrong (cell not opened, wrong addresses or payload).
    pub bad: u64,
    /// Seconds to get ready: STUN, circuits, ATTACH (exitd run).
    pub build_secs: f64,
    /// Seconds spent preparing and sealing packets (outside the measured intervals).
    pub seal_secs: f64,
    /// exitd's data path ("io_uring", "recvmmsg").
    pub datapath: String,
}

/// Sums of metric `name` by the value of `label`.
pub(super) fn by_label(m: &BTreeMap<String, f64>, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for (k, v) in m {
        if let Some(labels) = k.strip_prefix(name).and_then(|r| r.strip_prefix('{'))
            && let Some(value) = labels.split(&key).nth(1).and_then(|r| r.split('"').next())
        {
            *out.entry(value.to_string()).or_insert(0) += *v as u64;
        }
    }
    out
}

pub(super) fn report(name: &str, ctx: &Ctx, r: &DriveResult) -> ExitReport {
    let secs = r.blast_secs.max(1e-9);
    let packets_per_s = r.received_measured as f64 / secs;
    let exitd = name.starts_with("exitd");
    let losses = r.sent.saturating_sub(r.received);
    let exitd_cpu = r.exitd_user + r.exitd_sys;
    let per_packet = |secs: f64| secs / r.received_measured.max(1) as f64 * 1e6;
    ExitReport {
        name: name.to_string(),
        packets_per_s,
        gbps: packets_per_s * ctx.args.size as f64 * 8.0 / 1e9,
        p50_us: percentile(&r.latencies_ns, 0.50),
        p99_us: percentile(&r.latencies_ns, 0.99),
        max_us: r.latencies_ns.last().map_or(0.0, |&v| v as f64 / 1000.0),
        samples: r.latencies_ns.len() as u64,
        sent: r.sent,
        received: r.received,
        losses,
        loss_ratio: ratio(losses as f64, r.sent as f64),
        blast_secs: r.blast_secs,
        rounds: r.rounds,
        exitd_cpu_us_per_packet: exitd.then(|| per_packet(exitd_cpu)),
        exitd_user_us_per_packet: exitd.then(|| per_packet(r.exitd_user)),
        exitd_sys_us_per_packet: exitd.then(|| per_packet(r.exitd_sys)),
        exitd_cores: exitd.then(|| exitd_cpu / secs),
        exitd_threads: r.exitd_threads.iter().filter(|(_, s)| **s > 0.0).map(|(n, s)| (n.clone(), s / secs)).collect(),
        harness_cores: r.harness_cpu / secs,
        softirq_cores: r.softirq / secs,
        other_cores: ((r.busy - r.softirq - exitd_cpu - r.harness_cpu) / secs).max(0.0),
        idle_p50_us: percentile(&r.pings_ns, 0.50),
        idle_p99_us: percentile(&r.pings_ns, 0.99),
        pings: r.pings_ns.len() as u64,
        client_socket_drops: r.client_socket_drops,
        stalls: r.stalls,
        bad: r.bad,
        build_secs: r.build_secs,
        seal_secs: r.seal_secs,
        ..Default::default()
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "n/a".into(), |v| v.to_string())
}

pub(super) fn print_report(ctx: &Ctx, cores: usize, exit: &ExitReport, plain: &ExitReport) -> Result<()> {
    let a = &ctx.args;
    let vs_plain = ratio(exit.packets_per_s, plain.packets_per_s);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nperf exit: {} IPv4/UDP packets of {} B per run, each echoed back (round trip); exitd {} worker(s), data path {}, \
         {} circuit(s) of 1 hop; window {}; {cores} CPU core(s) shared by exitd, the load generator, the echo server and the kernel",
        a.packets, a.size, a.workers, exit.datapath, a.circuits, a.window
    )?;
    writeln!(
        out,
        "{:<24} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>19} {:>11} {:>13} {:>8} {:>8}",
        "run",
        "packets/s",
        "Gb/s ×2",
        "p50 µs",
        "p99 µs",
        "1-pkt p50",
        "1-pkt p99",
        "exitd µs/pkt (u+s)",
        "exitd cores",
        "harness cores",
        "softirq",
        "losses"
    )?;
    for r in [exit, plain] {
        let cpu = match (r.exitd_cpu_us_per_packet, r.exitd_user_us_per_packet, r.exitd_sys_us_per_packet) {
            (Some(t), Some(u), Some(s)) => format!("{t:.1} ({u:.1}+{s:.1})"),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<24} {:>10.0} {:>8.2} {:>8.0} {:>8.0} {:>10.0} {:>10.0} {:>19} {:>11} {:>13.2} {:>8.2} {:>8}",
            r.name,
            r.packets_per_s,
            r.gbps,
            r.p50_us,
            r.p99_us,
            r.idle_p50_us,
            r.idle_p99_us,
            cpu,
            r.exitd_cores.map_or_else(|| "-".into(), |v| format!("{v:.2}")),
            r.harness_cores,
            r.softirq_cores,
            r.losses
        )?;
    }
    writeln!(
        out,
        "(packets/s: round trips; Gb/s ×2: IP packet bytes in each direction; p50/p99: under load, within the window; \
         1-pkt: one packet in flight; exitd µs/pkt: exitd's CPU per round trip, user + system; softirq overlaps the \
         process times where it ran in their context)"
    )?;
    writeln!(out, "where packets were lost:")?;
    let nonzero = |m: &Option<BTreeMap<String, u64>>| match m {
        Some(m) if m.values().any(|&v| v > 0) => {
            m.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
        Some(_) => "0".into(),
        None => "n/a".into(),
    };
    writeln!(
        out,
        "  {:<24} client socket {}, exitd socket {}, relay drops {}, TUN queue to exitd {}, TUN from exitd {}, echo socket {}; \
         window stalls {}; sampled cells not opened or wrong {}",
        exit.name,
        exit.client_socket_drops,
        opt(&exit.exitd_socket_drops),
        nonzero(&exit.relay_drops),
        opt(&exit.tun_to_exitd_drops),
        opt(&exit.tun_from_exitd_drops),
        exit.echo_socket_drops,
        exit.stalls,
        exit.bad
    )?;
    writeln!(out, "  {:<24} exitd packets: {}", "", nonzero(&exit.exitd_packets))?;
    writeln!(
        out,
        "  {:<24} client socket {}, echo socket {}; window stalls {}; wrong echoes {}",
        plain.name, plain.client_socket_drops, plain.echo_socket_drops, plain.stalls, plain.bad
    )?;
    writeln!(out, "ratio:")?;
    writeln!(out, "  exitd / plain routing (packets/s)  {vs_plain:.2}")?;
    writeln!(
        out,
        "  exitd per CPU-second of its own  {:.0} round trips",
        ratio(1e6, exit.exitd_cpu_us_per_packet.unwrap_or(0.0))
    )?;
    crate::report::end(&mut out, a.json, || {
        Ok(serde_json::json!({
            "packets_per_s": exit.packets_per_s,
            "gbps": exit.gbps,
            "p50_us": exit.p50_us,
            "p99_us": exit.p99_us,
            "losses": exit.losses,
            "loss_ratio": exit.loss_ratio,
            "vs_plain": vs_plain,
            "cpu_us_per_packet": exit.exitd_cpu_us_per_packet,
            "idle_p50_us": exit.idle_p50_us,
            "idle_p99_us": exit.idle_p99_us,
            "packets": a.packets,
            "size": a.size,
            "workers": a.workers,
            "circuits": a.circuits,
            "window": a.window,
            "cores": cores,
            "exitd": serde_json::to_value(exit)?,
            "plain": serde_json::to_value(plain)?,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_label() {
        let mut m = BTreeMap::new();
        m.insert("exitd_packets_total{worker=\"0\",what=\"to_tun\"}".to_string(), 2.0);
        m.insert("exitd_packets_total{worker=\"1\",what=\"to_tun\"}".to_string(), 3.0);
        m.insert("exitd_packets_total{worker=\"1\",what=\"from_tun\"}".to_string(), 4.0);
        m.insert("exitd_sessions".to_string(), 9.0);
        let by = by_label(&m, "exitd_packets_total", "what");
        assert_eq!(by.get("to_tun"), Some(&5));
        assert_eq!(by.get("from_tun"), Some(&4));
        assert_eq!(by.len(), 2);
    }
}
