//! Fuzzes the STUN codec: `is_stun` and `decode` must never panic, a decoded message must be
//! STUN by `is_stun`, and it must re-encode into something that decodes to the same message.
#![no_main]
use cellproto::stun::{Attribute, Message, decode, is_stun};
use libfuzzer_sys::fuzz_target;

/// Drops FINGERPRINT: its value depends on bytes (padding, reserved bits) that decoding ignores
/// and re-encoding writes as zeros.
fn without_fingerprint(mut msg: Message) -> Message {
    msg.attributes.retain(|a| !matches!(a, Attribute::Fingerprint(_)));
    msg
}

fuzz_target!(|data: &[u8]| {
    let stun = is_stun(data);
    if let Ok(msg) = decode(data) {
        assert!(stun, "decode accepted what is_stun rejects");
        let fingerprint = msg.attributes.iter().any(|a| matches!(a, Attribute::Fingerprint(_)));
        // A decoded message is at most 20 + 65535 bytes; re-encoding never grows it.
        let mut buf = vec![0u8; 20 + 65_536];
        let n = msg.encode(&mut buf, fingerprint).expect("a decoded message re-encodes");
        let again = decode(buf.get(..n).expect("encode returns a length within the buffer"))
            .expect("a re-encoded message decodes");
        assert_eq!(without_fingerprint(again), without_fingerprint(msg));
    }
});
