//! Fuzzes directory decoding: the signed path (which mostly stops at the signature check) and
//! the body parser behind it, reached directly so the fuzzer can explore it.
#![no_main]

use cellproto::directory::Directory;
use cellproto::identity::IdentityKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Directory::decode_and_verify(data, &IdentityKey([7u8; 32]), 1_800_000_000);
    let _ = Directory::decode_unverified_for_fuzzing(data, 1_800_000_000);
});
