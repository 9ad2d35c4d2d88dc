//! Fuzzes the hot path: cells arriving at relays (forward and backward) and at the client on a
//! real, fully built 2-hop circuit. The input is fed as a raw cell to every handler, and XORed
//! into genuine cells (sealed by the client, or by the exit) so that it reaches past the LCID,
//! the counter and the tags. Nothing may panic.
//!
//! The circuit is rebuilt for every input (handshakes are cheap next to the fuzzer's work, and
//! it keeps runs independent): the same composition as `tests/common/mod.rs`, trimmed.
#![no_main]

use cellproto::cell::{CELL_LEN, Command};
use cellproto::client::{Circuit, CircuitConfig, Event, PathHop};
use cellproto::command::{Attach, Extend, Extended, decode_destroy, decode_ping};
use cellproto::handshake::{OnionSecret, RelayKeys, respond};
use cellproto::link::{decode_create, decode_created, encode_create, encode_created};
use cellproto::onion::{payload, payload_mut};
use cellproto::relay::{HopCircuit, Link, Verdict};
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

type Cell = [u8; CELL_LEN];

const CLIENT_LCID: u32 = 0x5000_0001;
const HOP1_LCID: u32 = 0x6000_0001;
const HOP1_REPLY_LCID: u32 = 0x6000_0002;
const HOP2_LCID: u32 = 0x7000_0001;

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + i))
}

struct Relay {
    identity: [u8; 32],
    onion: OnionSecret,
}

impl Relay {
    fn new(i: u8) -> Self {
        Self { identity: [i; 32], onion: OnionSecret::from_bytes(&[i.wrapping_add(0x80); 32]) }
    }

    fn path_hop(&self, i: u16) -> PathHop {
        PathHop { keys: RelayKeys { identity: self.identity, onion_key: *self.onion.public() }, addr: addr(i) }
    }

    /// Answers a CREATE cell from `from`: the new circuit (receiving on `my_lcid`) and the CREATED.
    fn create(
        &self,
        now: Instant,
        from: SocketAddr,
        cell: &Cell,
        my_lcid: u32,
        rng: &mut ChaCha20Rng,
    ) -> (HopCircuit, Cell) {
        let (reply_lcid, hs) = decode_create(cell).expect("CREATE decodes");
        let (reply, out) = respond(&self.identity, &[&self.onion], true, hs, rng).expect("handshake");
        let circ = HopCircuit::new(&out, from, reply_lcid, my_lcid, now);
        let mut created = [0u8; CELL_LEN];
        encode_created(&mut created, reply_lcid, my_lcid, &reply, rng);
        (circ, created)
    }
}

struct Net {
    client: Circuit,
    hop1: HopCircuit,
    hop2: HopCircuit,
    rng: ChaCha20Rng,
}

/// Builds client → relay 1 → relay 2 (the exit) in memory; panics if that fails, which is a bug.
fn build(now: Instant, offer_aes: bool) -> Net {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let (r1, r2) = (Relay::new(1), Relay::new(2));
    let path = vec![r1.path_hop(1), r2.path_hop(2)];
    let config = CircuitConfig { offer_aes, ..CircuitConfig::default() };
    let mut client = Circuit::new(path, CLIENT_LCID, config, now, &mut rng).expect("circuit");

    // Hop 1: CREATE / CREATED.
    let mut cell = [0u8; CELL_LEN];
    let to = client.poll_transmit(now, &mut cell, &mut rng).expect("CREATE due");
    assert_eq!(to, addr(1));
    let (mut hop1, mut created) = r1.create(now, addr(0), &cell, HOP1_LCID, &mut rng);
    assert_eq!(client.handle_cell(now, &mut created, &mut rng), Ok(None));

    // Hop 2: EXTEND through hop 1, CREATE / CREATED between the relays, EXTENDED back.
    let to = client.poll_transmit(now, &mut cell, &mut rng).expect("EXTEND due");
    assert_eq!(to, addr(1));
    let Verdict::Deliver { cmd: Command::Extend, len } = hop1.handle_forward(now, addr(0), &mut cell) else {
        panic!("hop 1 did not take the EXTEND");
    };
    let ext = Extend::decode(payload(&cell, len)).expect("EXTEND body");
    assert_eq!(ext.target, addr(2));
    let mut create = [0u8; CELL_LEN];
    encode_create(&mut create, HOP1_REPLY_LCID, &ext.handshake, &mut rng);
    let (hop2, created) = r2.create(now, addr(1), &create, HOP2_LCID, &mut rng);
    let (responder, reply) = decode_created(&created).expect("CREATED decodes");
    hop1.set_next(Link::new(addr(2), responder, HOP1_REPLY_LCID, &ext.link_secret));
    let mut back = [0u8; CELL_LEN];
    let len = Extended { handshake: *reply }.encode(payload_mut(&mut back)).expect("EXTENDED body");
    hop1.seal_backward(now, Command::Extended, len, &mut back).expect("seal EXTENDED");
    assert_eq!(client.handle_cell(now, &mut back, &mut rng), Ok(Some(Event::Established)));
    Net { client, hop1, hop2, rng }
}

