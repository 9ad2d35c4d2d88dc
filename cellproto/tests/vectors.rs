//! Checks the test vectors in SPEC.md ("Test vectors"): the handshake from fixed secrets, a
//! 1-hop DATA cell under the keys it derives, a 2-hop cell before and after hop 1 both ways, and
//! the secret of a link between two relays.
//!
//! Randomness is scripted (the bytes listed in SPEC.md, in the order the protocol draws them),
//! so the vectors can be reproduced from the spec alone. `PRINT_VECTORS=1 cargo test -p
//! cellproto --test vectors -- --nocapture` prints the computed values.

use aws_lc_rs::digest::{SHA256, digest};
use cellproto::cell::{CELL_LEN, Command, HEADER_LEN, layer_end};
use cellproto::crypto::Suite;
use cellproto::handshake::{ClientHandshake, ClientRequest, LinkShare, OnionSecret, RelayKeys, respond};
use cellproto::onion::{
    Direction, HopKeyMaterial, HopKeys, Layer, LinkKeys, check_link_tag, forward_to_next, open_backward, open_forward,
    payload_mut, seal_backward_command, seal_backward_relay, seal_forward, unprotect_counter,
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

fn lcid(v: &BTreeMap<String, String>, name: &str) -> u32 {
    u32::from_str_radix(v.get(name).unwrap_or_else(|| panic!("SPEC.md vector {name} missing")), 16).unwrap()
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
        (out.keys.fwd, out.keys.bwd, out.keys.pad, out.link_secret),
        (relay_out.keys.fwd, relay_out.keys.bwd, relay_out.keys.pad, relay_out.link_secret)
    );
    got.insert("A.key_fwd", hex::encode(out.keys.fwd));
    got.insert("A.key_bwd", hex::encode(out.keys.bwd));
    got.insert("A.key_pad", hex::encode(out.keys.pad));
    got.insert("A.link_secret", hex::encode(out.link_secret));

    // Vector B: a 1-hop DATA cell under A's keys.
    let hop = HopKeys::from_material(out.suite, &out.keys);
    let link = LinkKeys::derive(&out.link_secret, out.suite);
    let data = input(&v, "B.payload");
    let mut cell = [0u8; CELL_LEN];
    payload_mut(&mut cell)[..data.len()].copy_from_slice(&data);
    let n1 = lcid(&v, "B.counter");
    seal_forward(&mut cell, std::slice::from_ref(&hop), &link, &[n1], Command::Data, data.len(), lcid(&v, "B.lcid"))
        .unwrap();
    got.insert("B.cell_head", hex::encode(&cell[..48]));
    got.insert("B.cell_sha256", hex::encode(digest(&SHA256, &cell)));

    // Vector C: 2 hops with fixed keys (ChaCha20-Poly1305), DATA for hop 2.
    let material = |k: &str| HopKeyMaterial {
        fwd: arr(&input(&v, &format!("C.hop{k}_fwd"))),
        bwd: arr(&input(&v, &format!("C.hop{k}_bwd"))),
        pad: arr(&input(&v, &format!("C.hop{k}_pad"))),
    };
    let suite = Suite::ChaCha20Poly1305;
    let hops = [HopKeys::from_material(suite, &material("1")), HopKeys::from_material(suite, &material("2"))];
    let link0 = LinkKeys::derive(&arr(&input(&v, "C.link0")), suite);
    let link1 = LinkKeys::derive(&arr(&input(&v, "C.link1")), Suite::Aes256Gcm);
    let (n1, n2) = (lcid(&v, "C.n1"), lcid(&v, "C.n2"));
    let data = input(&v, "C.payload");
    let mut cell = [0u8; CELL_LEN];
    payload_mut(&mut cell)[..data.len()].copy_from_slice(&data);
    seal_forward(&mut cell, &hops, &link0, &[n1, n2], Command::Data, data.len(), lcid(&v, "C.lcid1")).unwrap();
    got.insert("C.client_cell_sha256", hex::encode(digest(&SHA256, &cell)));
    let counter = unprotect_counter(&cell, link0.header(Direction::Forward));
    assert_eq!(counter, n1);
    assert_eq!(open_forward(&mut cell, 1, &hops[0], counter).unwrap(), Layer::Relay(n2));
    forward_to_next(&mut cell, 1, &hops[0], n2, &link1, lcid(&v, "C.lcid2"));
    got.insert("C.hop1_cell_tail", hex::encode(&cell[HEADER_LEN + layer_end(2)..]));
    got.insert("C.hop1_cell_sha256", hex::encode(digest(&SHA256, &cell)));
    let counter = unprotect_counter(&cell, link1.header(Direction::Forward));
    assert_eq!(counter, n2);
    assert_eq!(open_forward(&mut cell, 2, &hops[1], counter).unwrap(), Layer::Terminal(Command::Data, data.len()));

    // Vector D: backward on C's keys: hop 2 answers, hop 1 relays, the client opens both.
    let (m1, m2) = (lcid(&v, "D.m1"), lcid(&v, "D.m2"));
    let data = input(&v, "D.payload");
    let mut cell = [0u8; CELL_LEN];
    payload_mut(&mut cell)[..data.len()].copy_from_slice(&data);
    seal_backward_command(&mut cell, 2, &hops[1], m2, Command::Data, data.len(), &link1, lcid(&v, "D.lcid_hop1"))
        .unwrap();
    got.insert("D.hop2_cell_sha256", hex::encode(digest(&SHA256, &cell)));
    let counter = unprotect_counter(&cell, link1.header(Direction::Backward));
    assert_eq!(counter, m2);
    check_link_tag(&cell, &link1, counter).unwrap();
    seal_backward_relay(&mut cell, 1, &hops[0], m1, counter, &link0, lcid(&v, "D.lcid_client")).unwrap();
    got.insert("D.hop1_cell_sha256", hex::encode(digest(&SHA256, &cell)));
    got.insert("D.hop1_link_tag", hex::encode(&cell[CELL_LEN - 16..]));
    let counter = unprotect_counter(&cell, link0.header(Direction::Backward));
    assert_eq!(counter, m1);
    check_link_tag(&cell, &link0, counter).unwrap();
    assert_eq!(open_backward(&mut cell, 1, &hops[0], m1).unwrap(), Layer::Relay(m2));
    assert_eq!(open_backward(&mut cell, 2, &hops[1], m2).unwrap(), Layer::Terminal(Command::Data, data.len()));
    assert_eq!(&cell[HEADER_LEN..HEADER_LEN + data.len()], &data[..]);

    // Vector E: the secret of a link between two relays, from the client's seed and their shares.
    let mut creator_rng = Scripted([input(&v, "E.creator_x"), input(&v, "E.creator_bit")].concat());
    let mut responder_rng = Scripted([input(&v, "E.responder_x"), input(&v, "E.responder_bit")].concat());
    let creator = LinkShare::generate(&mut creator_rng);
    let responder = LinkShare::generate(&mut responder_rng);
    let seed = arr(&input(&v, "E.seed"));
    let (c, r) = (*creator.public(), *responder.public());
    let secret = creator.finish(&r, &seed, &c, &r).unwrap();
    assert_eq!(responder.finish(&c, &seed, &c, &r).unwrap(), secret);
    got.insert("E.creator_share", hex::encode(c));
    got.insert("E.responder_share", hex::encode(r));
    got.insert("E.link_secret", hex::encode(secret));

    if std::env::var_os("PRINT_VECTORS").is_some() {
        for (k, val) in &got {
            println!("{k} = {val}");
        }
    }
    for (k, val) in &got {
        assert_eq!(v.get(*k), Some(val), "SPEC.md vector {k} differs from the implementation");
    }
}
