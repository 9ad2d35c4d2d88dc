//! Onion layers, header protection and link tags: the per-cell operations, in place on a
//! caller's buffer.
//!
//! Forward (client → exit): the client chooses a counter sequence per hop, seals one layer per
//! hop, innermost first, and puts each layer's counter inside the layer around it. Hop `i`
//! removes header protection (its incoming link's counter is its own layer's counter), opens its
//! layer — authenticating the padding the previous node wrote as associated data — then
//! overwrites its tag, the inner counter and everything after with its own padding and writes
//! the inner counter into the next link's header. So every byte is checked by the next hop and
//! no value crosses two links unchanged.
//!
//! Backward (exit → client): each hop seals what it sends under its own layer with its own
//! outgoing counter, puts the counter it received (the inner layer's) inside its plaintext, and
//! appends a link tag that the receiving hop checks before it changes any state. The client
//! opens layer after layer, each with the counter the layer around it carried, until a command
//! that is not [`Command::Relay`].
//!
//! Nothing here allocates or copies a payload; every function works on one `[u8; CELL_LEN]`.

use crate::cell::{
    BODY_LEN, CELL_LEN, COUNTER_LEN, Command, HEADER_LEN, INNER_COUNTER_LEN, LCID_LEN, LEN_FIELD, LINK_TAG_LEN,
    MAX_HOPS, ONION_LEN, SAMPLE_LEN, layer_end, layer_plaintext_len, payload_capacity, set_lcid,
};
use crate::crypto::{CryptoError, HeaderKey, KEY_LEN, LayerKey, LinkMac, PadRole, Suite, TAG_LEN, hkdf};
use thiserror::Error;
use zeroize::Zeroize;

/// Label that separates this protocol version's key derivations from any other use of HKDF.
pub(crate) const PROTOID: &[u8] = b"meshvpn-cellproto-v2";

/// Why a layer could not be opened or a payload placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LayerError {
    /// The tag did not verify: the cell was modified, forged, or is for another circuit.
    #[error("authentication failed")]
    BadTag,
    /// The command byte is not one this version knows.
    #[error("unknown command byte {0:#04x}")]
    UnknownCommand(u8),
    /// The length field of a terminal command exceeds what the layer can hold.
    #[error("payload length {len} exceeds capacity {capacity}")]
    BadLength {
        /// Claimed length.
        len: usize,
        /// What fits at this hop.
        capacity: usize,
    },
    /// The payload given to a sealing function does not fit.
    #[error("payload of {len} bytes does not fit (capacity {capacity})")]
    TooLong {
        /// Given length.
        len: usize,
        /// What fits at this hop.
        capacity: usize,
    },
    /// A hop index outside 1..=MAX_HOPS, or counters for a different number of hops.
    #[error("hop index {0} out of range")]
    BadHop(usize),
    /// The key sealed its last allowed cell ([`crate::cell::CELL_LIMIT`]): rebuild the circuit.
    #[error("key usage limit reached")]
    KeyLimit,
}

impl From<CryptoError> for LayerError {
    fn from(_: CryptoError) -> Self {
        LayerError::BadTag
    }
}

/// One hop's keys, both directions, derived by the handshake with the client.
#[derive(Debug)]
pub struct HopKeys {
    fwd: LayerKey,
    bwd: LayerKey,
    /// Forward padding this hop writes after opening its layer; the client knows it, so the
    /// next hop's layer authenticates that padding as associated data.
    pad: HeaderKey,
}

impl HopKeys {
    /// Builds the keys from the handshake's key material (SPEC.md, "Key schedule").
    pub fn from_material(suite: Suite, m: &HopKeyMaterial) -> Self {
        Self { fwd: LayerKey::new(suite, &m.fwd), bwd: LayerKey::new(suite, &m.bwd), pad: HeaderKey::new(&m.pad) }
    }

    /// The negotiated AEAD suite.
    pub fn suite(&self) -> Suite {
        self.fwd.suite()
    }
}

/// Raw key material of one hop (zeroed when dropped).
pub struct HopKeyMaterial {
    /// Forward AEAD key.
    pub fwd: [u8; KEY_LEN],
    /// Backward AEAD key.
    pub bwd: [u8; KEY_LEN],
    /// Forward padding key.
    pub pad: [u8; KEY_LEN],
}

impl Drop for HopKeyMaterial {
    fn drop(&mut self) {
        self.fwd.zeroize();
        self.bwd.zeroize();
        self.pad.zeroize();
    }
}

