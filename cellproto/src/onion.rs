//! Onion layers and header protection: the per-cell operations, in place on a caller's buffer.
//!
//! Forward (client → exit): the client seals one layer per hop, innermost first, each with the
//! counter as nonce. Hop `i` removes header protection, opens its layer — authenticating the
//! padding the previous hop wrote as associated data — then overwrites its tag and everything
//! after it with its own padding, so the cell keeps its size and no byte crosses two links
//! unchanged. Backward (exit → client): each hop seals the inner cell under its layer and pads;
//! the client opens layer after layer until a command that is not [`Command::Relay`].
//!
//! Nothing here allocates or copies a payload; every function works on one `[u8; CELL_LEN]`.

use crate::cell::{
    BODY_LEN, CELL_LEN, COUNTER_LEN, Command, HEADER_LEN, HOP_OVERHEAD, LCID_LEN, LEN_FIELD, MAX_HOPS, SAMPLE_LEN,
    layer_plaintext_len, padding_len_before, payload_capacity, set_lcid,
};
use crate::crypto::{CryptoError, HeaderKey, KEY_LEN, LayerKey, Suite, TAG_LEN, hkdf};
use thiserror::Error;

/// Label that separates this protocol version's key derivations from any other use of HKDF.
pub(crate) const PROTOID: &[u8] = b"meshvpn-cellproto-v1";

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
    /// A hop index outside 1..=MAX_HOPS.
    #[error("hop index {0} out of range")]
    BadHop(usize),
}

impl From<CryptoError> for LayerError {
    fn from(_: CryptoError) -> Self {
        LayerError::BadTag
    }
}

/// One hop's layer keys, both directions, derived by the handshake.
#[derive(Debug)]
pub struct HopKeys {
    fwd: LayerKey,
    bwd: LayerKey,
}

impl HopKeys {
    /// Builds the keys from the handshake's key material (SPEC.md, "Key schedule").
    pub fn from_material(suite: Suite, m: &HopKeyMaterial) -> Self {
        Self { fwd: LayerKey::new(suite, &m.fwd), bwd: LayerKey::new(suite, &m.bwd) }
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
}

impl Drop for HopKeyMaterial {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.fwd);
        zeroize::Zeroize::zeroize(&mut self.bwd);
    }
}

/// Header-protection and control keys of one link (both directions), derived from a 32-byte
/// link secret that both ends of the link know.
pub struct LinkKeys {
    fwd_hp: HeaderKey,
    bwd_hp: HeaderKey,
    control: [u8; KEY_LEN],
}

