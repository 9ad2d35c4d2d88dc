//! Each cryptographic wrapper (`cellproto::crypto`, and Ed25519 in `cellproto::identity`)
//! checked against values that do not come from this crate: published test vectors (RFC 8439,
//! McGrew–Viega's GCM test cases, FIPS-197, NIST SP 800-38A, RFC 5869, RFC 7748, RFC 8032), and
//! where the wrapper's nonce or block layout cannot express a published vector, values computed
//! with OpenSSL 3.0 through Python's `cryptography` (the snippet is next to each). A bug in a
//! wrapper (wrong algorithm, nonce layout, byte order, key or AAD handling) cannot pass these by
//! being consistent with itself, as the crate's own test vectors in SPEC.md could.

use cellproto::crypto::{
    HeaderKey, LayerKey, LinkMac, PadRole, Suite, X25519Secret, hkdf, mac16, open_once, open_random_nonce, seal_once,
    seal_random_nonce, verify_mac16,
};
use cellproto::identity::{IdentityKey, RelayIdentity};

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn h32(s: &str) -> [u8; 32] {
    h(s).try_into().unwrap()
}

fn h12(s: &str) -> [u8; 12] {
    h(s).try_into().unwrap()
}

// ---- ChaCha20-Poly1305 (RFC 8439) -------------------------------------------------------------

/// RFC 8439 §2.8.2, through the wrappers that take a whole 12-byte nonce (link-control cells).
#[test]
fn chacha20_poly1305_rfc8439_2_8_2() {
    let key: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
    let nonce = h12("070000004041424344454647");
    let aad = h("50515253c0c1c2c3c4c5c6c7");
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let ciphertext = h(concat!(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b",
        "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc",
        "3ff4def08e4b7a9de576d26586cec64b6116",
    ));
    let tag = h("1ae10b594f09e26a7e902ecbd0600691");

    let mut buf = plaintext.to_vec();
    assert_eq!(seal_random_nonce(&key, nonce, &aad, &mut buf).to_vec(), tag);
    assert_eq!(buf, ciphertext);
    open_random_nonce(&key, nonce, &aad, &mut buf, &tag).unwrap();
    assert_eq!(buf, plaintext);

    let mut bad = ciphertext.clone();
    bad[0] ^= 1;
    assert!(open_random_nonce(&key, nonce, &aad, &mut bad, &tag).is_err());
}

/// RFC 8439 Appendix A.5's key, AAD and text under the layer nonce for counter 0x05060708
/// (SPEC.md: nonce = 0⁶⁴ ‖ u32(counter), big-endian; A.5's own nonce has bytes no counter can
/// give). Expected value from OpenSSL:
/// `ChaCha20Poly1305(key).encrypt(bytes(8) + (0x05060708).to_bytes(4, "big"), text, aad)`.
#[test]
fn chacha20_poly1305_layer_key_rfc8439_a5_text_openssl() {
    let key = h32("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0");
    let counter = 0x0506_0708;
    let aad = h("f33388860000000000004e91");
    let plaintext = "Internet-Drafts are draft documents valid for a maximum of six months and may be \
        updated, replaced, or obsoleted by other documents at any time. It is inappropriate to use \
        Internet-Drafts as reference material or to cite them other than as /\u{201c}work in progress./\u{201d}";
    let ciphertext = h(concat!(
        "d583d9aef8b29e832966cc093628b5737b624cb6b7b8ae46fb249e4d2f3e6277af29a2c579031910165d8eb76f2528ae",
        "0e331c1efe85cb877bd47a9e6f377b0103cfef63d7d495a412c6dc754cda51f8de9dbdb49a005b77e73faa492b8d150b",
        "b833871789d461cc8cfa17efed78c27ca9b4e9db976080b4de0dc5d70ea2d46937721ea7556d9a1fdbf865a5758b9324",
        "d8b833944910faef6102c52e0296f3a65e73e632251d5fa34de1099e9ece69a4d4d32b3104ccd2d61fb433bf8ffdd242",
        "d599d645fc61170a1ffd1c3273e25f7c0ccbf4632d4c77a09e58bb3611ffadc9d561d57e5ed2032e0f0a066bcfda7731",
        "cc5e6ae49374ce258cece2ed88b76baa2c6b4511d266963509",
    ));
    let tag = h("9f7a81e7e5d28b39f2d27d1ab8c037c8");
    assert_eq!(plaintext.len(), 265);

    let layer = LayerKey::new(Suite::ChaCha20Poly1305, &key);
    let mut buf = ciphertext.clone();
    layer.open(counter, &aad, &mut buf, &tag).unwrap();
    assert_eq!(buf, plaintext.as_bytes());
    assert_eq!(layer.seal(counter, &aad, &mut buf).to_vec(), tag);
    assert_eq!(buf, ciphertext);

    // The counter is the nonce: any other counter, or other AAD, fails.
    let mut buf = ciphertext.clone();
    assert!(layer.open(counter + 1, &aad, &mut buf, &tag).is_err());
    let mut buf = ciphertext.clone();
    assert!(layer.open(0x0807_0605, &aad, &mut buf, &tag).is_err(), "counter must be big-endian");
    let mut buf = ciphertext;
    assert!(layer.open(counter, &aad[1..], &mut buf, &tag).is_err());
}

