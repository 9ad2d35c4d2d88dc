//! Tests of relay identities, onion-key certificates, descriptors and the directory.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use cellproto::{
    codec::CodecError,
    descriptor::{
        DESCRIPTOR_CONTEXT, DescriptorError, ExitPolicySummary, FLAG_AES_HW, FLAG_EXIT, FLAG_GUARD, RelayDescriptor,
    },
    directory::{DIRECTORY_CONTEXT, Directory, DirectoryError},
    identity::{CertError, IdentityKey, OnionKeyCert, RelayIdentity, SignedOnionKeyCert},
};

const T0: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z
const DAY: u64 = 86_400;

/// Offset of the first onion-key certificate in a descriptor (see spec/descriptors.md).
const FIRST_CERT_OFFSET: usize = 51;
const SIGNED_CERT_LEN: usize = 146;

fn id(seed: u8) -> RelayIdentity {
    RelayIdentity::from_seed(&[seed; 32])
}

fn cert(id: &RelayIdentity, key: u8, valid_after: u64, expires: u64) -> OnionKeyCert {
    OnionKeyCert { identity: id.public(), onion_key: [key; 32], valid_after, expires }
}

/// A small valid descriptor for `id`, valid for a day from `T0`.
fn desc(id: &RelayIdentity, nick: &str) -> RelayDescriptor {
    RelayDescriptor {
        identity: id.public(),
        onion_keys: vec![cert(id, 2, T0, T0 + 7 * DAY)],
        addresses: vec!["192.0.2.1:9001".parse().unwrap(), "[2001:db8::1]:9001".parse().unwrap()],
        nickname: nick.to_owned(),
        operator: "ops@example.org".to_owned(),
        bandwidth: 12_500_000,
        flags: FLAG_EXIT | FLAG_AES_HW | FLAG_GUARD,
        exit_policy: Some(ExitPolicySummary { accept: true, ports: vec![(80, 80), (443, 443), (1000, 2000)] }),
        protocol_versions: vec![1],
        published: T0,
        expires: T0 + DAY,
    }
}

fn resign(signer: &RelayIdentity, context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(&signer.sign(context, body));
    out
}

fn body_of(signed: &[u8]) -> &[u8] {
    &signed[..signed.len() - 64]
}

/// Encodes a directory body by hand, so tests can sign documents `Directory::sign` refuses.
fn raw_directory(published: u64, expires: u64, descs: &[&[u8]]) -> Vec<u8> {
    let mut b = vec![0x44, 1];
    b.extend_from_slice(&published.to_be_bytes());
    b.extend_from_slice(&expires.to_be_bytes());
    b.extend_from_slice(&u32::try_from(descs.len()).unwrap().to_be_bytes());
    for d in descs {
        b.extend_from_slice(&u16::try_from(d.len()).unwrap().to_be_bytes());
        b.extend_from_slice(d);
    }
    b
}

/// Identity seed [1; 32], onion key [2; 32], `desc(.., "meshrelay1")`; checked against
/// OpenSSL's Ed25519 as well. Also in spec/descriptors.md.
const KAT_DESCRIPTOR: &str = concat!(
    "52018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f",
    "6f5c000000006955b9000000000069570a80014b018a88e3dd7409f195fd52db",
    "2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0202020202020202020202",
    "020202020202020202020202020202020202020202000000006955b900000000",
    "00695ef38003d1d1739bef32b8bb85105710ba252750e2d0a01b7917bbcb1823",
    "3887665b951b582f75b88b519739cecc0df4b7a1ae81e7c11a495763e9a33f89",
    "0216aa62080204c000020123290620010db80000000000000000000000012329",
    "0a6d65736872656c6179310f6f7073406578616d706c652e6f72670000000000",
    "bebc20000000070100030050005001bb01bb03e807d001013f038d6c2922037a",
    "5a577974c874e9846d790aed413dfe282175a5e8972c713798feda0c5f47f02f",
    "04169ac462407e0b1f90dc23d17d2df63eda69c1f36b5303",
);

#[test]
fn known_answer_descriptor() {
    let relay = id(1);
    assert_eq!(relay.public().to_string(), "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c");
    let signed = desc(&relay, "meshrelay1").sign(&relay).unwrap();
    assert_eq!(hex::encode(&signed), KAT_DESCRIPTOR);
    let back = RelayDescriptor::decode_and_verify(&hex::decode(KAT_DESCRIPTOR).unwrap(), T0);
    assert_eq!(back.unwrap(), desc(&relay, "meshrelay1"));
}

