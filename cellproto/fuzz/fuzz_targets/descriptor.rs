//! Fuzzes relay-descriptor decoding past the signatures: no input may panic, hang or allocate
//! without bound, and the parser behind the signature checks agrees with the verified path.
//!
//! A random input never carries a valid Ed25519 signature, so `decode_and_verify` alone stops
//! at the first check. Each input therefore goes three ways:
//! 1. `decode_and_verify` as is (the seeds are signed by `RELAY_SEED`, so mutations outside the
//!    signed parts, and the signature checks themselves, are exercised);
//! 2. `decode_ignoring_signatures` (the `fuzzing` feature): every rule but the signatures. What
//!    it accepts, once re-signed by a real key, must be accepted by the verified path unchanged,
//!    and re-encode to the same length (the encoding is canonical);
//! 3. the input's body re-signed by `RELAY_SEED` (its identity field overwritten to match), so
//!    the verified path parses the body too; whatever it accepts, (2) accepts identically.
//!
//! The same bytes also go to the lone onion-key certificate decoder, both ways.
#![no_main]

use cellproto::descriptor::{DESCRIPTOR_CONTEXT, RelayDescriptor};
use cellproto::identity::{OnionKeyCert, RelayIdentity, SIGNATURE_LEN, SignedOnionKeyCert};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The key that signs the descriptor seeds (`cellproto/tests/fuzz_seeds.rs`).
const RELAY_SEED: [u8; 32] = [0x52; 32];
/// The seeds' clock: 2026-01-01T01:00:00Z.
const NOW: u64 = 1_767_225_600 + 3600;

fn relay() -> &'static RelayIdentity {
    static KEY: OnceLock<RelayIdentity> = OnceLock::new();
    KEY.get_or_init(|| RelayIdentity::from_seed(&RELAY_SEED))
}

fuzz_target!(|data: &[u8]| {
    let key = relay();

    // 1. As received.
    let verified = RelayDescriptor::decode_and_verify(data, NOW);

    // 2. Behind the signatures.
    let unsigned = RelayDescriptor::decode_ignoring_signatures(data, NOW);
    if let Ok(desc) = &verified {
        assert_eq!(unsigned.as_ref(), Ok(desc), "the verified path accepted what the parser refuses");
    }
    if let Ok(desc) = &unsigned {
        // Claim every key for RELAY_SEED and sign for real: the verified path must agree.
        let mut mine = desc.clone();
        mine.identity = key.public();
        for cert in &mut mine.onion_keys {
            cert.identity = key.public();
        }
        let signed = mine.sign(key).expect("a decodable descriptor signs");
        assert_eq!(signed.len(), data.len(), "re-encoding changed the length: not canonical");
        assert_eq!(RelayDescriptor::decode_and_verify(&signed, NOW), Ok(mine));
    }

    // 3. The input's body signed by RELAY_SEED, its identity field claiming that key.
    if let Some(body_len) = data.len().checked_sub(SIGNATURE_LEN)
        && body_len >= 34
    {
        let mut body = data[..body_len].to_vec();
        body[2..34].copy_from_slice(&key.public().0);
        let sig = key.sign(DESCRIPTOR_CONTEXT, &body);
        body.extend_from_slice(&sig);
        if let Ok(desc) = RelayDescriptor::decode_and_verify(&body, NOW) {
            assert_eq!(RelayDescriptor::decode_ignoring_signatures(&body, NOW), Ok(desc));
        }
    }

    // A lone onion-key certificate goes through the same reader.
    let cert = SignedOnionKeyCert::decode_and_verify(data, NOW);
    let unsigned_cert = SignedOnionKeyCert::decode_ignoring_signature(data, NOW);
    if let Ok(c) = cert {
        assert_eq!(unsigned_cert, Ok(c));
    }
    if let Ok(c) = unsigned_cert {
        let mine = OnionKeyCert { identity: key.public(), ..c };
        let encoded = mine.sign(key).encode();
        assert_eq!(encoded.len(), data.len());
        assert_eq!(SignedOnionKeyCert::decode_and_verify(&encoded, NOW), Ok(mine));
    }
});
