//! Tests of the STUN codec: RFC 5769 test vectors, round trips, error cases and properties.

use cellproto::stun::*;

use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// RFC 5769 §2.1 sample request (software "STUN test client", username "evtj:h6vY"; padding of
/// the username is three spaces, as in the RFC).
const SAMPLE_REQUEST: &str = "000100582112a442b7e7a701bc34d686fa87dfae\
    802200105354554e207465737420636c69656e74\
    002400046e0001ff\
    80290008932ff9b151263b36\
    000600096576746a3a68367659202020\
    000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2\
    80280004e57a3bcf";

/// RFC 5769 §2.2 sample IPv4 response (software "test vector", 192.0.2.1:32853).
const SAMPLE_IPV4_RESPONSE: &str = "0101003c2112a442b7e7a701bc34d686fa87dfae\
    8022000b7465737420766563746f7220\
    002000080001a147e112a643\
    000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7\
    80280004c07d4c96";

/// RFC 5769 §2.3 sample IPv6 response (software "test vector",
/// [2001:db8:1234:5678:11:2233:4455:6677]:32853).
const SAMPLE_IPV6_RESPONSE: &str = "010100482112a442b7e7a701bc34d686fa87dfae\
    8022000b7465737420766563746f7220\
    002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9\
    00080014a382954e4be67bf11784c97c8292c275bfe3ed41\
    80280004c8fb0b4c";

/// The transaction id of all three samples.
const SAMPLE_TXID: [u8; 12] = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test vector is valid hex")
}

fn samples() -> [Vec<u8>; 3] {
    [unhex(SAMPLE_REQUEST), unhex(SAMPLE_IPV4_RESPONSE), unhex(SAMPLE_IPV6_RESPONSE)]
}

fn ipv6_sample_addr() -> SocketAddr {
    "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap()
}

/// Encodes into a fresh buffer and returns the bytes.
fn encode(msg: &Message, fingerprint: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let n = msg.encode(&mut buf, fingerprint).expect("encodes");
    buf.truncate(n);
    buf
}

/// Builds raw message bytes with the given type and attributes (zero-padded), no fingerprint.
fn raw(typ: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (t, v) in attrs {
        body.extend_from_slice(&t.to_be_bytes());
        body.extend_from_slice(&(v.len() as u16).to_be_bytes());
        body.extend_from_slice(v);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(&SAMPLE_TXID);
    out.extend_from_slice(&body);
    out
}

/// Removes the FINGERPRINT attribute, whose value depends on the exact bytes.
fn without_fingerprint(mut msg: Message) -> Message {
    msg.attributes.retain(|a| !matches!(a, Attribute::Fingerprint(_)));
    msg
}

#[test]
fn rfc5769_sample_request() {
    let bytes = unhex(SAMPLE_REQUEST);
    assert_eq!(bytes.len(), 108);
    let msg = decode(&bytes).unwrap();
    assert_eq!(msg.class, Class::Request);
    assert_eq!(msg.method, METHOD_BINDING);
    assert_eq!(msg.transaction_id, SAMPLE_TXID);
    let a = &msg.attributes;
    assert_eq!(a.len(), 6);
    assert_eq!(a[0], Attribute::Software("STUN test client".into()));
    // PRIORITY and ICE-CONTROLLED (RFC 8445) are not known here: reported, not rejected.
    assert_eq!(a[1], Attribute::Unknown { typ: 0x0024, value: vec![0x6e, 0x00, 0x01, 0xff] });
    assert!(matches!(a[2], Attribute::Unknown { typ: 0x8029, .. }));
    assert_eq!(a[3], Attribute::Username(b"evtj:h6vY".to_vec()));
    assert!(matches!(a[4], Attribute::MessageIntegrity(mi) if mi[0] == 0x9a && mi[19] == 0xa2));
    assert_eq!(a[5], Attribute::Fingerprint(0xe57a_3bcf));
    assert_eq!(msg.unknown_required(), vec![0x0024]);
}

#[test]
fn rfc5769_sample_ipv4_response() {
    let msg = decode(&unhex(SAMPLE_IPV4_RESPONSE)).unwrap();
    assert_eq!(msg.class, Class::SuccessResponse);
    assert_eq!(msg.method, METHOD_BINDING);
    assert_eq!(msg.transaction_id, SAMPLE_TXID);
    assert_eq!(msg.attributes[0], Attribute::Software("test vector".into()));
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 32853);
    assert_eq!(msg.attributes[1], Attribute::XorMappedAddress(addr));
    assert_eq!(msg.reflexive_address(), Some(addr));
    assert!(matches!(msg.attributes[2], Attribute::MessageIntegrity(_)));
    assert_eq!(msg.attributes[3], Attribute::Fingerprint(0xc07d_4c96));
    assert!(msg.unknown_required().is_empty());
}