/// The keys of one link (both directions), derived from a 32-byte link secret that only the
/// two ends of the link know: header protection each way, the backward link tag, and the
/// link-control key.
pub struct LinkKeys {
    fwd_hp: HeaderKey,
    bwd_hp: HeaderKey,
    bwd_mac: LinkMac,
    control: [u8; KEY_LEN],
}

impl LinkKeys {
    /// Derives the link's keys from its secret (SPEC.md §3); `suite` is the AEAD of its tags.
    pub fn derive(link_secret: &[u8; KEY_LEN], suite: Suite) -> Self {
        let mut okm = [0u8; 4 * KEY_LEN];
        hkdf(PROTOID, link_secret, b"link keys", &mut okm);
        let part =
            |i: usize| -> [u8; KEY_LEN] { okm[i * KEY_LEN..(i + 1) * KEY_LEN].try_into().unwrap_or([0; KEY_LEN]) };
        let mut mac = part(2);
        let keys = Self {
            fwd_hp: HeaderKey::new(&part(0)),
            bwd_hp: HeaderKey::new(&part(1)),
            bwd_mac: LinkMac::new(suite, &mac),
            control: part(3),
        };
        mac.zeroize();
        okm.zeroize();
        keys
    }

    /// Header key for cells travelling in `dir` on this link.
    pub fn header(&self, dir: Direction) -> &HeaderKey {
        match dir {
            Direction::Forward => &self.fwd_hp,
            Direction::Backward => &self.bwd_hp,
        }
    }

    pub(crate) fn control_key(&self) -> &[u8; KEY_LEN] {
        &self.control
    }
}

impl Drop for LinkKeys {
    fn drop(&mut self) {
        self.control.zeroize();
    }
}

impl std::fmt::Debug for LinkKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKeys(..)")
    }
}

/// Which way a cell travels on a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → exit.
    Forward,
    /// Exit → client.
    Backward,
}

/// What an opened layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Not for this hop: the inner layer follows, sealed under this counter.
    Relay(u32),
    /// A command for this hop with a payload of this length at the start of the body.
    Terminal(Command, usize),
}

fn sample(cell: &[u8; CELL_LEN]) -> &[u8; SAMPLE_LEN] {
    // The body is longer than a sample, so this conversion always succeeds.
    cell[HEADER_LEN..HEADER_LEN + SAMPLE_LEN].try_into().unwrap_or_else(|_| unreachable!())
}

fn write_header(cell: &mut [u8; CELL_LEN], lcid: u32, counter: u32, mask: [u8; COUNTER_LEN]) {
    set_lcid(cell, lcid);
    let protected = counter ^ u32::from_be_bytes(mask);
    cell[LCID_LEN..HEADER_LEN].copy_from_slice(&protected.to_be_bytes());
}

/// Writes the LCID and the counter protected with `key`. Call when the body is final: the mask
/// depends on its first bytes.
pub fn protect_header(cell: &mut [u8; CELL_LEN], key: &HeaderKey, lcid: u32, counter: u32) {
    let mask = key.mask(sample(cell));
    write_header(cell, lcid, counter, mask);
}

/// Recovers the counter from a received cell's header.
pub fn unprotect_counter(cell: &[u8; CELL_LEN], key: &HeaderKey) -> u32 {
    let mask = key.mask(sample(cell));
    let mut raw = [0u8; COUNTER_LEN];
    raw.copy_from_slice(&cell[LCID_LEN..HEADER_LEN]);
    u32::from_be_bytes(raw) ^ u32::from_be_bytes(mask)
}

fn body(cell: &mut [u8; CELL_LEN]) -> &mut [u8] {
    &mut cell[HEADER_LEN..]
}

fn check_hop(hop: usize) -> Result<(), LayerError> {
    if (1..=MAX_HOPS).contains(&hop) { Ok(()) } else { Err(LayerError::BadHop(hop)) }
}

/// Writes the length field and command byte that end a terminal layer plaintext at `hop`.
/// The payload must already be at the start of the body.
fn write_trailer(cell: &mut [u8; CELL_LEN], hop: usize, cmd: Command, len: usize) -> Result<(), LayerError> {
    check_hop(hop)?;
    let capacity = payload_capacity(hop);
    if len > capacity {
        return Err(LayerError::TooLong { len, capacity });
    }
    let end = layer_plaintext_len(hop);
    let b = body(cell);
    // Zero the gap so stale buffer contents never travel, even encrypted.
    b[len..end - 1 - LEN_FIELD].fill(0);
    b[end - 1 - LEN_FIELD..end - 1].copy_from_slice(&(len as u16).to_be_bytes());
    b[end - 1] = cmd as u8;
    Ok(())
}

