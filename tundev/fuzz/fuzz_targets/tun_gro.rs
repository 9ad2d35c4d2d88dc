//! Fuzzes the TUN device's receive coalescing (`tundev::gro`), which reads IP packets that come
//! out of a circuit, i.e. from the exit or the client. Never panics, and loses, reorders or
//! invents nothing: every write is one input packet behind an empty header, or a GSO packet
//! whose payload is exactly the payloads of the next inputs, in order. Each GSO write is then
//! split again by `tundev::tso` (what an offloading TUN hands over), which must give back the
//! payloads it joined; and `tso::segment` must not panic on any frame.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tundev::VNET_HDR_LEN;
use tundev::gro::Gro;
use tundev::tso;

fuzz_target!(|data: &[u8]| {
    // Packets as u16 length + bytes, to the end of the input.
    let mut packets = Vec::new();
    let mut rest = data;
    while let [a, b, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*a, *b])).min(tail.len()).min(2000);
        packets.push(&tail[..n]);
        rest = &tail[n..];
    }
    let mut gro = Gro::default();
    let mut writes: Vec<Vec<u8>> = Vec::new();
    for p in &packets {
        gro.push(p, &mut |w| writes.push(w.to_vec()));
    }
    gro.flush(&mut |w| writes.push(w.to_vec()));

    let mut scratch = Vec::new();
    for p in &packets {
        let _ = tso::segment(p, &mut scratch, &mut |_| {});
    }
    let mut next = 0;
    for w in &writes {
        let (hdr, body) = w.split_at(VNET_HDR_LEN);
        if hdr == [0; VNET_HDR_LEN] {
            assert_eq!(body, packets[next], "a packet written unchanged");
            next += 1;
            continue;
        }
        let hdr_len = usize::from(u16::from_ne_bytes([hdr[2], hdr[3]]));
        let mut payload = &body[hdr_len..];
        let first = next;
        while !payload.is_empty() {
            let p = &packets[next][hdr_len..];
            assert!(payload.starts_with(p), "a GSO payload is the next inputs' payloads in order");
            payload = &payload[p.len()..];
            next += 1;
        }
        assert!(next - first >= 2, "a GSO write joins at least two packets");
        let mut split = Vec::new();
        tso::segment(w, &mut scratch, &mut |seg| split.extend_from_slice(&seg[hdr_len..])).expect("GSO write splits");
        assert_eq!(split, body[hdr_len..], "segmenting gives back the joined payloads");
        assert!(body.len() <= 65_535);
    }
    assert_eq!(next, packets.len(), "every packet written once");
});