#[test]
fn rfc5769_sample_ipv6_response() {
    let msg = decode(&unhex(SAMPLE_IPV6_RESPONSE)).unwrap();
    assert_eq!(msg.class, Class::SuccessResponse);
    assert_eq!(msg.attributes[0], Attribute::Software("test vector".into()));
    assert_eq!(msg.attributes[1], Attribute::XorMappedAddress(ipv6_sample_addr()));
    assert_eq!(msg.reflexive_address(), Some(ipv6_sample_addr()));
    assert_eq!(msg.attributes[3], Attribute::Fingerprint(0xc8fb_0b4c));
}

#[test]
fn xor_mapped_address_encodes_as_in_rfc5769() {
    let v4 = unhex(SAMPLE_IPV4_RESPONSE);
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 32853);
    let ours = encode(&Message::binding_success(SAMPLE_TXID, addr), false);
    assert_eq!(&ours[..4], &[0x01, 0x01, 0x00, 0x0c]);
    assert_eq!(&ours[4..20], &v4[4..20]);
    assert_eq!(&ours[20..], &v4[36..48]);

    let v6 = unhex(SAMPLE_IPV6_RESPONSE);
    let ours = encode(&Message::binding_success(SAMPLE_TXID, ipv6_sample_addr()), false);
    assert_eq!(&ours[20..], &v6[36..60]);
}

#[test]
fn rfc5769_reencodes_to_the_same_bytes_but_padding() {
    // Our encoder pads with zeros where the samples pad with spaces; apart from those bytes and
    // the FINGERPRINT that covers them, the encoding is identical.
    for bytes in samples() {
        let msg = decode(&bytes).unwrap();
        let ours = encode(&msg, true);
        assert_eq!(ours.len(), bytes.len());
        let differing: Vec<usize> = (0..bytes.len() - 4).filter(|&i| ours[i] != bytes[i]).collect();
        assert!(differing.iter().all(|&i| bytes[i] == 0x20 && ours[i] == 0));
        assert_eq!(without_fingerprint(decode(&ours).unwrap()), without_fingerprint(msg));
    }
}

/// FINGERPRINT covers every byte before it, so a flip there is a CRC mismatch. Flips in the
/// FINGERPRINT attribute's own header are caught otherwise: a changed type is an attribute after
/// MESSAGE-INTEGRITY (rejected), a changed length runs past the end; and a USERNAME length flip
/// that would swallow MESSAGE-INTEGRITY and FINGERPRINT fails USERNAME's UTF-8 check.
#[test]
fn every_single_bit_flip_in_the_samples_is_rejected() {
    for bytes in samples() {
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                assert!(decode(&flipped).is_err(), "flip of bit {bit} in byte {i} accepted: {:?}", decode(&flipped));
            }
        }
    }
}