impl LinkKeys {
    /// Derives the link's keys from its secret (SPEC.md, "Link keys").
    pub fn derive(link_secret: &[u8; KEY_LEN]) -> Self {
        let mut okm = [0u8; 3 * KEY_LEN];
        hkdf(PROTOID, link_secret, b"link keys", &mut okm);
        let part =
            |i: usize| -> [u8; KEY_LEN] { okm[i * KEY_LEN..(i + 1) * KEY_LEN].try_into().unwrap_or([0; KEY_LEN]) };
        let keys = Self { fwd_hp: HeaderKey::new(&part(0)), bwd_hp: HeaderKey::new(&part(1)), control: part(2) };
        zeroize::Zeroize::zeroize(&mut okm);
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
        zeroize::Zeroize::zeroize(&mut self.control);
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

fn sample(cell: &[u8; CELL_LEN]) -> &[u8; SAMPLE_LEN] {
    // The body is longer than a sample, so this conversion always succeeds.
    cell[HEADER_LEN..HEADER_LEN + SAMPLE_LEN].try_into().unwrap_or_else(|_| unreachable!())
}

/// Writes the LCID and the protected counter, and fills `body[pad_start..]` with the link's
/// padding for `counter`. Call when the rest of the body is final: the mask depends on it.
pub fn protect_header(cell: &mut [u8; CELL_LEN], key: &HeaderKey, lcid: u32, counter: u64, pad_start: usize) {
    set_lcid(cell, lcid);
    let (header, body) = cell.split_at_mut(HEADER_LEN);
    let (head, pad) = body.split_at_mut(pad_start);
    let mut sample = [0u8; SAMPLE_LEN];
    sample.copy_from_slice(&head[..SAMPLE_LEN]);
    let mask = key.mask_and_pad(&sample, counter, pad);
    let protected = counter ^ u64::from_be_bytes(mask);
    header[LCID_LEN..].copy_from_slice(&protected.to_be_bytes());
}

/// Recovers the counter from a received cell's header.
pub fn unprotect_counter(cell: &[u8; CELL_LEN], key: &HeaderKey) -> u64 {
    let mask = key.mask(sample(cell));
    let mut raw = [0u8; COUNTER_LEN];
    raw.copy_from_slice(&cell[LCID_LEN..HEADER_LEN]);
    u64::from_be_bytes(raw) ^ u64::from_be_bytes(mask)
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

/// Reads the command (and, for terminal commands, the payload length) of an opened layer.
fn read_trailer(cell: &[u8; CELL_LEN], hop: usize) -> Result<(Command, usize), LayerError> {
    let end = layer_plaintext_len(hop);
    let b = &cell[HEADER_LEN..];
    let byte = b[end - 1];
    let cmd = Command::from_byte(byte).ok_or(LayerError::UnknownCommand(byte))?;
    if cmd == Command::Relay {
        return Ok((cmd, 0));
    }
    let len = usize::from(u16::from_be_bytes([b[end - 3], b[end - 2]]));
    let capacity = payload_capacity(hop);
    if len > capacity {
        return Err(LayerError::BadLength { len, capacity });
    }
    Ok((cmd, len))
}

/// Relay side, forward: opens hop `hop`'s layer in place. On success the command is returned;
/// for [`Command::Relay`] call [`forward_to_next`] before sending the cell on.
pub fn open_forward(
    cell: &mut [u8; CELL_LEN],
    hop: usize,
    keys: &HopKeys,
    counter: u64,
) -> Result<(Command, usize), LayerError> {
    check_hop(hop)?;
    let ct_len = layer_plaintext_len(hop);
    let b = body(cell);
    let (layer, padding) = b.split_at_mut(ct_len + TAG_LEN);
    let (ct, tag) = layer.split_at_mut(ct_len);
    keys.fwd.open(counter, padding, ct, tag)?;
    read_trailer(cell, hop)
}

/// Relay side, forward: after [`open_forward`] returned [`Command::Relay`], overwrites the
/// command byte, the tag and the old padding with this hop's padding and writes the header for
/// the next link (`next`, the next hop's `lcid`).
pub fn forward_to_next(cell: &mut [u8; CELL_LEN], hop: usize, counter: u64, next: &LinkKeys, lcid: u32) {
    protect_header(cell, next.header(Direction::Forward), lcid, counter, forward_pad_start(hop));
}

/// Relay side, backward: seals the inner cell from the next hop under this hop's layer. The
/// caller then writes padding and header with [`protect_header`] from
/// [`backward_pad_start`]. `counter` must have been accepted by this hop's backward window.
pub fn seal_backward_relay(
    cell: &mut [u8; CELL_LEN],
    hop: usize,
    keys: &HopKeys,
    counter: u64,
) -> Result<(), LayerError> {
    check_hop(hop)?;
    let pt_len = layer_plaintext_len(hop);
    body(cell)[pt_len - 1] = Command::Relay as u8;
    seal_backward_layer(cell, hop, keys, counter);
    Ok(())
}

/// Where the padding of a backward cell sealed by hop `hop` starts in the body.
pub const fn backward_pad_start(hop: usize) -> usize {
    layer_plaintext_len(hop) + TAG_LEN
}

/// Where the padding of a forward cell relayed by hop `hop` starts in the body.
pub const fn forward_pad_start(hop: usize) -> usize {
    layer_plaintext_len(hop) - 1
}

/// Hop side, backward: seals a terminal command whose payload (`len` bytes) is already at the
/// start of the body and writes the header for the previous link. `counter` must come from
/// this hop's backward replay window.
#[allow(clippy::too_many_arguments)]
pub fn seal_backward_command(
    cell: &mut [u8; CELL_LEN],
    hop: usize,
    keys: &HopKeys,
    counter: u64,
    cmd: Command,
    len: usize,
    prev: &LinkKeys,
    lcid: u32,
) -> Result<(), LayerError> {
    write_trailer(cell, hop, cmd, len)?;
    seal_backward_layer(cell, hop, keys, counter);
    protect_header(cell, prev.header(Direction::Backward), lcid, counter, backward_pad_start(hop));
    Ok(())
}

fn seal_backward_layer(cell: &mut [u8; CELL_LEN], hop: usize, keys: &HopKeys, counter: u64) {
    let pt_len = layer_plaintext_len(hop);
    let b = body(cell);
    let tag = keys.bwd.seal(counter, &[], &mut b[..pt_len]);
    b[pt_len..pt_len + TAG_LEN].copy_from_slice(&tag);
}

/// Client side, forward: seals a terminal command for hop `target` (1-based) through all layers
/// `hops[..target]` and writes the header for the first link. The payload (`len` bytes) must
/// already be at the start of the body. `links[j]` are the keys of the link into hop `j + 1`.
#[allow(clippy::too_many_arguments)]
pub fn seal_forward(
    cell: &mut [u8; CELL_LEN],
    hops: &[HopKeys],
    links: &[LinkKeys],
    target: usize,
    counter: u64,
    cmd: Command,
    len: usize,
    lcid: u32,
) -> Result<(), LayerError> {
    if target == 0 || target > hops.len() || target > links.len() {
        return Err(LayerError::BadHop(target));
    }
    write_trailer(cell, target, cmd, len)?;
    let mut aad = [0u8; HOP_OVERHEAD * (MAX_HOPS - 1)];
    for hop in (1..=target).rev() {
        let keys = &hops[hop - 1];
        let pt_len = layer_plaintext_len(hop);
        let b = body(cell);
        if hop < target {
            b[pt_len - 1] = Command::Relay as u8;
        }
        // The padding hop-1 will have written where this layer ends is this layer's AAD.
        let aad = &mut aad[..padding_len_before(hop)];
        if hop > 1 {
            links[hop - 1].header(Direction::Forward).pad(counter, aad);
        }
        let tag = keys.fwd.seal(counter, aad, &mut b[..pt_len]);
        b[pt_len..pt_len + TAG_LEN].copy_from_slice(&tag);
    }
    protect_header(cell, links[0].header(Direction::Forward), lcid, counter, BODY_LEN);
    Ok(())
}

/// Client side, backward: opens layers from hop 1 on until one holds a terminal command.
/// Returns the hop it came from (1-based), the command and the payload length; the payload is
/// at the start of the body.
pub fn open_backward(
    cell: &mut [u8; CELL_LEN],
    hops: &[HopKeys],
    counter: u64,
) -> Result<(usize, Command, usize), LayerError> {
    for (i, keys) in hops.iter().enumerate() {
        let hop = i + 1;
        let pt_len = layer_plaintext_len(hop);
        let b = body(cell);
        let (ct, rest) = b.split_at_mut(pt_len);
        keys.bwd.open(counter, &[], ct, &rest[..TAG_LEN])?;
        match read_trailer(cell, hop)? {
            (Command::Relay, _) => continue,
            (cmd, len) => return Ok((hop, cmd, len)),
        }
    }
    // Every layer said "relay": the last hop has nobody to relay for.
    Err(LayerError::UnknownCommand(Command::Relay as u8))
}

/// The payload region of a cell: where a sender writes, and a receiver reads, a terminal payload.
pub fn payload(cell: &[u8; CELL_LEN], len: usize) -> &[u8] {
    &cell[HEADER_LEN..HEADER_LEN + len.min(BODY_LEN)]
}

/// Mutable payload region, for writing a payload in place before sealing.
pub fn payload_mut(cell: &mut [u8; CELL_LEN]) -> &mut [u8] {
    &mut cell[HEADER_LEN..]
}
