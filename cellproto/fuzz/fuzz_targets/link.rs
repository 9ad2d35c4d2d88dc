//! Fuzzes the link-level and command-body decoders: CREATE/CREATED cells, COOKIE answers and
//! link-control cells, and the bodies of EXTEND, EXTENDED, ATTACH, ATTACHED, DESTROY and PING.
//! No input may panic; whatever decodes must re-encode into the same bytes and decode back to
//! the same value.
#![no_main]

use cellproto::cell::{CELL_LEN, lcid};
use cellproto::command::{Attach, Attached, Extend, Extended, decode_destroy, decode_ping};
use cellproto::crypto::Suite;
use cellproto::link::{
    LinkControl, decode_cookie_reply, decode_create, decode_created, encode_create, encode_created, open_link_control,
    seal_link_control,
};
use cellproto::onion::{Direction, LinkKeys};
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

    if let Ok(c) = decode_create(&cell) {
        let (reply_lcid, hs, share) = (c.reply_lcid, *c.message, *c.share);
        let mut out = [0u8; CELL_LEN];
        encode_create(&mut out, reply_lcid, &hs, Some(&share), Some(&[3; 16]), &mut rng);
        let c2 = decode_create(&out).expect("an encoded CREATE decodes");
        assert_eq!((c2.reply_lcid, *c2.message, *c2.share), (reply_lcid, hs, share));
        assert!(cellproto::link::create_has_cookie(&out, &[3; 16]));
        // Whatever the input, it is no cookie answer to the CREATE it carries.
        let _ = decode_cookie_reply(&cell, &hs);
    }
    if let Ok(c) = decode_created(&cell) {
        let (responder, hs, share) = (c.responder_lcid, *c.message, *c.share);
        let mut out = [0u8; CELL_LEN];
        encode_created(&mut out, lcid(&cell), responder, &hs, Some(&share), &mut rng);
        assert_eq!(lcid(&out), lcid(&cell));
        let c2 = decode_created(&out).expect("an encoded CREATED decodes");
        assert_eq!((c2.responder_lcid, *c2.message, *c2.share), (responder, hs, share));
    }
    // Link control: the input under a fixed link key never opens unless it was sealed so, and a
    // sealed message opens once.
    let keys = LinkKeys::derive(&[9; 32], Suite::ChaCha20Poly1305);
    let mut last = 0;
    let _ = open_link_control(&mut cell.clone(), &keys, Direction::Forward, &mut last);
    let mut sealed = cell;
    let reason = data.first().copied().unwrap_or(0);
    seal_link_control(
        &mut sealed,
        &keys,
        Direction::Backward,
        lcid(&cell),
        5,
        LinkControl::Destroy { reason },
        &mut rng,
    );
    let mut last = 4;
    assert_eq!(
        open_link_control(&mut sealed.clone(), &keys, Direction::Backward, &mut last),
        Ok(LinkControl::Destroy { reason })
    );
    assert!(open_link_control(&mut sealed, &keys, Direction::Backward, &mut last).is_err());

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