#[test]
fn identity_basics() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let a = RelayIdentity::generate(&mut rng);
    let b = RelayIdentity::from_seed(a.seed());
    assert_eq!(a.public(), b.public());
    let debug = format!("{a:?}");
    assert!(!debug.contains(&hex::encode(a.seed())), "{debug}");
    let sig = a.sign(b"ctx", b"body");
    a.public().verify(b"ctx", b"body", &sig).unwrap();
    assert!(a.public().verify(b"ctx2", b"body", &sig).is_err());
    assert!(a.public().verify(b"ctx", b"bodz", &sig).is_err());
    let text = a.public().to_string();
    assert_eq!(text.len(), 64);
    assert_eq!(text.parse::<IdentityKey>().unwrap(), a.public());
    assert!("zz".parse::<IdentityKey>().is_err());
    assert!(format!("{:?}", a.public()).len() < 40);
}

#[test]
fn onion_cert_round_trip_and_windows() {
    let relay = id(1);
    let c = cert(&relay, 2, T0, T0 + DAY);
    let bytes = c.sign(&relay).encode();
    assert_eq!(bytes.len(), SIGNED_CERT_LEN);
    assert_eq!(SignedOnionKeyCert::decode_and_verify(&bytes, T0), Ok(c));
    assert_eq!(OnionKeyCert::decode_and_verify(&bytes, T0 + DAY - 1), Ok(c));
    let early = SignedOnionKeyCert::decode_and_verify(&bytes, T0 - 1);
    assert_eq!(early, Err(CertError::NotYetValid { valid_after: T0, now: T0 - 1 }));
    let late = SignedOnionKeyCert::decode_and_verify(&bytes, T0 + DAY).unwrap_err();
    assert!(matches!(late, CertError::Expired { .. }));
    assert!(late.to_string().contains(&format!("{}", T0 + DAY)), "{late}");

    // Signed by someone other than the identity it names.
    let forged = c.sign(&id(9)).encode();
    assert!(matches!(SignedOnionKeyCert::decode_and_verify(&forged, T0), Err(CertError::BadSignature { .. })));
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        assert!(SignedOnionKeyCert::decode_and_verify(&bad, T0).is_err(), "byte {i}");
    }
    for n in 0..bytes.len() {
        assert!(SignedOnionKeyCert::decode_and_verify(&bytes[..n], T0).is_err());
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(SignedOnionKeyCert::decode_and_verify(&long, T0), Err(CertError::Codec(CodecError::Trailing(1))));
    // Structural rules hold even under a valid signature.
    let empty = cert(&relay, 2, T0, T0).sign(&relay).encode();
    assert!(matches!(SignedOnionKeyCert::decode_and_verify(&empty, T0), Err(CertError::EmptyWindow { .. })));
    let zero = cert(&relay, 0, T0, T0 + 1).sign(&relay).encode();
    assert_eq!(SignedOnionKeyCert::decode_and_verify(&zero, T0), Err(CertError::ZeroOnionKey));
}

#[test]
fn descriptor_every_byte_is_signed() {
    let relay = id(1);
    let signed = desc(&relay, "r1").sign(&relay).unwrap();
    RelayDescriptor::decode_and_verify(&signed, T0).unwrap();
    for i in 0..signed.len() {
        for bit in 0..8 {
            let mut bad = signed.clone();
            bad[i] ^= 1 << bit;
            assert!(RelayDescriptor::decode_and_verify(&bad, T0).is_err(), "byte {i} bit {bit}");
        }
    }
    for n in 0..signed.len() {
        assert!(RelayDescriptor::decode_and_verify(&signed[..n], T0).is_err());
    }
    let mut long = signed.clone();
    long.push(0);
    assert!(RelayDescriptor::decode_and_verify(&long, T0).is_err());
    assert!(matches!(
        RelayDescriptor::decode_and_verify(&vec![0u8; 3000], T0),
        Err(DescriptorError::TooLarge { len: 3000, .. })
    ));
}