#[test]
fn is_stun_demux() {
    for bytes in samples() {
        assert!(is_stun(&bytes));
        let mut bad_cookie = bytes.clone();
        bad_cookie[7] ^= 0x01;
        assert!(!is_stun(&bad_cookie));
        assert!(!is_stun(&bytes[..bytes.len() - 4]));
        assert!(!is_stun(&bytes[..19]));
    }
    // A full-size datagram that would be STUN but for its first byte, as every cell's is.
    let mut cell = vec![0u8; 1452];
    cell[2..4].copy_from_slice(&1432u16.to_be_bytes());
    cell[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    cell[0] = 0x00;
    assert!(is_stun(&cell));
    for first in 0x40..=0xFFu8 {
        cell[0] = first;
        assert!(!is_stun(&cell), "first byte {first:#04x}");
        cell[1..].fill(first);
        assert!(!is_stun(&cell), "first byte {first:#04x}, filled");
        cell[1..].fill(0);
        cell[2..4].copy_from_slice(&1432u16.to_be_bytes());
        cell[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    }
    // Length field not a multiple of 4, or not the datagram's.
    let mut msg = raw(BINDING_REQUEST, &[]);
    assert!(is_stun(&msg));
    msg.extend_from_slice(&[0, 0]);
    msg[3] = 2;
    assert!(!is_stun(&msg));
    assert!(!is_stun(&[]));
}

#[test]
fn binding_request_round_trip() {
    let txid = [7u8; 12];
    let msg = Message::binding_request(txid).with(Attribute::ChangeRequest { change_ip: true, change_port: false });
    let bytes = encode(&msg, true);
    assert!(is_stun(&bytes));
    assert_eq!(&bytes[..2], &BINDING_REQUEST.to_be_bytes());
    let back = decode(&bytes).unwrap();
    assert!(matches!(back.attributes.last(), Some(Attribute::Fingerprint(_))));
    assert_eq!(without_fingerprint(back), msg);

    let plain = Message::binding_request(txid);
    let bytes = encode(&plain, false);
    assert_eq!(bytes.len(), 20);
    assert_eq!(decode(&bytes).unwrap(), plain);
}

#[test]
fn binding_success_round_trip_with_rfc5780_attributes() {
    let v4: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::42]:1".parse().unwrap();
    for reflexive in [v4, v6] {
        let msg = Message::binding_success([0xA5; 12], reflexive)
            .with(Attribute::MappedAddress(reflexive))
            .with(Attribute::ResponseOrigin("198.51.100.1:3478".parse().unwrap()))
            .with(Attribute::OtherAddress("[2001:db8::2]:3479".parse().unwrap()))
            .with(Attribute::ResponsePort(5555))
            .with(Attribute::Padding(13))
            .with(Attribute::Software("meshvpn relay".into()))
            .with(Attribute::Username(vec![1, 2, 3]))
            .with(Attribute::UnknownAttributes(vec![0x0024, 0x0027, 0x7777]))
            .with(Attribute::Unknown { typ: 0x8029, value: vec![9; 8] })
            .with(Attribute::MessageIntegrity([0x11; 20]))
            .with(Attribute::MessageIntegritySha256(vec![0x22; 32]));
        let bytes = encode(&msg, true);
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[..2], &BINDING_SUCCESS_RESPONSE.to_be_bytes());
        assert_eq!(without_fingerprint(decode(&bytes).unwrap()), msg);
        // Exact-size buffer works, one byte less does not.
        let mut exact = vec![0u8; bytes.len()];
        assert_eq!(msg.encode(&mut exact, true), Ok(bytes.len()));
        assert_eq!(exact, bytes);
        for short in 0..bytes.len() {
            let mut buf = vec![0u8; short];
            assert!(matches!(msg.encode(&mut buf, true), Err(StunError::Codec(_))));
        }
    }
}

#[test]
fn binding_error_round_trip() {
    let msg =
        Message::binding_error([3; 12], 420, "Unknown Attribute").with(Attribute::UnknownAttributes(vec![0x0003]));
    let bytes = encode(&msg, true);
    assert_eq!(&bytes[..2], &BINDING_ERROR_RESPONSE.to_be_bytes());
    // Class 4, number 20 on the wire.
    assert_eq!(&bytes[24..28], &[0, 0, 4, 20]);
    assert_eq!(without_fingerprint(decode(&bytes).unwrap()), msg);
}

#[test]
fn encode_skips_stale_fingerprints() {
    let msg = Message::binding_request([1; 12]).with(Attribute::Fingerprint(0xdead_beef));
    let bytes = encode(&msg, false);
    assert_eq!(bytes.len(), 20);
    let bytes = encode(&msg, true);
    assert_ne!(decode(&bytes).unwrap().attributes, msg.attributes);
}