/// Writes the inner layer's counter and RELAY at the end of hop `hop`'s plaintext.
fn write_relay_trailer(cell: &mut [u8; CELL_LEN], hop: usize, inner: u32) {
    let end = layer_plaintext_len(hop);
    let b = body(cell);
    b[end - 1 - INNER_COUNTER_LEN..end - 1].copy_from_slice(&inner.to_be_bytes());
    b[end - 1] = Command::Relay as u8;
}

/// Reads what an opened layer holds.
fn read_trailer(cell: &[u8; CELL_LEN], hop: usize) -> Result<Layer, LayerError> {
    let end = layer_plaintext_len(hop);
    let b = &cell[HEADER_LEN..];
    let byte = b[end - 1];
    let cmd = Command::from_byte(byte).ok_or(LayerError::UnknownCommand(byte))?;
    if cmd == Command::Relay {
        let mut inner = [0u8; INNER_COUNTER_LEN];
        inner.copy_from_slice(&b[end - 1 - INNER_COUNTER_LEN..end - 1]);
        return Ok(Layer::Relay(u32::from_be_bytes(inner)));
    }
    let len = usize::from(u16::from_be_bytes([b[end - 3], b[end - 2]]));
    let capacity = payload_capacity(hop);
    if len > capacity {
        return Err(LayerError::BadLength { len, capacity });
    }
    Ok(Layer::Terminal(cmd, len))
}

/// Opens hop `hop`'s layer in place with `key`, the rest of the body as associated data or none.
fn open_layer(
    cell: &mut [u8; CELL_LEN],
    hop: usize,
    key: &LayerKey,
    counter: u32,
    with_aad: bool,
) -> Result<Layer, LayerError> {
    check_hop(hop)?;
    let pt_len = layer_plaintext_len(hop);
    let (layer, rest) = body(cell).split_at_mut(layer_end(hop));
    let (ct, tag) = layer.split_at_mut(pt_len);
    let aad: &[u8] = if with_aad { rest } else { &[] };
    key.open(counter, aad, ct, tag)?;
    read_trailer(cell, hop)
}

/// Relay side, forward: opens hop `hop`'s layer in place with the counter of the incoming link.
/// For [`Layer::Relay`] call [`forward_to_next`] before sending the cell on.
pub fn open_forward(cell: &mut [u8; CELL_LEN], hop: usize, keys: &HopKeys, counter: u32) -> Result<Layer, LayerError> {
    open_layer(cell, hop, &keys.fwd, counter, true)
}

/// Relay side, forward: after [`open_forward`] returned [`Layer::Relay`] with `next_counter`,
/// overwrites what this hop opened (inner counter, command, tag, old padding and link tag) with
/// its padding and writes the header for the next link (`next`, the next hop's `lcid`).
pub fn forward_to_next(
    cell: &mut [u8; CELL_LEN],
    hop: usize,
    keys: &HopKeys,
    next_counter: u32,
    next: &LinkKeys,
    lcid: u32,
) {
    keys.pad.pad(next_counter, PadRole::Forward, &mut body(cell)[layer_end(hop + 1)..]);
    protect_header(cell, next.header(Direction::Forward), lcid, next_counter);
}

/// Client side, forward: seals a terminal command for hop `counters.len()` through every layer
/// and writes the header for the first link. `counters[j]` is the counter of hop `j + 1`'s
/// layer (and of the link into it); `link0` are the keys of the client's own link. The payload
/// (`len` bytes) must already be at the start of the body.
pub fn seal_forward(
    cell: &mut [u8; CELL_LEN],
    hops: &[HopKeys],
    link0: &LinkKeys,
    counters: &[u32],
    cmd: Command,
    len: usize,
    lcid: u32,
) -> Result<(), LayerError> {
    let target = counters.len();
    if target == 0 || target > hops.len() {
        return Err(LayerError::BadHop(target));
    }
    write_trailer(cell, target, cmd, len)?;
    let mut aad = [0u8; BODY_LEN - layer_end(MAX_HOPS)];
    for hop in (1..=target).rev() {
        let keys = &hops[hop - 1];
        let counter = counters[hop - 1];
        if hop < target {
            write_relay_trailer(cell, hop, counters[hop]);
        }
        // The padding the previous node will have written after this layer is its AAD: hop
        // `hop - 1`'s forward padding, or, before hop 1, the client's own in the link-tag slot.
        let aad = &mut aad[..BODY_LEN - layer_end(hop)];
        if hop == 1 {
            keys.pad.pad(counter, PadRole::Client, aad);
            body(cell)[ONION_LEN..].copy_from_slice(aad);
        } else {
            hops[hop - 2].pad.pad(counter, PadRole::Forward, aad);
        }
        let pt_len = layer_plaintext_len(hop);
        let b = body(cell);
        let tag = keys.fwd.seal(counter, aad, &mut b[..pt_len]);
        b[pt_len..pt_len + TAG_LEN].copy_from_slice(&tag);
    }
    protect_header(cell, link0.header(Direction::Forward), lcid, counters[0]);
    Ok(())
}