#[test]
fn descriptor_time_checks() {
    let relay = id(1);
    let signed = desc(&relay, "r1").sign(&relay).unwrap();
    assert_eq!(
        RelayDescriptor::decode_and_verify(&signed, T0 + DAY),
        Err(DescriptorError::Expired { expires: T0 + DAY, now: T0 + DAY })
    );
    assert_eq!(
        RelayDescriptor::decode_and_verify(&signed, T0 - 5),
        Err(DescriptorError::NotYetValid { published: T0, now: T0 - 5 })
    );
    // The only onion key has expired although the descriptor has not.
    let mut d = desc(&relay, "r1");
    d.onion_keys = vec![cert(&relay, 2, T0 - 10 * DAY, T0 + 60)];
    let signed = d.sign(&relay).unwrap();
    assert!(RelayDescriptor::decode_and_verify(&signed, T0).is_ok());
    assert_eq!(
        RelayDescriptor::decode_and_verify(&signed, T0 + 60),
        Err(DescriptorError::NoCurrentOnionKey { now: T0 + 60 })
    );
    // Only a not-yet-valid next key.
    d.onion_keys = vec![cert(&relay, 2, T0 + 60, T0 + DAY)];
    let signed = d.sign(&relay).unwrap();
    assert_eq!(RelayDescriptor::decode_and_verify(&signed, T0), Err(DescriptorError::NoCurrentOnionKey { now: T0 }));
}

#[test]
fn onion_key_rotation() {
    let relay = id(1);
    let mut d = desc(&relay, "r1");
    let old = cert(&relay, 2, T0 - DAY, T0 + 3600);
    let new = cert(&relay, 3, T0 + 1800, T0 + 7 * DAY);
    d.onion_keys = vec![old, new];
    let back = RelayDescriptor::decode_and_verify(&d.sign(&relay).unwrap(), T0).unwrap();
    assert_eq!(back.current_onion_key(T0), Some(&old));
    assert_eq!(back.current_onion_key(T0 + 1800), Some(&new), "newest wins");
    assert_eq!(back.current_onion_key(T0 + 3600), Some(&new));
    d.onion_keys = vec![new, old];
    assert!(matches!(d.sign(&relay), Err(DescriptorError::Invalid { .. })));
}

#[test]
fn descriptor_signing_rules() {
    let relay = id(1);
    let other = id(9);
    let good = desc(&relay, "r1");
    assert!(good.is_exit() && good.has_aes_hw() && good.is_guard());
    assert!(matches!(good.sign(&other), Err(DescriptorError::WrongSigner { .. })));

    let mut d = good.clone();
    d.onion_keys = vec![cert(&other, 2, T0, T0 + DAY)];
    assert!(matches!(d.sign(&relay), Err(DescriptorError::ForeignOnionKey { index: 0, .. })));

    let mut d = good.clone();
    d.exit_policy = None;
    assert_eq!(d.sign(&relay), Err(DescriptorError::MissingExitPolicy));
    let mut d = good.clone();
    d.flags = FLAG_GUARD;
    assert_eq!(d.sign(&relay), Err(DescriptorError::UnexpectedExitPolicy));
    d.exit_policy = None;
    assert!(d.sign(&relay).is_ok());
    let mut d = good.clone();
    d.flags |= 1 << 7;
    assert_eq!(d.sign(&relay), Err(DescriptorError::UnknownFlags(1 << 7)));

    let invalid: Vec<fn(&mut RelayDescriptor)> = vec![
        |d| d.addresses.clear(),
        |d| d.addresses.push(d.addresses[0]),
        |d| d.addresses[0].set_port(0),
        |d| d.addresses[0].set_ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        |d| d.addresses[0].set_ip("::ffff:192.0.2.1".parse().unwrap()),
        |d| d.addresses = vec![SocketAddr::V6(std::net::SocketAddrV6::new(Ipv6Addr::LOCALHOST, 1, 0, 3))],
        |d| d.addresses = vec![d.addresses[0]; 5],
        |d| d.nickname.clear(),
        |d| d.nickname = "a".repeat(20),
        |d| d.nickname = "bad-name".into(),
        |d| d.operator = "x".repeat(65),
        |d| d.operator = "a\nb".into(),
        |d| d.protocol_versions.clear(),
        |d| d.protocol_versions = vec![2, 1],
        |d| d.protocol_versions = vec![1, 1],
        |d| d.onion_keys.clear(),
        |d| d.expires = d.published,
        |d| d.exit_policy.as_mut().unwrap().ports.clear(),
        |d| d.exit_policy.as_mut().unwrap().ports = vec![(0, 5)],
        |d| d.exit_policy.as_mut().unwrap().ports = vec![(6, 5)],
        |d| d.exit_policy.as_mut().unwrap().ports = vec![(1, 5), (6, 9)],
        |d| d.exit_policy.as_mut().unwrap().ports = vec![(10, 20), (1, 5)],
        |d| d.exit_policy.as_mut().unwrap().ports = vec![(1, 5), (5, 9)],
    ];
    for (i, break_it) in invalid.iter().enumerate() {
        let mut d = good.clone();
        break_it(&mut d);
        assert!(d.sign(&relay).is_err(), "case {i}: {d:?}");
    }
}