/// `seal_once` is ChaCha20-Poly1305 with the all-zero nonce. Expected value from OpenSSL:
/// `ChaCha20Poly1305(key).encrypt(bytes(12), b"handshake extensions", b"aad")`.
#[test]
fn chacha20_poly1305_seal_once_openssl() {
    let key = h32("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0");
    let expected = h("b71493bb41b73c7a5a754944d425f8b37fc77c1c4a528e6b02fccffad208b09c9d99c02b");
    let mut buf = b"handshake extensions".to_vec();
    let tag = seal_once(&key, b"aad", &mut buf);
    assert_eq!([buf.as_slice(), &tag].concat(), expected);
    open_once(&key, b"aad", &mut buf, &tag).unwrap();
    assert_eq!(buf, b"handshake extensions");
}

// ---- AES-256-GCM (McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13-16) ---

/// Test cases 13 and 14 (zero key, zero IV = layer counter 0).
#[test]
fn aes256_gcm_layer_key_mcgrew_viega_13_14() {
    let layer = LayerKey::new(Suite::Aes256Gcm, &[0; 32]);
    let mut empty = [];
    assert_eq!(layer.seal(0, b"", &mut empty).to_vec(), h("530f8afbc74536b9a963b4f1c4cb738b"));
    let mut block = [0u8; 16];
    let tag = layer.seal(0, b"", &mut block);
    assert_eq!(block.to_vec(), h("cea7403d4d606b6e074ec5d3baf39d18"));
    assert_eq!(tag.to_vec(), h("d0d1c8a799996bf0265b98b5d48ab919"));
    layer.open(0, b"", &mut block, &tag).unwrap();
    assert_eq!(block, [0; 16]);
}

