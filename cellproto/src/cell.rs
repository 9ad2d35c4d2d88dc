//! Wire constants and the geometry of a cell: where each hop's layer, tag and padding lie.
//!
//! Every cell on the wire is exactly [`CELL_LEN`] bytes:
//!
//! ```text
//! 0        4                 12                                            1452
//! | LCID   | protected counter | body (BODY_LEN bytes)                        |
//! ```
//!
//! The body at hop `i` (1-based) holds that hop's layer (ciphertext ‖ tag), followed by
//! `HOP_OVERHEAD * (i - 1)` bytes of padding written by the previous hop. See SPEC.md, "Cells".

use crate::crypto::TAG_LEN;

/// Size of every cell, the whole UDP payload: 1500-byte MTU − 40 (IPv6) − 8 (UDP), so a cell
/// crosses any 1500-MTU path, IPv4 or IPv6, without fragmentation.
pub const CELL_LEN: usize = 1452;
/// Link circuit id: 4 bytes, chosen by the receiving end of each link direction.
pub const LCID_LEN: usize = 4;
/// The cell counter (per circuit and direction), protected per link.
pub const COUNTER_LEN: usize = 8;
/// Cleartext-looking header: LCID ‖ protected counter.
pub const HEADER_LEN: usize = LCID_LEN + COUNTER_LEN;
/// Bytes after the header.
pub const BODY_LEN: usize = CELL_LEN - HEADER_LEN;
/// What each hop's layer costs: a 16-byte AEAD tag and a 1-byte command.
pub const HOP_OVERHEAD: usize = TAG_LEN + 1;
/// The longest circuit: 8 hops, as Tor's limit on EXTEND cells. It fixes the TUN MTU.
pub const MAX_HOPS: usize = 8;
/// Terminal commands end with a 2-byte payload length before the command byte.
pub const LEN_FIELD: usize = 2;
/// Bytes of header-protection sample: the first 16 body bytes (always ciphertext).
pub const SAMPLE_LEN: usize = 16;

/// LCID of handshake (CREATE) cells: no circuit exists yet on the receiving side.
pub const HANDSHAKE_LCID: u32 = 0xFFFF_FFFF;
/// Counter value that marks a link-control cell (never a data counter: see [`CELL_LIMIT`]).
pub const LINK_CONTROL_COUNTER: u64 = u64::MAX;

/// Cells one key may seal before the circuit must be rebuilt. For AES-256-GCM with ≤ 90-block
/// cells, 2²⁸ messages keep the confidentiality advantage below 2⁻⁵⁷ (RFC 9001 §B.1 method);
/// ChaCha20-Poly1305 allows more, and one limit keeps the state machine simple.
pub const CELL_LIMIT: u64 = 1 << 28;
/// Failed authentications tolerated per circuit before it is torn down (RFC 9001 §6.6 integrity
/// limits are far above this; a circuit receiving this many forgeries is under attack).
pub const FORGERY_LIMIT: u64 = 1 << 20;
/// Circuits are rebuilt at least this often (seconds), whatever their traffic.
pub const MAX_CIRCUIT_AGE_SECS: u64 = 3600;

/// The hop that originated a backward cell, from its counter. Backward counters are
/// partitioned by origin (counter ≡ hop mod [`MAX_HOPS`], hop 8 ↦ 0) so that the exit and any
/// hop answering a PING or EXTEND never pick the same counter: each hop seals relayed cells
/// (origin beyond it) and its own cells (origin itself) under disjoint nonces.
pub const fn backward_origin(counter: u64) -> usize {
    match (counter % MAX_HOPS as u64) as usize {
        0 => MAX_HOPS,
        r => r,
    }
}

/// Length of the layer plaintext at hop `i` (1-based): what the hop's AEAD covers, excluding
/// the tag. Its last byte is the command.
pub const fn layer_plaintext_len(hop: usize) -> usize {
    BODY_LEN + 1 - HOP_OVERHEAD * hop
}

/// Bytes of padding that precede hop `hop`'s input: written by hop `hop - 1`.
pub const fn padding_len_before(hop: usize) -> usize {
    HOP_OVERHEAD * (hop - 1)
}

/// Largest payload a terminal command can carry to or from hop `hop`.
pub const fn payload_capacity(hop: usize) -> usize {
    layer_plaintext_len(hop) - 1 - LEN_FIELD
}

/// The client TUN MTU: the largest IP packet that fits one cell at [`MAX_HOPS`].
pub const TUN_MTU: usize = payload_capacity(MAX_HOPS);

const _: () = assert!(TUN_MTU >= 1280, "IPv6 needs an MTU of at least 1280");

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
        // The client's outermost layer fills the body exactly.
        assert_eq!(layer_plaintext_len(1) + TAG_LEN, BODY_LEN);
        for hop in 1..MAX_HOPS {
            // The inner layer (ciphertext ‖ tag) plus the command byte is the outer plaintext.
            assert_eq!(layer_plaintext_len(hop + 1) + TAG_LEN + 1, layer_plaintext_len(hop));
            // What a hop frees after opening is exactly the padding the next hop expects.
            assert_eq!(BODY_LEN - (layer_plaintext_len(hop) - 1), padding_len_before(hop + 1));
        }
        assert_eq!(TUN_MTU, 1302);
        assert!(padding_len_before(MAX_HOPS) <= 128);
    }

    #[test]
    fn lcid_rules() {
        assert!(!is_valid_lcid(0));
        assert!(!is_valid_lcid(0x3FFF_FFFF));
        assert!(is_valid_lcid(0x4000_0000));
        assert!(!is_valid_lcid(HANDSHAKE_LCID));
    }
}