#[test]
fn descriptor_decode_rules_under_valid_signature() {
    let relay = id(1);
    let other = id(9);
    let signed = desc(&relay, "r1").sign(&relay).unwrap();
    let body = body_of(&signed);

    // A certificate validly signed by another identity, inside a descriptor signed by ours.
    let mut b = body.to_vec();
    let foreign = cert(&other, 2, T0, T0 + DAY).sign(&other).encode();
    b[FIRST_CERT_OFFSET..FIRST_CERT_OFFSET + SIGNED_CERT_LEN].copy_from_slice(&foreign);
    assert!(matches!(
        RelayDescriptor::decode_and_verify(&resign(&relay, DESCRIPTOR_CONTEXT, &b), T0),
        Err(DescriptorError::ForeignOnionKey { index: 0, found }) if found == other.public()
    ));

    // A broken certificate signature is reported with the certificate's index.
    let mut b = body.to_vec();
    b[FIRST_CERT_OFFSET + SIGNED_CERT_LEN - 1] ^= 1;
    assert!(matches!(
        RelayDescriptor::decode_and_verify(&resign(&relay, DESCRIPTOR_CONTEXT, &b), T0),
        Err(DescriptorError::OnionKey { index: 0, error: CertError::BadSignature { .. } })
    ));

    // Trailing bytes inside the signed body.
    let mut b = body.to_vec();
    b.push(0);
    assert_eq!(
        RelayDescriptor::decode_and_verify(&resign(&relay, DESCRIPTOR_CONTEXT, &b), T0),
        Err(DescriptorError::Codec(CodecError::Trailing(1)))
    );

    // Unknown version.
    let mut b = body.to_vec();
    b[1] = 2;
    assert!(matches!(
        RelayDescriptor::decode_and_verify(&resign(&relay, DESCRIPTOR_CONTEXT, &b), T0),
        Err(DescriptorError::UnknownVersion { version: 2, .. })
    ));

    // Address family byte that is neither 4 nor 6.
    let family = FIRST_CERT_OFFSET + SIGNED_CERT_LEN + 1;
    assert_eq!(b[family], 4);
    let mut b = body.to_vec();
    b[family] = 5;
    assert!(matches!(
        RelayDescriptor::decode_and_verify(&resign(&relay, DESCRIPTOR_CONTEXT, &b), T0),
        Err(DescriptorError::Invalid { field: "address family", .. })
    ));

    // Signed with the wrong context (e.g. a directory signature) is refused.
    let wrong_ctx = resign(&relay, DIRECTORY_CONTEXT, body);
    assert!(matches!(RelayDescriptor::decode_and_verify(&wrong_ctx, T0), Err(DescriptorError::BadSignature { .. })));
}

#[test]
fn exit_policy_ports() {
    let accept = ExitPolicySummary { accept: true, ports: vec![(80, 80), (443, 443), (1000, 2000)] };
    for (port, ok) in [(0, false), (80, true), (81, false), (999, false), (1500, true)] {
        assert_eq!(accept.allows_port(port), ok, "{port}");
    }
    let reject = ExitPolicySummary { accept: false, ports: vec![(25, 25)] };
    assert!(!reject.allows_port(25) && reject.allows_port(26) && !reject.allows_port(0));
}

fn three_relays() -> Vec<Vec<u8>> {
    (1..=3u8).map(|s| desc(&id(s), &format!("r{s}")).sign(&id(s)).unwrap()).collect()
}