#[test]
fn encode_rejects_invalid_messages() {
    let mut buf = [0u8; 4096];
    let txid = [0; 12];
    let mut msg = Message::binding_request(txid);
    msg.method = 0x1000;
    assert_eq!(msg.encode(&mut buf, false), Err(StunError::BadMethod(0x1000)));

    let msg = Message::binding_error(txid, 700, "");
    assert_eq!(msg.encode(&mut buf, false), Err(StunError::BadErrorCode(700)));

    let msg = Message::binding_request(txid).with(Attribute::Software("x".repeat(764)));
    assert!(matches!(msg.encode(&mut buf, false), Err(StunError::BadAttributeLength { typ: ATTR_SOFTWARE, .. })));

    let msg = Message::binding_request(txid).with(Attribute::Username(vec![0xff]));
    assert_eq!(msg.encode(&mut buf, false), Err(StunError::BadUtf8 { typ: ATTR_USERNAME }));

    let msg = Message::binding_request(txid)
        .with(Attribute::MessageIntegrity([0; 20]))
        .with(Attribute::Software("late".into()));
    assert_eq!(msg.encode(&mut buf, false), Err(StunError::AfterIntegrity(ATTR_SOFTWARE)));

    let msg = Message::binding_request(txid).with(Attribute::MessageIntegritySha256(vec![0; 12]));
    assert!(matches!(msg.encode(&mut buf, false), Err(StunError::BadAttributeLength { .. })));

    let mut msg = Message::binding_request(txid);
    msg.attributes = vec![Attribute::Padding(0); MAX_ATTRIBUTES];
    assert_eq!(msg.encode(&mut buf, true), Err(StunError::TooManyAttributes));
    assert!(msg.encode(&mut buf, false).is_ok());

    let msg = Message::binding_request(txid).with(Attribute::Padding(70_000));
    assert!(msg.encode(&mut vec![0; 80_000], false).is_err());
    let msg = Message::binding_request(txid).with(Attribute::Padding(40_000)).with(Attribute::Padding(40_000));
    assert_eq!(msg.encode(&mut vec![0; 90_000], false), Err(StunError::TooLong(80_008)));
}

