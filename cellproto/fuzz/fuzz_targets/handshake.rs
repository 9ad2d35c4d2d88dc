//! Fuzzes both ends of the circuit handshake: the relay's `respond` on an arbitrary CREATE
//! message, and the client's `finish` on an arbitrary CREATED reply, each also on a genuine
//! message with the input XORed in (to get past the tags). Nothing may panic.
#![no_main]

use cellproto::handshake::{
    CREATE_LEN, CREATED_LEN, ClientHandshake, ClientRequest, LinkShare, OnionSecret, RelayKeys, respond,
};
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const IDENTITY: [u8; 32] = [0x11; 32];
const ONION: [u8; 32] = [0x22; 32];
const OLD_ONION: [u8; 32] = [0x33; 32];

/// The first `N` bytes of `data`, zero-padded.
fn prefix<const N: usize>(data: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    out
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

fuzz_target!(|data: &[u8]| {
    let onion = OnionSecret::from_bytes(&ONION);
    let old = OnionSecret::from_bytes(&OLD_ONION);
    let relay = RelayKeys { identity: IDENTITY, onion_key: *onion.public() };
    let mut rng = ChaCha20Rng::seed_from_u64(1);

    // Relay side, raw bytes (both the single-key and the rotation path).
    let msg: [u8; CREATE_LEN] = prefix(data);
    let _ = respond(&IDENTITY, &[&onion], true, &msg, &mut rng);
    let _ = respond(&IDENTITY, &[&old, &onion], false, &msg, &mut rng);

    // Client side, raw bytes.
    let req = ClientRequest { hop: 1, offer_aes: true, link_secret: None };
    let Ok(client) = ClientHandshake::start(&relay, &req, &mut rng) else { return };
    let reply: [u8; CREATED_LEN] = prefix(data);
    let _ = client.finish(&reply);

    // Genuine messages with the input XORed in; the first bytes also pick the client's request,
    // so the relay parses validly sealed but odd extensions (hop 0, hop > 8, link secrets).
    let hop = data.first().copied().unwrap_or(1);
    let flags = data.get(1).copied().unwrap_or(0);
    let link_secret = (flags & 1 != 0).then_some([0x44; 32]);
    let req = ClientRequest { hop, offer_aes: flags & 2 != 0, link_secret };
    let Ok(client) = ClientHandshake::start(&relay, &req, &mut rng) else { return };
    let mut msg = *client.message();
    xor_into(&mut msg, data.get(2..).unwrap_or_default());
    let Ok((mut reply, out)) = respond(&IDENTITY, &[&old, &onion], flags & 4 != 0, &msg, &mut rng) else { return };
    assert_eq!(out.hop, hop);
    if msg == *client.message() {
        // An untouched exchange completes, and both ends agree.
        let mine = client.finish(&reply).expect("a genuine reply is accepted");
        assert_eq!(mine.suite, out.suite);
        // The relay holds the link secret the client chose (hops > 1) or the derived one (hop 1).
        // The client's own output always carries the derived one: `Circuit` keeps the chosen
        // secret itself, so only hop 1 can be compared here.
        match link_secret {
            Some(chosen) => assert_eq!(out.link_secret, chosen),
            None => assert_eq!(mine.link_secret, out.link_secret),
        }
        assert_eq!(mine.hop, out.hop);
        assert_eq!((mine.keys.fwd, mine.keys.bwd, mine.keys.pad), (out.keys.fwd, out.keys.bwd, out.keys.pad));
    }
    // A relay-to-relay link share against an arbitrary peer share (low-order points included).
    let share = LinkShare::generate(&mut rng);
    let peer: [u8; 32] = prefix(data.get(3..).unwrap_or_default());
    if let Ok(secret) = share.finish(&peer, &[0x55; 32], share.public(), &peer) {
        assert_ne!(secret, [0u8; 32]);
    }
    let tail = data.get(2 + CREATE_LEN..).unwrap_or_default();
    xor_into(&mut reply, tail);
    let _ = client.finish(&reply);
});
