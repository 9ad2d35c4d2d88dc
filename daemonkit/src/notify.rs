//! What a daemon tells systemd (`Type=notify`). Without `NOTIFY_SOCKET` (not started by
//! systemd) nothing is sent; a failed send is logged, never fatal.

/// A daemon's state, as systemd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// Sockets bound, workers running (exitd: also TUN and nftables in place).
    Ready,
    /// SIGHUP received: re-reading the configuration.
    Reloading,
    /// Shutting down (relays and exits: DESTROY to every circuit, then exit).
    Stopping,
}

/// Sends `state` with a human-readable `status` (shown by `systemctl status`).
pub fn notify(state: Notify, status: &str) {
    use sd_notify::NotifyState;
    let mut states = vec![NotifyState::Status(status)];
    match state {
        Notify::Ready => states.push(NotifyState::Ready),
        Notify::Reloading => {
            states.push(NotifyState::Reloading);
            // systemd ≥ 253 (Type=notify-reload) wants the time the reload began; older ones
            // ignore it.
            if let Ok(t) = NotifyState::monotonic_usec_now() {
                states.push(t);
            }
        }
        Notify::Stopping => states.push(NotifyState::Stopping),
    }
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!("cannot notify systemd ({state:?}): {e}");
    }
}
