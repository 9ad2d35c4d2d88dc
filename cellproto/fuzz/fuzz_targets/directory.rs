//! Fuzzes directory decoding past the signatures: no input may panic, hang or allocate without
//! bound, and the parser behind the signature checks agrees with the verified path.
//!
//! A directory carries the authority's signature over the whole document and, inside it, each
//! relay's signed descriptor with its signed onion keys. Each input goes three ways:
//! 1. `decode_and_verify` under `AUTHORITY_SEED`, which signs the seeds (whose relays are signed
//!    by their own fixed keys), so mutations outside the signed parts reach the body;
//! 2. `decode_ignoring_signatures` (the `fuzzing` feature): every rule but the signatures, so
//!    mutated descriptors are parsed too; it must accept whatever (1) or (3) accepts, equally;
//! 3. the input's body re-signed by `AUTHORITY_SEED`, so the verified path parses the
//!    directory's own fields and the descriptors whose signatures survived the mutation.
//!
//! The body parser without the authority's signature (`diagnose_unverified`, which
//! the client uses to name what is wrong with a damaged file) gets the body as well.
#![no_main]

use cellproto::directory::{DIRECTORY_CONTEXT, Directory};
use cellproto::identity::{IdentityKey, RelayIdentity, SIGNATURE_LEN};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The key that signs the directory seeds (`cellproto/tests/fuzz_seeds.rs`).
const AUTHORITY_SEED: [u8; 32] = [0x44; 32];
/// The seeds' clock: 2026-01-01T01:00:00Z.
const NOW: u64 = 1_767_225_600 + 3600;

fn authority() -> &'static (RelayIdentity, IdentityKey) {
    static KEY: OnceLock<(RelayIdentity, IdentityKey)> = OnceLock::new();
    KEY.get_or_init(|| {
        let id = RelayIdentity::from_seed(&AUTHORITY_SEED);
        let public = id.public();
        (id, public)
    })
}

fuzz_target!(|data: &[u8]| {
    let (key, public) = authority();

    // 1. As received.
    let verified = Directory::decode_and_verify(data, public, NOW);

    // 2. Behind every signature.
    let unsigned = Directory::decode_ignoring_signatures(data, NOW);
    if let Ok(dir) = &verified {
        assert_eq!(unsigned.as_ref(), Ok(dir), "the verified path accepted what the parser refuses");
    }
    if let Ok(dir) = &unsigned {
        for (i, relay) in dir.relays.iter().enumerate() {
            assert!(relay.expires >= dir.expires, "relay {i} expires before the directory");
        }
        assert!(dir.relays.windows(2).all(|p| p[0].identity < p[1].identity), "relays not sorted");
    }

    // 3. The body signed by the authority.
    if let Some(body_len) = data.len().checked_sub(SIGNATURE_LEN) {
        let body = &data[..body_len];
        let _ = Directory::diagnose_unverified(body, NOW);
        let mut signed = body.to_vec();
        signed.extend_from_slice(&key.sign(DIRECTORY_CONTEXT, body));
        if let Ok(dir) = Directory::decode_and_verify(&signed, public, NOW) {
            assert_eq!(Directory::decode_ignoring_signatures(&signed, NOW), Ok(dir));
        }
    }
});