/// Test case 16's key, plaintext and AAD under a layer nonce (its own IV, cafebabe…, has no
/// zero prefix, so no counter gives it). Expected value from OpenSSL:
/// `AESGCM(key).encrypt(bytes(8) + (0x89abcdef).to_bytes(4, "big"), P, A)`.
#[test]
fn aes256_gcm_layer_key_nonzero_key_and_counter_openssl() {
    let key = h32("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
    let plaintext = h(concat!(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525",
        "b16aedf5aa0de657ba637b39",
    ));
    let aad = h("feedfacedeadbeeffeedfacedeadbeefabaddad2");
    let expected = h(concat!(
        "e6f2a09fffd295351db30350d641afbf3a968bc4484f75d3b6265cbfd3c5982b3497ece0b26f9f1569a186b852f0c704",
        "bdac6ed7a29cf197f69417bb",
        "a8048bc484599e41f7aa07f8fbd3bf57",
    ));
    let layer = LayerKey::new(Suite::Aes256Gcm, &key);
    let mut buf = plaintext.clone();
    let tag = layer.seal(0x89ab_cdef, &aad, &mut buf);
    assert_eq!([buf.as_slice(), &tag].concat(), expected);
    layer.open(0x89ab_cdef, &aad, &mut buf, &tag).unwrap();
    assert_eq!(buf, plaintext);
    let mut bad_tag = tag;
    bad_tag[15] ^= 0x80;
    assert!(layer.open(0x89ab_cdef, &aad, &mut buf, &bad_tag).is_err());
}

// ---- AES-256 block (header protection and padding) -------------------------------------------

/// The mask is the first 4 bytes of one AES-256 block: FIPS-197 Appendix C.3 and the four
/// blocks of NIST SP 800-38A F.1.5 (ECB-AES256.Encrypt).
#[test]
fn aes256_block_mask_fips197_and_sp800_38a() {
    let fips = HeaderKey::new(&std::array::from_fn(|i| i as u8));
    let sample: [u8; 16] = h("00112233445566778899aabbccddeeff").try_into().unwrap();
    assert_eq!(fips.mask(&sample).to_vec(), h("8ea2b7ca"));

    let key = HeaderKey::new(&h32("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"));
    for (plain, cipher) in [
        ("6bc1bee22e409f96e93d7e117393172a", "f3eed1bdb5d2a03c064b5a7e3db181f8"),
        ("ae2d8a571e03ac9c9eb76fac45af8e51", "591ccb10d410ed26dc5ba74a31362870"),
        ("30c81c46a35ce411e5fbc1191a0a52ef", "b6ed21b99ca6f4f9f153e7b1beafed1d"),
        ("f69f2445df4f9b17ad2b417be66c3710", "23304b7a39f9f3ff067d8d8f9e24ecc7"),
    ] {
        let sample: [u8; 16] = h(plain).try_into().unwrap();
        assert_eq!(key.mask(&sample).to_vec(), h(&cipher[..8]), "block {plain}");
        // The one-call form gives the same mask.
        assert_eq!(key.mask_and_pad(&sample, 0, PadRole::Forward, &mut [0u8; 17]).to_vec(), h(&cipher[..8]));
    }
}

/// Padding block j is AES-256(key, u32(counter) ‖ u32(j) ‖ "pad" ‖ role ‖ 0⁴) (SPEC.md §3).
/// Expected value from OpenSSL, key 00..1f, counter 0x05060708, role 1 (forward), blocks 0..3:
/// `Cipher(AES(key), ECB()).encryptor().update(b"".join(c.to_bytes(4, "big") + j.to_bytes(4, "big") + b"pad\x01" + bytes(4) for j in range(3)))`.
#[test]
fn aes256_block_padding_openssl() {
    let key = HeaderKey::new(&std::array::from_fn(|i| i as u8));
    let expected = h(concat!(
        "62c7626e24183995386d13713d072d4e",
        "02b6106347b0b761280d72b1feea6031",
        "2c42780590c20f1ac62a14c0063b1b9d",
    ));
    for len in [1, 16, 17, 34, 48] {
        let mut pad = vec![0u8; len];
        key.pad(0x0506_0708, PadRole::Forward, &mut pad);
        assert_eq!(pad, expected[..len], "{len} bytes of padding");
        let mut pad2 = vec![0u8; len];
        let sample: [u8; 16] = h("00112233445566778899aabbccddeeff").try_into().unwrap();
        let mask = key.mask_and_pad(&sample, 0x0506_0708, PadRole::Forward, &mut pad2);
        assert_eq!(pad2, pad);
        assert_eq!(mask.to_vec(), h("8ea2b7ca"));
        // Another role gives other bytes for the same counter (SPEC.md §3).
        let mut other = vec![0u8; len];
        key.pad(0x0506_0708, PadRole::Client, &mut other);
        assert_ne!(other, pad);
    }
}

// ---- HKDF-SHA256 (RFC 5869 Appendix A, test cases 1-3) ---------------------------------------

/// IKM, salt, info, OKM (hex).
type HkdfCase = (Vec<u8>, Vec<u8>, Vec<u8>, &'static str);

#[test]
fn hkdf_sha256_rfc5869() {
    let cases: [HkdfCase; 3] = [
        (
            vec![0x0b; 22],
            h("000102030405060708090a0b0c"),
            h("f0f1f2f3f4f5f6f7f8f9"),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            (0x00..=0x4f).collect(),
            (0x60..=0xaf).collect(),
            (0xb0..=0xff).collect(),
            concat!(
                "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09",
                "da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87",
            ),
        ),
        (
            vec![0x0b; 22],
            vec![],
            vec![],
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ];
    for (i, (ikm, salt, info, okm)) in cases.iter().enumerate() {
        let mut out = vec![0u8; okm.len() / 2];
        hkdf(salt, ikm, info, &mut out);
        assert_eq!(hex::encode(&out), *okm, "RFC 5869 test case {}", i + 1);
    }
}

// ---- X25519 (RFC 7748) ------------------------------------------------------------------------

/// §5.2: the two single-scalar-multiplication vectors (the second's u has its top bit set, which
/// X25519 must ignore), and the iterated one after 1 and 1,000 steps.
#[test]
fn x25519_rfc7748_5_2() {
    for (scalar, u, out) in [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ] {
        let shared = X25519Secret::from_bytes(&h32(scalar)).diffie_hellman(&h32(u)).unwrap();
        assert_eq!(hex::encode(shared), out);
    }

    let (mut k, mut u) = ([0u8; 32], [0u8; 32]);
    (k[0], u[0]) = (9, 9);
    for i in 1..=1000 {
        let next = X25519Secret::from_bytes(&k).diffie_hellman(&u).unwrap();
        (k, u) = (next, k);
        if i == 1 {
            assert_eq!(hex::encode(k), "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079");
        }
    }
    assert_eq!(hex::encode(k), "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51");
}

/// §6.1: Alice's and Bob's public keys and their shared secret; a low-order peer key (whose
/// result is all zeros) is refused, as the handshake requires.
#[test]
fn x25519_rfc7748_6_1() {
    let alice = X25519Secret::from_bytes(&h32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
    let bob = X25519Secret::from_bytes(&h32("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"));
    assert_eq!(hex::encode(alice.public()), "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    assert_eq!(hex::encode(bob.public()), "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
    let shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742";
    assert_eq!(hex::encode(alice.diffie_hellman(bob.public()).unwrap()), shared);
    assert_eq!(hex::encode(bob.diffie_hellman(alice.public()).unwrap()), shared);

    let mut one = [0u8; 32];
    one[0] = 1;
    assert!(alice.diffie_hellman(&[0; 32]).is_err(), "u = 0");
    assert!(alice.diffie_hellman(&one).is_err(), "u = 1");
}

// ---- Ed25519 (RFC 8032 §7.1, tests 1-3) -------------------------------------------------------

/// Keys from the secret seeds, signatures, and verification. A signature covers
/// `context ‖ body` (identity.rs), so test 3's two-byte message is also signed split as
/// context `af` and body `82`: it must be the same signature.
#[test]
fn ed25519_rfc8032_7_1() {
    let tests = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            concat!(
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b",
                "d25bf5f0595bbe24655141438e7a100b",
            ),
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            concat!(
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c",
                "387b2eaeb4302aeeb00d291612bb0c00",
            ),
        ),
        (
            "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            concat!(
                "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc659",
                "4a7c15e9716ed28dc027beceea1ec40a",
            ),
        ),
    ];
    for (seed, public, message, signature) in tests {
        let id = RelayIdentity::from_seed(&h32(seed));
        assert_eq!(hex::encode(id.public().0), public);
        let message = h(message);
        let sig = id.sign(b"", &message);
        assert_eq!(hex::encode(sig), signature);
        let key = IdentityKey(h32(public));
        key.verify(b"", &message, &sig).unwrap();
        if let [context @ .., last] = message.as_slice() {
            assert_eq!(hex::encode(id.sign(context, &[*last])), signature, "context ‖ body");
            key.verify(context, &[*last], &sig).unwrap();
        }
        let mut bad = sig;
        bad[63] ^= 0x10;
        assert!(key.verify(b"", &message, &bad).is_err());
        assert!(key.verify(b"x", &message, &sig).is_err(), "the context is signed");
    }
}

// ---- Link tags and cookie MACs (protocol v2) -------------------------------------------------

/// The link tag is the suite's AEAD over an empty plaintext with the cell as associated data,
/// nonce 0⁶⁴ ‖ u32(counter). Expected values from OpenSSL, key 00..1f, data 00..63, counter
/// 0x01020304: `AESGCM(key).encrypt(n, b"", data)` and `ChaCha20Poly1305(key).encrypt(n, b"", data)`.
#[test]
fn link_mac_gmac_and_poly1305_openssl() {
    let key: [u8; 32] = std::array::from_fn(|i| i as u8);
    let data: Vec<u8> = (0..100).collect();
    for (suite, expected) in [
        (Suite::Aes256Gcm, "b2ef06d31a7778ce9350b19abb83926d"),
        (Suite::ChaCha20Poly1305, "3712c6a8e2560eaec777d118793495e3"),
    ] {
        let mac = LinkMac::new(suite, &key);
        let tag = mac.tag(0x0102_0304, &data);
        assert_eq!(tag.to_vec(), h(expected), "{suite:?}");
        mac.verify(0x0102_0304, &data, &tag).unwrap();
        assert!(mac.verify(0x0102_0305, &data, &tag).is_err(), "{suite:?}: the counter is the nonce");
        assert!(mac.verify(0x0102_0304, &data[1..], &tag).is_err());
    }
}

/// Cookies and the MAC a CREATE carries are HMAC-SHA256 truncated to 16 bytes. Expected value
/// from Python's hmac: `hmac.new(b"cookie key", b"message to authenticate", sha256).digest()[:16]`.
#[test]
fn mac16_hmac_sha256_python() {
    let tag = mac16(b"cookie key", b"message to authenticate");
    assert_eq!(tag.to_vec(), h("66eba8f258ebc391c0ee360adacea438"));
    assert!(verify_mac16(b"cookie key", b"message to authenticate", &tag));
    assert!(!verify_mac16(b"cookie key", b"message to authenticatE", &tag));
}
