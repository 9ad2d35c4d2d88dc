//! Wire constants and the geometry of a cell: where each hop's layer, tag and padding lie.
//!
//! Every cell on the wire is exactly [`CELL_LEN`] bytes:
//!
//! ```text
//! 0        4                  8                                    1436          1452
//! | LCID   | protected counter | onion area (ONION_LEN bytes)       | link tag (16) |
//! ```
//!
//! The counter in the header is the **link counter** of the link the cell is on: chosen by the
//! sending end of that link for that direction, never the same sequence on two links. The onion
//! area at hop `i` (1-based) holds that hop's layer (ciphertext ‖ tag) followed by padding; a
//! relaying layer's plaintext ends with the next layer's counter and the RELAY command, so each
//! layer's nonce travels encrypted inside the layer around it. The last 16 bytes carry the link
//! tag that authenticates a backward cell to the hop receiving it (forward cells are
//! authenticated by the receiving hop's own layer, whose associated data covers those bytes).
//! See SPEC.md, "Cells".

use crate::crypto::TAG_LEN;

/// Size of every cell, the whole UDP payload: 1500-byte MTU − 40 (IPv6) − 8 (UDP), so a cell
/// crosses any 1500-MTU path, IPv4 or IPv6, without fragmentation.
pub const CELL_LEN: usize = 1452;
/// Link circuit id: 4 bytes, chosen by the receiving end of each link direction.
pub const LCID_LEN: usize = 4;
/// The link counter (per circuit, link and direction), protected per link.
pub const COUNTER_LEN: usize = 4;
/// Cleartext-looking header: LCID ‖ protected counter.
pub const HEADER_LEN: usize = LCID_LEN + COUNTER_LEN;
/// Bytes after the header.
pub const BODY_LEN: usize = CELL_LEN - HEADER_LEN;
/// The link tag at the end of every cell (SPEC.md §3).
pub const LINK_TAG_LEN: usize = TAG_LEN;
/// The part of the body that carries onion layers and their padding.
pub const ONION_LEN: usize = BODY_LEN - LINK_TAG_LEN;
/// A relaying layer carries the next layer's counter (4 bytes) before its command byte.
pub const INNER_COUNTER_LEN: usize = COUNTER_LEN;
/// What each relaying hop's layer costs: a 16-byte AEAD tag, the inner counter and a command.
pub const HOP_OVERHEAD: usize = TAG_LEN + INNER_COUNTER_LEN + 1;
/// The longest circuit. Private mode uses 3 hops and mesh relaying 1 or 2; 6 leaves room for
/// every planned use (Tor's practical circuits are 3 or 4 hops) and, with the inner counter each
/// layer carries, keeps the TUN MTU above IPv6's 1280 (7 hops would leave 1283, 8 only 1262).
pub const MAX_HOPS: usize = 6;
/// Terminal commands end with a 2-byte payload length before the command byte.
pub const LEN_FIELD: usize = 2;
/// Bytes of header-protection sample: the first 16 body bytes (always ciphertext).
pub const SAMPLE_LEN: usize = 16;

/// LCID of handshake (CREATE) cells: no circuit exists yet on the receiving side.
pub const HANDSHAKE_LCID: u32 = 0xFFFF_FFFF;
/// Counter value that marks a link-control cell (never a data counter: see [`COUNTER_START_MAX`]).
pub const LINK_CONTROL_COUNTER: u32 = u32::MAX;

/// Cells one key may seal before the circuit must be rebuilt. For AES-256-GCM with ≤ 90-block
/// cells, 2²⁸ messages keep the confidentiality advantage below 2⁻⁵⁷ (RFC 9001 §B.1 method);
/// ChaCha20-Poly1305 allows more, and one limit keeps the state machine simple. Senders count
/// what they sealed; receivers count what they accepted.
pub const CELL_LIMIT: u32 = 1 << 28;
/// Every counter sequence starts at a random value in `1..=COUNTER_START_MAX`, so that two
/// sequences of one circuit (the same cells seen on two links) do not show the same numbers to
/// the hops that read them. Start + [`CELL_LIMIT`] stays below [`LINK_CONTROL_COUNTER`].
pub const COUNTER_START_MAX: u32 = 1 << 30;
/// Failed authentications per key before the circuit is torn down: ChaCha20-Poly1305's
/// integrity limit (RFC 9001 §6.6: 2³⁶ forgery attempts; AES-GCM's is 2⁵²). Unreachable in a
/// circuit's hour below 19 million forgeries a second, so a forged datagram never ends a circuit.
pub const FORGERY_LIMIT: u64 = 1 << 36;
/// Circuits are rebuilt at least this often (seconds), whatever their traffic.
pub const MAX_CIRCUIT_AGE_SECS: u64 = 3600;

