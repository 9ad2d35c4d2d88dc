//! Fuzzes the link-level and command-body decoders: CREATE/CREATED cells and the bodies of
//! EXTEND, EXTENDED, ATTACH, ATTACHED, DESTROY and PING. No input may panic; whatever decodes
//! must re-encode into the same bytes and decode back to the same value.
#![no_main]

use cellproto::cell::{CELL_LEN, lcid};
use cellproto::command::{Attach, Attached, Extend, Extended, decode_destroy, decode_ping};
use cellproto::link::{decode_create, decode_created, encode_create, encode_created};
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Re-encodes a decoded command body and checks it round-trips. The body formats are
/// canonical and the decoders reject trailing bytes, so the encoding must be the input itself.
fn roundtrip<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    value: T,
    encode: impl Fn(&T, &mut [u8]) -> Result<usize, cellproto::codec::CodecError>,
    decode: impl Fn(&[u8]) -> Result<T, cellproto::codec::CodecError>,
) {
    let mut buf = vec![0u8; data.len() + 64];
    let n = encode(&value, &mut buf).expect("a decoded body re-encodes");
    assert_eq!(&buf[..n], data, "encoding is not canonical for {value:?}");
    let again = decode(&buf[..n]).expect("a re-encoded body decodes");
    assert_eq!(again, value);
}

fuzz_target!(|data: &[u8]| {
    let mut rng = ChaCha20Rng::seed_from_u64(0);

    // Link-level cells: exactly CELL_LEN bytes.
    let mut cell = [0u8; CELL_LEN];
    let n = data.len().min(CELL_LEN);
    cell[..n].copy_from_slice(&data[..n]);

    if let Ok((reply_lcid, hs)) = decode_create(&cell) {
        let hs = *hs;
        let mut out = [0u8; CELL_LEN];
        encode_create(&mut out, reply_lcid, &hs, &mut rng);
        let (r2, hs2) = decode_create(&out).expect("an encoded CREATE decodes");
        assert_eq!((r2, *hs2), (reply_lcid, hs));
    }
    if let Ok((responder, hs)) = decode_created(&cell) {
        let hs = *hs;
        let mut out = [0u8; CELL_LEN];
        encode_created(&mut out, lcid(&cell), responder, &hs, &mut rng);
        assert_eq!(lcid(&out), lcid(&cell));
        let (r2, hs2) = decode_created(&out).expect("an encoded CREATED decodes");
        assert_eq!((r2, *hs2), (responder, hs));
    }

    // Command bodies: the raw input.
    if let Ok(v) = Extend::decode(data) {
        roundtrip(data, v, Extend::encode, Extend::decode);
    }
    if let Ok(v) = Extended::decode(data) {
        roundtrip(data, v, Extended::encode, Extended::decode);
    }
    if let Ok(v) = Attach::decode(data) {
        roundtrip(data, v, Attach::encode, Attach::decode);
    }
    if let Ok(v) = Attached::decode(data) {
        roundtrip(data, v, Attached::encode, Attached::decode);
    }
    if let Ok(reason) = decode_destroy(data) {
        assert_eq!(data, [reason]);
        assert_eq!(decode_destroy(&[reason]), Ok(reason));
    }
    if let Ok(id) = decode_ping(data) {
        assert_eq!(data, id.to_be_bytes());
        assert_eq!(decode_ping(&id.to_be_bytes()), Ok(id));
    }
});
