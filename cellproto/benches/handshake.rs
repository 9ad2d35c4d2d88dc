//! Handshakes per second, client and relay side, and the X25519 comparison the crypto choice
//! rests on: a relay's per-handshake X25519 work (one keygen, two DH) with aws-lc-rs against
//! x25519-dalek, in the same run.
//!
//! `cargo bench -p cellproto --bench handshake`

use cellproto::crypto::X25519Secret;
use cellproto::handshake::{ClientHandshake, ClientRequest, OnionSecret, RelayKeys, respond};
use criterion::{Criterion, criterion_group, criterion_main};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use std::hint::black_box;

fn handshakes(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let identity = [9u8; 32];
    let onion = OnionSecret::generate(&mut rng);
    let relay = RelayKeys { identity, onion_key: *onion.public() };
    let req = ClientRequest { hop: 1, offer_aes: true, link_secret: None };
    let mut g = c.benchmark_group("handshake");
    g.bench_function("client_start", |b| b.iter(|| ClientHandshake::start(&relay, &req, &mut rng).unwrap()));
    let hs = ClientHandshake::start(&relay, &req, &mut rng).unwrap();
    g.bench_function("relay_respond", |b| {
        b.iter(|| respond(&identity, &[&onion], true, hs.message(), &mut rng).unwrap())
    });
    let (reply, _) = respond(&identity, &[&onion], true, hs.message(), &mut rng).unwrap();
    g.bench_function("client_finish", |b| b.iter(|| hs.finish(black_box(&reply)).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("x25519_relay_keygen_plus_2dh");
    let mut peer = [0u8; 32];
    rng.fill_bytes(&mut peer);
    let peer_public = *X25519Secret::from_bytes(&peer).public();
    let static_secret = X25519Secret::from_bytes(&[3u8; 32]);
    g.bench_function("aws-lc-rs", |b| {
        b.iter(|| {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            let eph = X25519Secret::from_bytes(&s);
            let a = eph.diffie_hellman(&peer_public).unwrap();
            let b2 = static_secret.diffie_hellman(&peer_public).unwrap();
            black_box((a, b2, eph.public()[0]))
        })
    });
    let dalek_static = x25519_dalek::StaticSecret::from([3u8; 32]);
    let dalek_peer = x25519_dalek::PublicKey::from(peer_public);
    g.bench_function("x25519-dalek", |b| {
        b.iter(|| {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            let eph = x25519_dalek::StaticSecret::from(s);
            let public = x25519_dalek::PublicKey::from(&eph);
            let a = eph.diffie_hellman(&dalek_peer);
            let b2 = dalek_static.diffie_hellman(&dalek_peer);
            black_box((a.to_bytes(), b2.to_bytes(), public.as_bytes()[0]))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = handshakes
}
criterion_main!(benches);
