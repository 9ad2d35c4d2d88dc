//! Fuzzes relay-descriptor decoding: no input may panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cellproto::descriptor::RelayDescriptor::decode_and_verify(data, 1_800_000_000);
    // A lone onion-key certificate goes through the same reader.
    let _ = cellproto::identity::SignedOnionKeyCert::decode_and_verify(data, 1_800_000_000);
});
