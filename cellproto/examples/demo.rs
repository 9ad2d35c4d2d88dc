//! A whole meshvpn circuit in one process: a client and `--hops` relays built from cellproto's
//! sans-IO pieces (the same control plane and per-circuit state relayd runs), traffic through
//! it both ways, and a report. No sockets: datagrams are handed from node to node in memory, so
//! the figures are the protocol's own cost per cell on this machine.
//!
//! `cargo run --release -p cellproto --example demo -- [--hops N] [--cells N]`

use cellproto::cell::{Command, payload_capacity};
use cellproto::sim::Net;
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number, got {v}")))
        .unwrap_or(default)
}

fn main() {
    let hops = arg("--hops", 3);
    let cells = arg("--cells", 20_000);
    assert!((1..=cellproto::cell::MAX_HOPS).contains(&hops), "--hops must be 1..={}", cellproto::cell::MAX_HOPS);

    let mut net = Net::new(hops, 42, |_| cellproto::crypto::local_aes_hw());
    let build = Instant::now();
    net.build();
    let build_time = build.elapsed();

    let size = payload_capacity(hops).min(1280);
    let packet = vec![0x45u8; size];
    let start = Instant::now();
    for _ in 0..cells {
        net.send(&packet);
    }
    let elapsed = start.elapsed();
    let delivered = net.relays[hops - 1].terminal.delivered.len();
    let echoed = net
        .events
        .iter()
        .filter(|(e, _)| matches!(e, cellproto::client::Event::Delivered { cmd: Command::Data, .. }))
        .count();
    let drops: usize = net.relays.iter().map(|r| r.drops.len()).sum::<usize>() + net.client_drops;
    let cell_ops = (cells * 2 * (hops + 1)) as f64; // every cell is handled by every node, both ways
    println!("meshvpn protocol demo: client + {hops} relays in one process (no sockets)");
    println!("  suites           {:?}", net.circuit.suites().iter().map(|s| s.name()).collect::<Vec<_>>());
    println!(
        "  circuit build    {:.0} µs (CPU cost of {hops} handshakes, no network RTT)",
        build_time.as_secs_f64() * 1e6
    );
    println!("  packets          {cells} × {size} B sent, {delivered} delivered at the exit, {echoed} echoed back");
    println!("  drops            {drops}");
    println!(
        "  throughput       {:.2} Gb/s of IP packets each way, single thread, all hops on one core",
        (cells * size * 8) as f64 / elapsed.as_secs_f64() / 1e9
    );
    println!("  per cell per hop {:.0} ns", elapsed.as_secs_f64() * 1e9 / cell_ops);
    assert_eq!(delivered, cells, "packets lost");
    assert_eq!(echoed, cells, "replies lost");
}
