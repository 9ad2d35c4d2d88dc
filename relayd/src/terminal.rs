//! The hook an exit plugs into the relay engine: commands addressed to the last hop that a
//! relay does not handle itself (DATA, ATTACH), and traffic the exit originates (packets read
//! from its TUN device). One `Terminal` per worker, owned by that worker's thread, so exit
//! traffic follows the same no-shared-state rule as relaying.

use crate::datapath::Outgoing;
use cellproto::cell::Command;
use cellproto::relay::{CircuitMap, HopCircuit};
use std::time::Instant;

/// What an exit adds to one worker.
pub trait Terminal: Send {
    /// A command for this hop (DATA, ATTACH) on the circuit whose previous-link LCID is
    /// `lcid`; `payload` is the command body, still in the receive buffer. Cells to send back go
    /// into `out` (sealed with [`HopCircuit::seal_backward`]). The terminal counts its own drops.
    fn deliver(
        &mut self,
        now: Instant,
        lcid: u32,
        circuit: &mut HopCircuit,
        cmd: Command,
        payload: &[u8],
        out: &mut Vec<Outgoing>,
    );

    /// Called once per worker loop: originate cells for this worker's circuits (e.g. from TUN).
    /// Returns whether it stopped with work left (the worker then polls again without waiting).
    fn poll(&mut self, now: Instant, circuits: &mut CircuitMap, out: &mut Vec<Outgoing>) -> bool;

    /// Descriptors (duplicates, e.g. of the TUN queue) whose readability should wake the
    /// worker so that [`Terminal::poll`] runs at once; none: timers only.
    fn wake_fds(&self) -> Vec<std::os::fd::OwnedFd> {
        Vec::new()
    }

    /// The end of a batch of received cells: write out what was held back to be batched.
    fn flush(&mut self) {}

    /// A circuit of this worker ended (its previous-link LCID).
    fn closed(&mut self, lcid: u32);
}