fn as_cell(data: &[u8]) -> Cell {
    let mut cell = [0u8; CELL_LEN];
    let n = data.len().min(CELL_LEN);
    cell[..n].copy_from_slice(&data[..n]);
    cell
}

fn xor_into(cell: &mut Cell, data: &[u8]) {
    for (c, d) in cell.iter_mut().zip(data) {
        *c ^= d;
    }
}

/// What a hop does with a delivered command: parse its body, as relayd would.
fn parse_delivered(cell: &Cell, cmd: Command, len: usize) {
    let body = payload(cell, len);
    assert_eq!(body.len(), len, "a delivered payload fits the cell");
    match cmd {
        Command::Extend => drop(Extend::decode(body)),
        Command::Extended => drop(Extended::decode(body)),
        Command::Destroy => drop(decode_destroy(body)),
        Command::Ping | Command::Pong => drop(decode_ping(body)),
        Command::Attach => drop(Attach::decode(body)),
        _ => {}
    }
}

fn on_verdict(cell: &Cell, v: Verdict) {
    if let Verdict::Deliver { cmd, len } = v {
        parse_delivered(cell, cmd, len);
    }
}

const COMMANDS: [Command; 10] = [
    Command::Data,
    Command::Padding,
    Command::Ping,
    Command::Extend,
    Command::Destroy,
    Command::Attach,
    Command::Relay,
    Command::Pong,
    Command::Extended,
    Command::Attached,
];

fuzz_target!(|data: &[u8]| {
    static NOW: OnceLock<Instant> = OnceLock::new();
    let now = *NOW.get_or_init(Instant::now);
    let sel = |i: usize| data.get(i).copied().unwrap_or(0);
    let mut net = build(now, sel(0) & 0x80 != 0);
    let (c0, a1, a2) = (addr(0), addr(1), addr(2));

    // 1. The input as a raw cell, at every receiver.
    let raw = as_cell(data);
    let mut cell = raw;
    let v = net.hop1.handle_forward(now, c0, &mut cell);
    on_verdict(&cell, v);
    let mut cell = raw;
    if let Verdict::Send(to) = net.hop1.handle_backward(now, a2, &mut cell) {
        // Hop 1 cannot authenticate backward cells: whatever it relays reaches the client.
        assert_eq!(to, c0);
        let _ = net.client.handle_cell(now, &mut cell, &mut net.rng);
    }
    let mut cell = raw;
    let v = net.hop2.handle_forward(now, a1, &mut cell);
    on_verdict(&cell, v);
    let mut cell = raw;
    if let Ok(Some(Event::Delivered { len, .. })) = net.client.handle_cell(now, &mut cell, &mut net.rng) {
        assert_eq!(payload(&cell, len).len(), len);
    }

    // 2. A genuine forward cell from the client (command, target hop and payload length picked
    //    by the input), with the input XORed in, through hop 1 and on to hop 2.
    //    Byte 0: bit 7 offers AES (above), bits 1..=6 pick the command, bit 0 the target hop.
    let target = 1 + usize::from(sel(0) & 1);
    let cmd = COMMANDS[usize::from((sel(0) >> 1) & 0x3F) % COMMANDS.len()];
    let len = usize::from(u16::from_be_bytes([sel(1), sel(2)]) % 1400);
    let mut cell = [0u8; CELL_LEN];
    for (i, b) in payload_mut(&mut cell).iter_mut().take(len).enumerate() {
        *b = i as u8;
    }
    if net.client.seal(target, cmd, len, &mut cell).is_ok() {
        xor_into(&mut cell, data.get(3..).unwrap_or_default());
        match net.hop1.handle_forward(now, c0, &mut cell) {
            Verdict::Send(to) => {
                assert_eq!(to, a2);
                let v = net.hop2.handle_forward(now, a1, &mut cell);
                on_verdict(&cell, v);
            }
            v => on_verdict(&cell, v),
        }
    }

    // 3. A genuine backward cell from the exit, with the input XORed in, through hop 1 to the client.
    let mut cell = [0u8; CELL_LEN];
    for (i, b) in payload_mut(&mut cell).iter_mut().take(len).enumerate() {
        *b = !(i as u8);
    }
    if net.hop2.seal_backward(now, cmd, len, &mut cell).is_ok() {
        xor_into(&mut cell, data.get(3..).unwrap_or_default());
        if let Verdict::Send(to) = net.hop1.handle_backward(now, a2, &mut cell) {
            assert_eq!(to, c0);
            if let Ok(Some(Event::Delivered { len, .. })) = net.client.handle_cell(now, &mut cell, &mut net.rng) {
                assert_eq!(payload(&cell, len).len(), len);
            }
        }
    }
});