/// Backward, on receipt from the neighbour on `link`: checks the link tag of a cell whose
/// counter was recovered as `counter`. Call before anything is committed.
pub fn check_link_tag(cell: &[u8; CELL_LEN], link: &LinkKeys, counter: u32) -> Result<(), LayerError> {
    let (covered, tag) = cell.split_at(CELL_LEN - LINK_TAG_LEN);
    link.bwd_mac.verify(counter, covered, tag).map_err(|_| LayerError::BadTag)
}

/// Hop side, backward: seals a terminal command whose payload (`len` bytes) is already at the
/// start of the body, under this hop's outgoing `counter`, and writes padding, header and link
/// tag for the previous link (`prev`, the previous node's `lcid`).
#[allow(clippy::too_many_arguments)]
pub fn seal_backward_command(
    cell: &mut [u8; CELL_LEN],
    hop: usize,
    keys: &HopKeys,
    counter: u32,
    cmd: Command,
    len: usize,
    prev: &LinkKeys,
    lcid: u32,
) -> Result<(), LayerError> {
    write_trailer(cell, hop, cmd, len)?;
    seal_backward_layer(cell, hop, keys, counter, prev, lcid);
    Ok(())
}

/// Relay side, backward: seals the inner cell from the next hop (received with link counter
/// `inner`, already checked by [`check_link_tag`]) under this hop's layer with its outgoing
/// `counter`, and writes padding, header and link tag for the previous link.
pub fn seal_backward_relay(
    cell: &mut [u8; CELL_LEN],
    hop: usize,
    keys: &HopKeys,
    counter: u32,
    inner: u32,
    prev: &LinkKeys,
    lcid: u32,
) -> Result<(), LayerError> {
    check_hop(hop)?;
    write_relay_trailer(cell, hop, inner);
    seal_backward_layer(cell, hop, keys, counter, prev, lcid);
    Ok(())
}

fn seal_backward_layer(
    cell: &mut [u8; CELL_LEN],
    hop: usize,
    keys: &HopKeys,
    counter: u32,
    prev: &LinkKeys,
    lcid: u32,
) {
    let pt_len = layer_plaintext_len(hop);
    let b = body(cell);
    let tag = keys.bwd.seal(counter, &[], &mut b[..pt_len]);
    b[pt_len..pt_len + TAG_LEN].copy_from_slice(&tag);
    // Padding up to the link tag (nothing at hop 1, whose layer fills the onion area), then the
    // header, then the tag over all of it.
    let mut s = [0u8; SAMPLE_LEN];
    s.copy_from_slice(sample(cell));
    let mask = prev.bwd_hp.mask_and_pad(&s, counter, PadRole::Backward, &mut body(cell)[layer_end(hop)..ONION_LEN]);
    write_header(cell, lcid, counter, mask);
    let (covered, slot) = cell.split_at_mut(CELL_LEN - LINK_TAG_LEN);
    slot.copy_from_slice(&prev.bwd_mac.tag(counter, covered));
}

/// Client side, backward: opens hop `hop`'s layer with the counter the layer around it carried
/// (for hop 1, the link counter).
pub fn open_backward(cell: &mut [u8; CELL_LEN], hop: usize, keys: &HopKeys, counter: u32) -> Result<Layer, LayerError> {
    open_layer(cell, hop, &keys.bwd, counter, false)
}

/// The payload region of a cell: where a sender writes, and a receiver reads, a terminal payload.
pub fn payload(cell: &[u8; CELL_LEN], len: usize) -> &[u8] {
    &cell[HEADER_LEN..HEADER_LEN + len.min(ONION_LEN)]
}

/// Mutable payload region, for writing a payload in place before sealing.
pub fn payload_mut(cell: &mut [u8; CELL_LEN]) -> &mut [u8] {
    &mut cell[HEADER_LEN..HEADER_LEN + ONION_LEN]
}