#[test]
fn directory_round_trip_and_lookup() {
    let auth = id(42);
    let signed = Directory::sign(&three_relays(), T0, T0 + 3600, &auth).unwrap();
    let dir = Directory::decode_and_verify(&signed, &auth.public(), T0 + 10).unwrap();
    assert_eq!((dir.published, dir.expires), (T0, T0 + 3600));
    assert_eq!(dir.relays.len(), 3);
    assert!(dir.relays.windows(2).all(|w| w[0].identity < w[1].identity));
    assert_eq!(dir.relay(&id(2).public()).unwrap().nickname, "r2");
    assert!(dir.relay(&id(4).public()).is_none());
    let empty = Directory::sign(&[], T0, T0 + 1, &auth).unwrap();
    assert!(Directory::decode_and_verify(&empty, &auth.public(), T0).unwrap().relays.is_empty());
}

#[test]
fn directory_every_byte_is_signed() {
    let auth = id(42);
    let signed = Directory::sign(&three_relays()[..2], T0, T0 + 3600, &auth).unwrap();
    for i in 0..signed.len() {
        for bit in 0..8 {
            let mut bad = signed.clone();
            bad[i] ^= 1 << bit;
            assert!(Directory::decode_and_verify(&bad, &auth.public(), T0).is_err(), "byte {i} bit {bit}");
        }
    }
    for n in 0..signed.len() {
        assert!(Directory::decode_and_verify(&signed[..n], &auth.public(), T0).is_err());
    }
}

#[test]
fn directory_authority_and_time() {
    let auth = id(42);
    let signed = Directory::sign(&three_relays(), T0, T0 + 3600, &auth).unwrap();
    assert!(matches!(
        Directory::decode_and_verify(&signed, &id(43).public(), T0),
        Err(DirectoryError::BadSignature { .. })
    ));
    let late = Directory::decode_and_verify(&signed, &auth.public(), T0 + 7200).unwrap_err();
    assert_eq!(late, DirectoryError::Expired { expires: T0 + 3600, now: T0 + 7200 });
    assert_eq!(late.to_string(), format!("directory expired at {} (now {})", T0 + 3600, T0 + 7200));
    assert!(matches!(
        Directory::decode_and_verify(&signed, &auth.public(), T0 - 1),
        Err(DirectoryError::NotYetValid { .. })
    ));
    assert!(matches!(Directory::sign(&three_relays(), T0, T0, &auth), Err(DirectoryError::EmptyWindow { .. })));
    // Every descriptor must cover the directory's whole window.
    let err = Directory::sign(&three_relays(), T0, T0 + 2 * DAY, &auth).unwrap_err();
    assert!(matches!(err, DirectoryError::RelayExpiresEarly { .. }), "{err}");
    let err = Directory::sign(&three_relays(), T0 - 1, T0 + 60, &auth).unwrap_err();
    assert!(matches!(err, DirectoryError::Relay { error: DescriptorError::NotYetValid { .. }, .. }), "{err}");
}