#[test]
fn decode_errors() {
    let ok = raw(BINDING_REQUEST, &[]);
    assert!(decode(&ok).is_ok());
    assert!(matches!(decode(&ok[..19]), Err(StunError::Codec(_))));

    let mut m = ok.clone();
    m[0] = 0x40;
    assert_eq!(decode(&m), Err(StunError::NotStun(0x4001)));
    let mut m = ok.clone();
    m[4] = 0;
    assert_eq!(decode(&m), Err(StunError::BadCookie(0x0012_A442)));
    let mut m = raw(BINDING_REQUEST, &[(0x8000, &[1, 2])]);
    m[3] = 6;
    m.truncate(26);
    assert_eq!(decode(&m), Err(StunError::UnalignedLength(6)));
    let mut m = ok.clone();
    m.extend_from_slice(&[0; 4]);
    assert_eq!(decode(&m), Err(StunError::LengthMismatch { header: 0, actual: 4 }));

    // Value length past the end.
    let mut m = raw(BINDING_REQUEST, &[(ATTR_SOFTWARE, b"abcd")]);
    m[23] = 5;
    assert_eq!(decode(&m), Err(StunError::AttributeOverrun { typ: ATTR_SOFTWARE, len: 5, remaining: 4 }));

    let m = raw(BINDING_REQUEST, &[(ATTR_XOR_MAPPED_ADDRESS, &[0, 1, 0, 0])]);
    assert_eq!(decode(&m), Err(StunError::BadAttributeLength { typ: ATTR_XOR_MAPPED_ADDRESS, len: 4 }));
    let m = raw(BINDING_REQUEST, &[(ATTR_MAPPED_ADDRESS, &[0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));
    let m = raw(BINDING_REQUEST, &[(ATTR_OTHER_ADDRESS, &[0, 3, 0, 0, 1, 2, 3, 4])]);
    assert_eq!(decode(&m), Err(StunError::BadAddressFamily { typ: ATTR_OTHER_ADDRESS, family: 3 }));
    let m = raw(BINDING_REQUEST, &[(ATTR_SOFTWARE, &[0x66, 0xff])]);
    assert_eq!(decode(&m), Err(StunError::BadUtf8 { typ: ATTR_SOFTWARE }));
    let m = raw(BINDING_ERROR_RESPONSE, &[(ATTR_ERROR_CODE, &[0, 0, 4, 0xc0, 0xff])]);
    assert_eq!(decode(&m), Err(StunError::BadErrorCode(592)));
    let m = raw(BINDING_ERROR_RESPONSE, &[(ATTR_ERROR_CODE, &[0, 0, 7, 0])]);
    assert_eq!(decode(&m), Err(StunError::BadErrorCode(700)));
    let m = raw(BINDING_ERROR_RESPONSE, &[(ATTR_ERROR_CODE, &[0, 0, 4])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));
    let m = raw(BINDING_ERROR_RESPONSE, &[(ATTR_UNKNOWN_ATTRIBUTES, &[0, 1, 0])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));
    let m = raw(BINDING_REQUEST, &[(ATTR_CHANGE_REQUEST, &[0, 0, 6])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));
    let m = raw(BINDING_REQUEST, &[(ATTR_MESSAGE_INTEGRITY, &[0; 16])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));
    let m = raw(BINDING_REQUEST, &[(ATTR_MESSAGE_INTEGRITY_SHA256, &[0; 18])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));
    let m = raw(BINDING_REQUEST, &[(ATTR_USERNAME, &[b'u', 0xc0])]);
    assert_eq!(decode(&m), Err(StunError::BadUtf8 { typ: ATTR_USERNAME }));
    let m = raw(BINDING_REQUEST, &[(ATTR_USERNAME, &[b'u'; 509])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));
    assert!(decode(&raw(BINDING_REQUEST, &[(ATTR_USERNAME, &[b'u'; 508])])).is_ok());
    let m = raw(BINDING_REQUEST, &[(ATTR_SOFTWARE, &[b'a'; 764])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));

    let empty: &[u8] = &[];
    let many: Vec<(u16, &[u8])> = vec![(0x8000, empty); MAX_ATTRIBUTES + 1];
    assert_eq!(decode(&raw(BINDING_REQUEST, &many)), Err(StunError::TooManyAttributes));
    assert!(decode(&raw(BINDING_REQUEST, &many[1..])).is_ok());

    let m = raw(BINDING_REQUEST, &[(ATTR_FINGERPRINT, &[0; 4]), (ATTR_SOFTWARE, b"x")]);
    assert_eq!(decode(&m), Err(StunError::FingerprintNotLast));
    let m = raw(BINDING_REQUEST, &[(ATTR_FINGERPRINT, &[0; 3])]);
    assert!(matches!(decode(&m), Err(StunError::BadAttributeLength { .. })));
    let mut m = encode(&Message::binding_request([9; 12]), true);
    let last = m.len() - 1;
    m[last] ^= 1;
    assert!(matches!(decode(&m), Err(StunError::FingerprintMismatch { .. })));

    let m = raw(BINDING_REQUEST, &[(ATTR_MESSAGE_INTEGRITY, &[0; 20]), (0x8029, &[0; 8])]);
    assert_eq!(decode(&m), Err(StunError::AfterIntegrity(0x8029)));
    let m = raw(BINDING_REQUEST, &[(ATTR_MESSAGE_INTEGRITY_SHA256, &[0; 32]), (ATTR_MESSAGE_INTEGRITY, &[0; 20])]);
    assert_eq!(decode(&m), Err(StunError::AfterIntegrity(ATTR_MESSAGE_INTEGRITY)));
    let m = raw(BINDING_REQUEST, &[(ATTR_MESSAGE_INTEGRITY, &[0; 20]), (ATTR_MESSAGE_INTEGRITY_SHA256, &[0; 32])]);
    assert!(decode(&m).is_ok());
}

#[test]
fn lenient_where_the_rfc_says_ignore() {
    // Reserved bits in addresses and ERROR-CODE, unused CHANGE-REQUEST bits, non-zero padding.
    let m = raw(
        BINDING_ERROR_RESPONSE,
        &[
            (ATTR_MAPPED_ADDRESS, &[0xff, 1, 0, 80, 10, 0, 0, 1]),
            (ATTR_ERROR_CODE, &[0xff, 0xff, 0xfc, 99, b'x']),
            (ATTR_CHANGE_REQUEST, &[0xff, 0xff, 0xff, 0xf9]),
        ],
    );
    let msg = decode(&m).unwrap();
    assert_eq!(msg.class, Class::ErrorResponse);
    assert_eq!(
        msg.attributes,
        vec![
            Attribute::MappedAddress("10.0.0.1:80".parse().unwrap()),
            Attribute::ErrorCode { code: 499, reason: "x".into() },
            Attribute::ChangeRequest { change_ip: false, change_port: false },
        ]
    );
}

#[test]
fn class_and_method_interleaving() {
    // STUN Binding indication and TURN Allocate error response (0x0113, RFC 8656).
    let mut m = raw(0x0011, &[]);
    assert_eq!(decode(&m).unwrap().class, Class::Indication);
    m[..2].copy_from_slice(&0x0113u16.to_be_bytes());
    let msg = decode(&m).unwrap();
    assert_eq!((msg.class, msg.method), (Class::ErrorResponse, 0x003));
    assert_eq!(&encode(&msg, false)[..], &m[..]);
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

fn arb_class() -> impl Strategy<Value = Class> {
    prop_oneof![Just(Class::Request), Just(Class::Indication), Just(Class::SuccessResponse), Just(Class::ErrorResponse),]
}

/// Re-encodes a decoded message and checks it decodes to the same thing (as the fuzz target).
fn check_reencode(msg: &Message) {
    let fp = msg.attributes.iter().any(|a| matches!(a, Attribute::Fingerprint(_)));
    let mut buf = vec![0u8; 65_600];
    let n = msg.encode(&mut buf, fp).expect("a decoded message re-encodes");
    let again = decode(&buf[..n]).expect("a re-encoded message decodes");
    assert_eq!(without_fingerprint(again), without_fingerprint(msg.clone()));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let stun = is_stun(&bytes);
        if let Ok(msg) = decode(&bytes) {
            prop_assert!(stun);
            check_reencode(&msg);
        }
    }

    #[test]
    fn stun_shaped_bytes_never_panic(
        typ in 0u16..0x4000,
        attrs in proptest::collection::vec(
            (prop_oneof![0u16..0x30, 0x8020u16..0x8030], proptest::collection::vec(any::<u8>(), 0..24)),
            0..6,
        ),
    ) {
        let attrs: Vec<(u16, &[u8])> = attrs.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        let bytes = raw(typ, &attrs);
        prop_assert!(is_stun(&bytes));
        if let Ok(msg) = decode(&bytes) {
            check_reencode(&msg);
        }
    }

    #[test]
    fn random_messages_round_trip(
        class in arb_class(),
        method in 0u16..0x1000,
        txid in any::<[u8; 12]>(),
        mapped in arb_addr(),
        xor_mapped in arb_addr(),
        origin in arb_addr(),
        other in arb_addr(),
        change_ip in any::<bool>(),
        change_port in any::<bool>(),
        fingerprint in any::<bool>(),
    ) {
        let msg = Message {
            class,
            method,
            transaction_id: txid,
            attributes: vec![
                Attribute::XorMappedAddress(xor_mapped),
                Attribute::MappedAddress(mapped),
                Attribute::ResponseOrigin(origin),
                Attribute::OtherAddress(other),
                Attribute::ChangeRequest { change_ip, change_port },
            ],
        };
        let bytes = encode(&msg, fingerprint);
        prop_assert!(is_stun(&bytes));
        let back = decode(&bytes).unwrap();
        prop_assert_eq!(
            back.attributes.len(),
            msg.attributes.len() + usize::from(fingerprint)
        );
        prop_assert_eq!(without_fingerprint(back), msg);
    }
}
