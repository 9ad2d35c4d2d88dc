//! Per-hop open (forward) and seal (backward) of a batch of 64 cells through the relay's batch
//! entry point, against raw aws-lc-rs AEAD over the same bytes, both suites, in the same run.
//! The relay's figure includes everything a hop does to a cell: header unprotection, replay
//! check, AEAD, padding and header protection for the next link, and backward the link tag
//! checked on arrival and written for the next link (protocol v2), which the raw AEAD does not.
//!
//! `cargo bench -p cellproto --bench onion`; ratios: `python3 cellproto/benches/ratios.py`.

use aws_lc_rs::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use cellproto::cell::{BODY_LEN, CELL_LEN, Command, HEADER_LEN, layer_end, layer_plaintext_len};
use cellproto::crypto::TAG_LEN;
use cellproto::onion::payload_mut;
use cellproto::relay::{Incoming, Verdict, process_batch};
use cellproto::sim::*;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const BATCH: usize = 64;
/// The measured hop: the middle of a 3-hop circuit.
const HOP: usize = 2;

fn suites() -> [(&'static str, bool); 2] {
    [("aes-256-gcm", true), ("chacha20-poly1305", false)]
}

fn raw_key(aes: bool) -> LessSafeKey {
    let alg = if aes { &AES_256_GCM } else { &CHACHA20_POLY1305 };
    LessSafeKey::new(UnboundKey::new(alg, &[7u8; 32]).unwrap())
}

fn nonce(i: u32) -> Nonce {
    let mut n = [0u8; 12];
    n[8..].copy_from_slice(&i.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Benchmarks hop 2 (`net.relays[1]`) handling a batch of cells from `from`, made fresh for
/// every iteration by `arrive` (outside the measurement): the relay's batch entry point, whose
/// every verdict must be to send the cell on.
fn bench_hop2(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    net: &std::cell::RefCell<Net>,
    from: std::net::SocketAddr,
    arrive: impl Fn(&mut Net) -> Vec<Cell>,
) {
    g.bench_function(format!("cellproto/{name}"), |b| {
        b.iter_batched_ref(
            || arrive(&mut net.borrow_mut()),
            |cells| {
                let mut batch: Vec<Incoming<'_>> = cells.iter_mut().map(|cell| Incoming { from, cell }).collect();
                let mut verdicts = [Verdict::Drop(cellproto::relay::DropReason::Malformed); BATCH];
                let net = &mut *net.borrow_mut();
                process_batch(net.relays[1].node.circuits_mut(), net.now, &mut batch, &mut verdicts);
                debug_assert!(verdicts.iter().all(|v| matches!(v, Verdict::Send(_))));
                black_box(&verdicts);
            },
            BatchSize::SmallInput,
        )
    });
}

fn forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward_open_batch64");
    g.throughput(Throughput::Bytes((BATCH * CELL_LEN) as u64));
    for (name, aes) in suites() {
        let mut net = Net::new(3, 1, |_| aes);
        net.build();
        // Setup and routine both need the network, never at the same time.
        let net = std::cell::RefCell::new(net);
        // The cells as they arrive at hop 2: sealed by the client, relayed by hop 1.
        let arrive_at_hop2 = |net: &mut Net| -> Vec<Cell> {
            (0..BATCH)
                .map(|_| {
                    let (_, mut cell) = net.seal(&[0x5A; 1200]);
                    net.relays[0].handle(net.now, addr(CLIENT), &mut cell).pop().unwrap().1
                })
                .collect()
        };
        bench_hop2(&mut g, name, &net, addr(1), arrive_at_hop2);
        // Raw AEAD: open the same number of bytes with the same AAD length, nothing else.
        let key = raw_key(aes);
        let ct_len = layer_plaintext_len(HOP);
        let aad_len = BODY_LEN - layer_end(HOP);
        let mut n = 0u32;
        g.bench_function(format!("raw_aead/{name}"), |b| {
            b.iter_batched_ref(
                || {
                    (0..BATCH)
                        .map(|_| {
                            n += 1;
                            let mut cell = [0u8; CELL_LEN];
                            let (body, aad) = cell[HEADER_LEN..].split_at_mut(ct_len + TAG_LEN);
                            let tag = key
                                .seal_in_place_separate_tag(nonce(n), Aad::from(&aad[..aad_len]), &mut body[..ct_len])
                                .unwrap();
                            body[ct_len..].copy_from_slice(tag.as_ref());
                            (n, cell)
                        })
                        .collect::<Vec<_>>()
                },
                |cells| {
                    for (n, cell) in cells.iter_mut() {
                        let (body, aad) = cell[HEADER_LEN..].split_at_mut(ct_len + TAG_LEN);
                        let (ct, tag) = body.split_at_mut(ct_len);
                        key.open_in_place_separate_tag(nonce(*n), Aad::from(&aad[..aad_len]), tag, ct).unwrap();
                    }
                    black_box(&cells);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn backward(c: &mut Criterion) {
    let mut g = c.benchmark_group("backward_seal_batch64");
    g.throughput(Throughput::Bytes((BATCH * CELL_LEN) as u64));
    for (name, aes) in suites() {
        let mut net = Net::new(3, 2, |_| aes);
        net.build();
        let net = std::cell::RefCell::new(net);
        let exit_lcid = net.borrow().relays[2].node.circuits().iter().next().unwrap().prev().lcid_in;
        // The cells as they arrive at hop 2 from the exit.
        let arrive_from_exit = |net: &mut Net| -> Vec<Cell> {
            (0..BATCH)
                .map(|_| {
                    let mut cell = [0u8; CELL_LEN];
                    payload_mut(&mut cell)[..1200].fill(0xA5);
                    let circ = net.relays[2].node.circuits_mut().get_mut(exit_lcid).unwrap();
                    circ.seal_backward(net.now, Command::Data, 1200, &mut cell).unwrap();
                    cell
                })
                .collect()
        };
        bench_hop2(&mut g, name, &net, addr(3), arrive_from_exit);
        let key = raw_key(aes);
        let pt_len = layer_plaintext_len(HOP);
        let mut n = 0u32;
        g.bench_function(format!("raw_aead/{name}"), |b| {
            b.iter_batched_ref(
                || vec![[0xA5u8; CELL_LEN]; BATCH],
                |cells| {
                    for cell in cells.iter_mut() {
                        n += 1;
                        let body = &mut cell[HEADER_LEN..];
                        let tag = key.seal_in_place_separate_tag(nonce(n), Aad::empty(), &mut body[..pt_len]).unwrap();
                        body[pt_len..pt_len + TAG_LEN].copy_from_slice(tag.as_ref());
                    }
                    black_box(&cells);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = forward, backward
}
criterion_main!(benches);