#[test]
fn directory_refuses_duplicates_disorder_and_bad_relays() {
    let auth = id(42);
    let relays = three_relays();
    let mut dup = relays.clone();
    dup.push(relays[1].clone());
    assert!(matches!(Directory::sign(&dup, T0, T0 + 60, &auth), Err(DirectoryError::DuplicateRelay { index: 3, .. })));

    // Hand-built documents signed by the real authority, so only the content is wrong.
    let mut sorted: Vec<&[u8]> = relays.iter().map(Vec::as_slice).collect();
    sorted.sort_by_key(|d| d[2..34].to_vec());
    let make = |descs: &[&[u8]]| resign(&auth, DIRECTORY_CONTEXT, &raw_directory(T0, T0 + 60, descs));
    let dir = make(&sorted);
    assert_eq!(Directory::decode_and_verify(&dir, &auth.public(), T0).unwrap().relays.len(), 3);
    let twice = make(&[sorted[0], sorted[1], sorted[1]]);
    assert!(matches!(
        Directory::decode_and_verify(&twice, &auth.public(), T0),
        Err(DirectoryError::DuplicateRelay { index: 2, .. })
    ));
    let swapped = make(&[sorted[1], sorted[0]]);
    assert!(matches!(
        Directory::decode_and_verify(&swapped, &auth.public(), T0),
        Err(DirectoryError::NotSorted { index: 1, .. })
    ));

    let mut broken = sorted[2].to_vec();
    let last = broken.len() - 1;
    broken[last] ^= 1;
    let bad = make(&[sorted[0], sorted[1], &broken]);
    let err = Directory::decode_and_verify(&bad, &auth.public(), T0).unwrap_err();
    assert!(
        matches!(&err, DirectoryError::Relay { index: 2, error: DescriptorError::BadSignature { .. }, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.starts_with("descriptor #2 (identity "), "{msg}");
    assert!(msg.ends_with(&format!("bad signature by relay identity {}", broken_identity(&broken))), "{msg}");

    let mut b = raw_directory(T0, T0 + 60, &sorted);
    b.push(0);
    assert!(matches!(
        Directory::decode_and_verify(&resign(&auth, DIRECTORY_CONTEXT, &b), &auth.public(), T0),
        Err(DirectoryError::Codec(CodecError::Trailing(1)))
    ));
    let mut b = raw_directory(T0, T0 + 60, &[]);
    b[18..22].copy_from_slice(&10_001u32.to_be_bytes());
    assert!(matches!(
        Directory::decode_and_verify(&resign(&auth, DIRECTORY_CONTEXT, &b), &auth.public(), T0),
        Err(DirectoryError::TooManyRelays { count: 10_001, .. })
    ));
}

fn broken_identity(desc: &[u8]) -> String {
    hex::encode(&desc[2..34])
}

// ---- property tests ----

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    let v4 = any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))).boxed();
    let v6 = any::<u128>()
        .prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
        .prop_filter("mapped", |ip| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().is_none(),
            IpAddr::V4(_) => true,
        })
        .boxed();
    (prop_oneof![v4, v6], 1..=u16::MAX)
        .prop_filter("routable", |(ip, _)| !ip.is_unspecified() && !ip.is_multicast())
        .prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn exit_policy() -> impl Strategy<Value = ExitPolicySummary> {
    (any::<bool>(), prop::collection::vec((0u32..600, 0u32..300), 1..=256)).prop_map(|(accept, steps)| {
        let mut ports = Vec::new();
        let mut next_lo = 1u32;
        for (gap, len) in steps {
            let lo = next_lo + gap;
            let hi = lo + len;
            if hi > 65_535 {
                break;
            }
            ports.push((lo as u16, hi as u16));
            next_lo = hi + 2;
        }
        ExitPolicySummary { accept, ports }
    })
}

prop_compose! {
    fn descriptor()(
        seed in any::<[u8; 32]>(),
        keys in prop::collection::vec((1u8..=255, 0u64..1000, 1u64..100_000), 1..=2),
        addrs in prop::collection::vec(socket_addr(), 1..=4),
        nickname in "[A-Za-z0-9]{1,19}",
        operator in "[^\\p{Cc}]{0,16}",
        bandwidth in any::<u64>(),
        flags in 0u32..8,
        policy in exit_policy(),
        versions in prop::collection::btree_set(any::<u8>(), 1..=32),
        published in 0u64..(u64::MAX / 2),
        lifetime in 1u64..(u64::MAX / 4),
    ) -> (RelayIdentity, RelayDescriptor) {
        let relay = RelayIdentity::from_seed(&seed);
        let mut onion_keys: Vec<OnionKeyCert> = keys
            .iter()
            .enumerate()
            .map(|(i, &(key, back, len))| OnionKeyCert {
                identity: relay.public(),
                onion_key: [key.wrapping_add(i as u8).max(1); 32],
                // The first key is current at `published`; a second one starts later.
                valid_after: published - back.min(published) + i as u64 * (back + 1),
                expires: published + len + i as u64 * (back + 1),
            })
            .collect();
        onion_keys.dedup_by(|b, a| a.onion_key == b.onion_key);
        let mut addresses = Vec::new();
        for a in addrs {
            if !addresses.contains(&a) {
                addresses.push(a);
            }
        }
        let d = RelayDescriptor {
            identity: relay.public(),
            onion_keys,
            addresses,
            nickname,
            operator,
            bandwidth,
            flags,
            exit_policy: (flags & FLAG_EXIT != 0).then_some(policy),
            protocol_versions: versions.into_iter().collect(),
            published,
            expires: published + lifetime,
        };
        (relay, d)
    }
}

