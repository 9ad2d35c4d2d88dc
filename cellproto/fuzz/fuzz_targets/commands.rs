//! Fuzzes every command body a hop decodes from a cell (`cellproto::command`): EXTEND, EXTENDED,
//! ATTACH, ATTACHED, DESTROY and PING/PONG. No input may panic; whatever decodes must re-encode
//! into the same bytes (the formats are canonical and trailing bytes are refused) and decode
//! back to the same value.
#![no_main]

use cellproto::codec::CodecError;
use cellproto::command::{Attach, Attached, Extend, Extended, decode_destroy, decode_ping};
use libfuzzer_sys::fuzz_target;

/// Re-encodes a decoded body and checks that it round-trips to the input.
fn roundtrip<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    value: &T,
    encode: impl Fn(&T, &mut [u8]) -> Result<usize, CodecError>,
    decode: impl Fn(&[u8]) -> Result<T, CodecError>,
) {
    let mut buf = vec![0u8; data.len() + 64];
    let n = encode(value, &mut buf).expect("a decoded body re-encodes");
    assert_eq!(&buf[..n], data, "encoding is not canonical for {value:?}");
    assert_eq!(decode(&buf[..n]).as_ref(), Ok(value));
    // Too small a buffer is an error, not a panic.
    if n > 0 {
        assert!(encode(value, &mut buf[..n - 1]).is_err(), "{value:?} encoded into {} bytes", n - 1);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = Extend::decode(data) {
        assert_ne!(v.target.port(), 0, "EXTEND to port 0");
        roundtrip(data, &v, Extend::encode, Extend::decode);
    }
    if let Ok(v) = Extended::decode(data) {
        roundtrip(data, &v, Extended::encode, Extended::decode);
    }
    if let Ok(v) = Attach::decode(data) {
        roundtrip(data, &v, Attach::encode, Attach::decode);
    }
    if let Ok(v) = Attached::decode(data) {
        assert!(v.ipv4.1 <= 32 && v.ipv6.1 <= 128, "prefix out of range: {v:?}");
        roundtrip(data, &v, Attached::encode, Attached::decode);
    }
    if let Ok(reason) = decode_destroy(data) {
        assert_eq!(data, [reason]);
    }
    if let Ok(id) = decode_ping(data) {
        assert_eq!(data, id.to_be_bytes());
    }
});