/// Length of the layer plaintext at hop `i` (1-based): what the hop's AEAD covers, excluding
/// the tag. Its last byte is the command; a relaying layer's four bytes before it are the next
/// layer's counter.
pub const fn layer_plaintext_len(hop: usize) -> usize {
    ONION_LEN + INNER_COUNTER_LEN + 1 - HOP_OVERHEAD * hop
}

/// Where hop `hop`'s layer (ciphertext ‖ tag) ends in the body; everything after it up to the
/// end of the body is padding or link tag, the layer's associated data on the forward path.
pub const fn layer_end(hop: usize) -> usize {
    layer_plaintext_len(hop) + TAG_LEN
}

/// Largest payload a terminal command can carry to or from hop `hop`.
pub const fn payload_capacity(hop: usize) -> usize {
    layer_plaintext_len(hop) - 1 - LEN_FIELD
}

/// The client TUN MTU: the largest IP packet that fits one cell at [`MAX_HOPS`].
pub const TUN_MTU: usize = payload_capacity(MAX_HOPS);

const _: () = assert!(TUN_MTU >= 1280, "IPv6 needs an MTU of at least 1280");
const _: () = assert!(COUNTER_START_MAX as u64 + CELL_LIMIT as u64 <= LINK_CONTROL_COUNTER as u64);

/// Whether `lcid` may be chosen as a link circuit id: its top two bits must not both be zero
/// (so a cell's first byte is ≥ 0x40 and never looks like STUN, RFC 7983), and it must not be the
/// handshake marker.
pub const fn is_valid_lcid(lcid: u32) -> bool {
    lcid >= 0x4000_0000 && lcid != HANDSHAKE_LCID
}

/// The LCID of a cell.
pub fn lcid(cell: &[u8; CELL_LEN]) -> u32 {
    u32::from_be_bytes([cell[0], cell[1], cell[2], cell[3]])
}

/// Writes the LCID of a cell.
pub fn set_lcid(cell: &mut [u8; CELL_LEN], lcid: u32) {
    cell[..LCID_LEN].copy_from_slice(&lcid.to_be_bytes());
}

/// Borrows a datagram as a cell if it has exactly the cell size.
pub fn as_cell(datagram: &mut [u8]) -> Option<&mut [u8; CELL_LEN]> {
    datagram.try_into().ok()
}

/// Commands carried in the last byte of a layer's plaintext (SPEC.md, "Commands").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    /// Not for this hop: the rest of the plaintext is the next hop's layer.
    Relay = 0x01,
    /// One IP packet (to or from the exit).
    Data = 0x02,
    /// Cover traffic; dropped by the hop it is addressed to.
    Padding = 0x03,
    /// Client → last hop: extend the circuit by one hop.
    Extend = 0x04,
    /// Last hop → client: the new hop's handshake reply.
    Extended = 0x05,
    /// Either way: tear the circuit down from this hop on.
    Destroy = 0x06,
    /// Client → any hop: liveness and RTT probe, echoed as [`Command::Pong`].
    Ping = 0x07,
    /// Hop → client: answer to [`Command::Ping`].
    Pong = 0x08,
    /// Client → exit: ask for inner addresses, resuming a session if a token is given.
    Attach = 0x09,
    /// Exit → client: the inner addresses and the session token.
    Attached = 0x0A,
}

impl Command {
    /// Parses a command byte; unknown values (including the reserved mesh range 0x20–0x2F) are
    /// errors for the caller to count, never panics.
    pub const fn from_byte(b: u8) -> Option<Command> {
        Some(match b {
            0x01 => Command::Relay,
            0x02 => Command::Data,
            0x03 => Command::Padding,
            0x04 => Command::Extend,
            0x05 => Command::Extended,
            0x06 => Command::Destroy,
            0x07 => Command::Ping,
            0x08 => Command::Pong,
            0x09 => Command::Attach,
            0x0A => Command::Attached,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_is_consistent() {
        // The client's outermost layer fills the onion area exactly; the link tag follows.
        assert_eq!(layer_end(1), ONION_LEN);
        assert_eq!(ONION_LEN + LINK_TAG_LEN, BODY_LEN);
        for hop in 1..MAX_HOPS {
            // The inner layer (ciphertext ‖ tag), its counter and the command byte are the outer
            // plaintext.
            assert_eq!(layer_end(hop + 1) + INNER_COUNTER_LEN + 1, layer_plaintext_len(hop));
        }
        assert_eq!(TUN_MTU, 1304);
        // The most padding one hop writes: from the deepest layer's end to the end of the body.
        assert!(BODY_LEN - layer_end(MAX_HOPS) <= 128);
    }

    #[test]
    fn lcid_rules() {
        assert!(!is_valid_lcid(0));
        assert!(!is_valid_lcid(0x3FFF_FFFF));
        assert!(is_valid_lcid(0x4000_0000));
        assert!(!is_valid_lcid(HANDSHAKE_LCID));
    }
}
