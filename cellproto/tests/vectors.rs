//! Checks the test vectors in SPEC.md ("Test vectors"): the handshake from fixed secrets, a
//! 1-hop DATA cell under the keys it derives, and a 2-hop cell before and after hop 1.
//!
//! Randomness is scripted (the bytes listed in SPEC.md, in the order the protocol draws them),
//! so the vectors can be reproduced from the spec alone. `PRINT_VECTORS=1 cargo test -p
//! cellproto --test vectors -- --nocapture` prints the computed values.

use aws_lc_rs::digest::{SHA256, digest};
use cellproto::cell::{CELL_LEN, Command};
use cellproto::crypto::Suite;
use cellproto::handshake::{ClientHandshake, ClientRequest, OnionSecret, RelayKeys, respond};
use cellproto::onion::{
    Direction, HopKeyMaterial, HopKeys, LinkKeys, forward_to_next, open_forward, payload_mut, seal_forward,
    unprotect_counter,
};
use rand_core::{CryptoRng, RngCore};
use std::collections::BTreeMap;

/// Yields the given bytes in order, then panics: every random draw is accounted for.
struct Scripted(Vec<u8>);

impl RngCore for Scripted {
    fn next_u32(&mut self) -> u32 {
        unimplemented!()
    }
    fn next_u64(&mut self) -> u64 {
        unimplemented!()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        assert!(self.0.len() >= dest.len(), "script ran out of random bytes");
        let rest = self.0.split_off(dest.len());
        dest.copy_from_slice(&self.0);
        self.0 = rest;
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for Scripted {}

fn spec_vectors() -> BTreeMap<String, String> {
    let spec = include_str!("../SPEC.md");
    let block = spec.split("```vectors\n").nth(1).expect("SPEC.md has a ```vectors block").split("```").next().unwrap();
    block
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn input(v: &BTreeMap<String, String>, name: &str) -> Vec<u8> {
    hex::decode(v.get(name).unwrap_or_else(|| panic!("SPEC.md vector {name} missing"))).unwrap()
}

fn arr(b: &[u8]) -> [u8; 32] {
    b.try_into().unwrap()
}

#[test]
fn spec_test_vectors() {
    let v = spec_vectors();
    let mut got: BTreeMap<&str, String> = BTreeMap::new();

    // Vector A: handshake, hop 1, both ends offer/have AES.
    let identity = arr(&input(&v, "A.relay_identity"));
    let onion = OnionSecret::from_bytes(&arr(&input(&v, "A.relay_onion_secret")));
    got.insert("A.relay_onion_public", hex::encode(onion.public()));
    // An independent X25519 implementation agrees on the public key.
    let dalek =
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(arr(&input(&v, "A.relay_onion_secret"))));
    assert_eq!(dalek.as_bytes(), onion.public());
    let relay = RelayKeys { identity, onion_key: *onion.public() };
    let mut client_rng = Scripted([input(&v, "A.client_x"), input(&v, "A.client_bit")].concat());
    let req = ClientRequest { hop: 1, offer_aes: true, link_secret: None };
    let hs = ClientHandshake::start(&relay, &req, &mut client_rng).unwrap();
    got.insert("A.create", hex::encode(hs.message()));
    let mut relay_rng = Scripted([input(&v, "A.relay_y"), input(&v, "A.relay_bit")].concat());
    let (reply, relay_out) = respond(&identity, &[&onion], true, hs.message(), &mut relay_rng).unwrap();
    got.insert("A.created", hex::encode(reply));
    let out = hs.finish(&reply).unwrap();
    assert_eq!(out.suite, Suite::Aes256Gcm);
    assert_eq!(
        (out.keys.fwd, out.keys.bwd, out.link_secret),
        (relay_out.keys.fwd, relay_out.keys.bwd, relay_out.link_secret)
    );
    got.insert("A.key_fwd", hex::encode(out.keys.fwd));
    got.insert("A.key_bwd", hex::encode(out.keys.bwd));
    got.insert("A.link_secret", hex::encode(out.link_secret));

    // Vector B: a 1-hop DATA cell, counter 1, under A's keys.
    let lcid = u32::from_str_radix(v.get("B.lcid").unwrap(), 16).unwrap();
    let hop = HopKeys::from_material(out.suite, &out.keys);
    let link = LinkKeys::derive(&out.link_secret);
    let data = input(&v, "B.payload");
    let mut cell = [0u8; CELL_LEN];
    payload_mut(&mut cell)[..data.len()].copy_from_slice(&data);
    seal_forward(
        &mut cell,
        std::slice::from_ref(&hop),
        std::slice::from_ref(&link),
        1,
        1,
        Command::Data,
        data.len(),
        lcid,
    )
    .unwrap();
    got.insert("B.cell_head", hex::encode(&cell[..48]));
    got.insert("B.cell_sha256", hex::encode(digest(&SHA256, &cell)));

    // Vector C: 2 hops with fixed keys (ChaCha20-Poly1305), DATA for hop 2, counter 5.
    let material = |k: &str| HopKeyMaterial {
        fwd: arr(&input(&v, &format!("C.hop{k}_fwd"))),
        bwd: arr(&input(&v, &format!("C.hop{k}_bwd"))),
    };
    let hops = [
        HopKeys::from_material(Suite::ChaCha20Poly1305, &material("1")),
        HopKeys::from_material(Suite::ChaCha20Poly1305, &material("2")),
    ];
    let links = [LinkKeys::derive(&arr(&input(&v, "C.link1"))), LinkKeys::derive(&arr(&input(&v, "C.link2")))];
    let lcid1 = u32::from_str_radix(v.get("C.lcid1").unwrap(), 16).unwrap();
    let lcid2 = u32::from_str_radix(v.get("C.lcid2").unwrap(), 16).unwrap();
    let data = input(&v, "C.payload");
    let mut cell = [0u8; CELL_LEN];
    payload_mut(&mut cell)[..data.len()].copy_from_slice(&data);
    seal_forward(&mut cell, &hops, &links, 2, 5, Command::Data, data.len(), lcid1).unwrap();
    got.insert("C.client_cell_sha256", hex::encode(digest(&SHA256, &cell)));
    let counter = unprotect_counter(&cell, links[0].header(Direction::Forward));
    assert_eq!(counter, 5);
    assert_eq!(open_forward(&mut cell, 1, &hops[0], counter).unwrap().0, Command::Relay);
    forward_to_next(&mut cell, 1, counter, &links[1], lcid2);
    got.insert("C.hop1_cell_tail", hex::encode(&cell[CELL_LEN - 34..]));
    got.insert("C.hop1_cell_sha256", hex::encode(digest(&SHA256, &cell)));
    assert_eq!(open_forward(&mut cell, 2, &hops[1], counter).unwrap(), (Command::Data, data.len()));

    if std::env::var_os("PRINT_VECTORS").is_some() {
        for (k, val) in &got {
            println!("{k} = {val}");
        }
    }
    for (k, val) in &got {
        assert_eq!(v.get(*k), Some(val), "SPEC.md vector {k} differs from the implementation");
    }
}