proptest! {
    #[test]
    fn prop_descriptor_round_trip((relay, d) in descriptor()) {
        let signed = d.sign(&relay).unwrap();
        prop_assert!(signed.len() <= 2048);
        prop_assert_eq!(RelayDescriptor::decode_and_verify(&signed, d.published).unwrap(), d.clone());
        // Canonical: re-signing the decoded value gives the same bytes.
        let again = RelayDescriptor::decode_and_verify(&signed, d.published).unwrap().sign(&relay).unwrap();
        prop_assert_eq!(again, signed);
    }

    #[test]
    fn prop_cert_round_trip(seed in any::<[u8; 32]>(), key in any::<[u8; 32]>(), a in any::<u64>(), b in any::<u64>(), now in any::<u64>()) {
        prop_assume!(a < b && key != [0; 32]);
        let relay = RelayIdentity::from_seed(&seed);
        let c = OnionKeyCert { identity: relay.public(), onion_key: key, valid_after: a, expires: b };
        let got = SignedOnionKeyCert::decode_and_verify(&c.sign(&relay).encode(), now);
        if (a..b).contains(&now) {
            prop_assert_eq!(got, Ok(c));
        } else {
            let refused = matches!(got, Err(CertError::NotYetValid { .. } | CertError::Expired { .. }));
            prop_assert!(refused, "{:?}", got);
        }
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000), now in any::<u64>()) {
        let _ = SignedOnionKeyCert::decode_and_verify(&bytes, now);
        let _ = RelayDescriptor::decode_and_verify(&bytes, now);
        let _ = Directory::decode_and_verify(&bytes, &IdentityKey([7; 32]), now);
        let _ = Directory::diagnose_unverified(&bytes, now);
    }

    #[test]
    fn prop_resigned_garbage_never_panics(
        (relay, d) in descriptor(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        auth_seed in any::<[u8; 32]>(),
    ) {
        // Mutated bodies signed with the right keys reach the parsers behind the signatures.
        let signed = d.sign(&relay).unwrap();
        let mut body = body_of(&signed).to_vec();
        for (at, v) in &edits {
            let i = at.index(body.len());
            body[i] = *v;
        }
        let short = &body[..cut.index(body.len() + 1)];
        for b in [&body[..], short] {
            let _ = RelayDescriptor::decode_and_verify(&resign(&relay, DESCRIPTOR_CONTEXT, b), d.published);
            let auth = RelayIdentity::from_seed(&auth_seed);
            let mut dir = raw_directory(d.published, d.expires, &[&resign(&relay, DESCRIPTOR_CONTEXT, b)]);
            let i = edits[0].0.index(dir.len());
            dir[i] ^= edits[0].1;
            let _ = Directory::decode_and_verify(&resign(&auth, DIRECTORY_CONTEXT, &dir), &auth.public(), d.published);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn prop_directory_round_trip(relays in prop::collection::vec(descriptor(), 0..5), auth_seed in any::<[u8; 32]>()) {
        // Put every relay in a common window so the directory can cover it.
        let relays: Vec<(RelayIdentity, RelayDescriptor)> = relays
            .into_iter()
            .map(|(r, mut d)| {
                d.published = T0;
                d.expires = T0 + DAY;
                for c in &mut d.onion_keys {
                    c.valid_after = T0 - 10;
                    c.expires = T0 + DAY;
                }
                d.onion_keys.truncate(1);
                (r, d)
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let relays: Vec<_> = relays.into_iter().filter(|(r, _)| seen.insert(r.public())).collect();
        let signed: Vec<Vec<u8>> = relays.iter().map(|(r, d)| d.sign(r).unwrap()).collect();
        let auth = RelayIdentity::from_seed(&auth_seed);
        let doc = Directory::sign(&signed, T0, T0 + 3600, &auth).unwrap();
        let dir = Directory::decode_and_verify(&doc, &auth.public(), T0 + 100).unwrap();
        let mut want: Vec<RelayDescriptor> = relays.into_iter().map(|(_, d)| d).collect();
        want.sort_by_key(|d| d.identity);
        prop_assert_eq!(dir.relays, want);
    }
}
