//! The hook an exit plugs into the relay engine: the node's [`cellproto::node::Terminal`]
//! (DATA and ATTACH for the last hop, circuits that ended) and traffic the exit originates
//! (packets read from its TUN device). One `Terminal` per worker, owned by that worker's
//! thread, so exit traffic follows the same no-shared-state rule as relaying.

use cellio::Outbox;
use cellproto::node::Node;
use std::time::Instant;

/// What an exit adds to one worker.
pub trait Terminal: cellproto::node::Terminal + Send {
    /// Called once per worker loop: originate cells for this worker's circuits (e.g. from TUN),
    /// sealed with [`cellproto::relay::HopCircuit::seal_backward`] (the circuit from
    /// [`Node::circuit_mut`]) into slots of `out`. Returns whether it stopped with work left
    /// (the worker then polls again without waiting).
    fn poll(&mut self, now: Instant, node: &mut Node, out: &mut Outbox) -> bool;

    /// Descriptors (duplicates, e.g. of the TUN queue) whose readability should wake the
    /// worker so that [`Terminal::poll`] runs at once; none: timers only.
    fn wake_fds(&self) -> Vec<std::os::fd::OwnedFd> {
        Vec::new()
    }

    /// The end of a batch of received cells: write out what was held back to be batched.
    fn flush(&mut self) {}
}
