//! Fuzzes the control socket's decoders (`meshvpn::control`): the request line the daemon reads
//! from whoever connects, and the answer line `meshvpn status` reads back. Nothing may panic;
//! a request that parses re-encodes into one that parses the same; an answer that parses
//! re-encodes into one that parses, equal but for the float fields (serde_json parses floats to
//! the nearest value only within an ULP), and a status answer (alone or in a watch update)
//! displays without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::control::{Answer, Request, Status};

/// The status without its float fields, for comparing across a JSON round trip.
fn without_floats(s: &Status) -> Status {
    Status { rtt_ms: None, circuit_build_ms: None, ..s.clone() }
}

fuzz_target!(|data: &[u8]| {
    // The daemon reads at most MAX_REQUEST_LEN bytes of one line, as UTF-8.
    let Ok(line) = std::str::from_utf8(data) else { return };
    if let Ok(request) = Request::parse(line) {
        let text = serde_json::to_string(&request).expect("a request serializes");
        assert_eq!(Request::parse(&text).expect("a re-encoded request parses"), request);
    }
    if let Ok(answer) = Answer::parse(line) {
        let text = serde_json::to_string(&answer).expect("an answer serializes");
        let again = Answer::parse(&text).expect("a re-encoded answer parses");
        let same = |a: &Status, b: &Status| {
            assert_eq!(without_floats(a), without_floats(b));
            assert_eq!(a.rtt_ms.is_some(), b.rtt_ms.is_some());
            assert_eq!(a.circuit_build_ms.is_some(), b.circuit_build_ms.is_some());
            let _ = a.to_string();
        };
        match (&answer, &again) {
            (Answer::Status(a), Answer::Status(b)) => same(a, b),
            (Answer::Update(a), Answer::Update(b)) => {
                assert_eq!(a.trigger, b.trigger);
                same(&a.status, &b.status);
            }
            (Answer::Stopping, Answer::Stopping) => {}
            (Answer::Netcheck(a), Answer::Netcheck(b)) => {
                assert_eq!(
                    (a.local, a.reflexive, a.mapping, a.filtering),
                    (b.local, b.reflexive, b.mapping, b.filtering)
                );
                assert_eq!(a.probes.len(), b.probes.len());
                let _ = a.to_string();
            }
            (Answer::Error { error: a }, Answer::Error { error: b }) => assert_eq!(a, b),
            _ => panic!("the answer changed kind: {text}"),
        }
    }
});
