//! The tokio driver: owns the UDP socket, the TUN device, the clock, the control socket and
//! the signals, and feeds them to the sans-IO [`Tunnel`]. Also `up` in the background and
//! `down`.
//!
//! Only `meshvpn down` (a `down` request on the control socket) undoes what `up` changed.
//! SIGTERM, SIGINT and any error stop the client but leave the kill switch, the guard's route
//! and DNS in place (see [`crate::system`]), so no traffic leaves outside the tunnel between a
//! stop and the next `up`.
//!
//! One thread (a current-thread runtime): the client's work per packet is one seal or open,
//! far below what one core does, and a single owner of the circuit needs no locks. Each
//! wake-up drains up to `BATCH` datagrams or packets before looking at timers again.

use crate::config::Config;
use crate::control::{self, Answer, HopStatus, Request, Status};
use crate::directory::{self, DirectorySource, SignedFile};
use crate::endpoint::{self, BATCH, Endpoint};
use crate::guards::Guards;
use crate::netcheck::{self, Probe, ProbeResult, Test};
use crate::relays::{self, PathRequest, Relay};
use crate::system::{System, killswitch, routes};
use crate::tunnel::{Options, State, Tunnel, TunnelEvent};
use anyhow::{Context, Result, bail};
use cellproto::cell::{CELL_LEN, TUN_MTU};
use cellproto::onion::{payload, payload_mut};
use daemonkit::notify::{Notify, notify};
use ipnet::{Ipv4Net, Ipv6Net};
use rand_core::OsRng;
use std::io::{BufRead, Seek};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use tundev::gro::Gro;
use tundev::tso;
use tundev::{Tun, TunQueue, VNET_HDR_LEN};

/// How long the relays' round trips are measured before the first path is chosen.
const RTT_PROBE: Duration = Duration::from_millis(500);
/// How long `meshvpn netcheck` through the running client waits for answers (netcheck's own
/// default phase length).
const NETCHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `meshvpn up` waits for the background client to report the tunnel up.
const UP_WAIT: Duration = Duration::from_secs(60);

type ControlRequest = (Request, oneshot::Sender<Answer>);
/// What watchers of the control socket follow (see [`control::Changes`]).
type Published = (State, Option<String>);

/// Why the driver stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// `meshvpn down`: undo everything.
    Down,
    /// A signal: stop, keeping the kill switch.
    Signal(&'static str),
}

/// `meshvpn up --foreground`: runs until `meshvpn down`, which undoes every change it made,
/// or until SIGTERM, SIGINT or an error, which leave the kill switch, the guard's route and DNS
/// in place (with `kill_switch = false` there is nothing to hold traffic in, and everything is
/// undone then too). SIGHUP re-reads `config_path` (keeping a `--hops` override) and the
/// directory file; under systemd it notifies readiness once the tunnel is up.
pub fn run(config: Config, config_path: &Path, hops: Option<usize>) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("meshvpn up needs root (it creates a TUN device and changes routes, DNS and nftables); run it with sudo");
    }
    let relays = directory::load_directory(&config)?;
    let mut system = System::begin(&config.state_dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(drive(&config, (config_path, hops), relays, &mut system));
    let _ = std::fs::remove_file(&config.control_socket);
    match result {
        Ok(Stop::Down) => {
            notify(Notify::Stopping, "restoring routes, DNS and nftables");
            system.finish();
            info!("meshvpn is down");
            Ok(())
        }
        Ok(Stop::Signal(signal)) => {
            stop_keeping(system, &config, signal);
            Ok(())
        }
        Err(e) => {
            stop_keeping(system, &config, "error");
            warn!("meshvpn stopped: {e:#}");
            Err(e.context(if config.kill_switch {
                "the kill switch stays in place, so nothing leaves outside the tunnel; `meshvpn down --config FILE` removes it"
            } else {
                "routes and DNS were restored"
            }))
        }
    }
}

/// Stops on a signal or an error: the kill switch (and with it the guard's route and DNS)
/// stays for the next `up` or `down`; without a kill switch everything is put back.
fn stop_keeping(system: System, config: &Config, why: &str) {
    if config.kill_switch || system.journal().nft_table.is_some() {
        notify(Notify::Stopping, "stopping; the kill switch stays until `meshvpn down`");
        warn!(
            "stopping ({why}) without `meshvpn down`: the kill switch stays, so nothing leaves outside the tunnel until the next `meshvpn up` or `meshvpn down`"
        );
        system.leave();
    } else {
        notify(Notify::Stopping, "restoring routes and DNS (no kill switch configured)");
        system.finish();
    }
}

struct Driver<'a> {
    config: &'a Config,
    system: &'a mut System,
    tunnel: Tunnel,
    endpoint: Endpoint,
    tun: Option<AsyncFd<TunQueue>>,
    addresses: Option<(Ipv4Net, Ipv6Net)>,
    started: Instant,
    kill_switch: bool,
    tun_write_errors: u64,
    tun_read_errors: u64,
    /// Cells lost before the socket: refused by its queue (another destination queued).
    send_errors: u64,
    /// Failed sends (each may lose a batch of cells, which the socket counts), for the log.
    send_failures: u64,
    gro: Gro,
    /// One frame from the TUN device: virtio header and up to 64 KiB (a TSO super-packet).
    tun_rx: Box<[u8]>,
    /// Where `tso::segment` builds each packet.
    tso_scratch: Vec<u8>,
    /// The last drain of the TUN device stopped with packets left.
    tun_left: bool,
    /// A `netcheck` request being run: its probes, the stray count when it began, the reply.
    netcheck: Option<(Vec<Probe>, u64, oneshot::Sender<Answer>)>,
}

async fn drive(
    config: &Config,
    (config_path, hops): (&Path, Option<usize>),
    mut relays: relays::Relays,
    system: &mut System,
) -> Result<Stop> {
    let mut endpoint = Endpoint::bind(&relays).await.context("cannot open a UDP socket")?;
    if config.rtt_probes {
        // From the data socket, before the first path is chosen: the relays see the address
        // the cells will come from, and no second NAT mapping is made.
        endpoint.measure_rtts(&mut relays, RTT_PROBE, |_, _| {}).await;
        let answered = relays.relays.iter().filter(|r| r.rtt.is_some()).count();
        info!(answered, relays = relays.relays.len(), "round trips measured");
    }
    let now = Instant::now();
    let request = PathRequest {
        hops: config.hops,
        exit: config.exit,
        guard: None,
        exit_ports: config.exit_ports.clone(),
        avoid: Vec::new(),
    };
    let options = Options {
        timers: config.timers,
        offer_aes: config.offer_aes,
        guards: Guards::load(&config.state_dir),
        unix_now: daemonkit::unix_now(),
    };
    let listener = bind_control(&config.control_socket)?;
    let mut driver = Driver {
        config,
        system,
        tunnel: Tunnel::new(relays, request, options, now),
        endpoint,
        tun: None,
        addresses: None,
        started: now,
        kill_switch: false,
        tun_write_errors: 0,
        tun_read_errors: 0,
        send_errors: 0,
        send_failures: 0,
        gro: Gro::default(),
        tun_rx: vec![0u8; VNET_HDR_LEN + 65_536].into_boxed_slice(),
        tso_scratch: Vec::with_capacity(2048),
        tun_left: false,
        netcheck: None,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlRequest>(8);
    let (changes, watching) = tokio::sync::watch::channel::<Published>((driver.tunnel.state(), None));
    let mut cell = Box::new([0u8; CELL_LEN]);
    let stop = loop {
        driver.flush(&mut cell).await?;
        publish(&changes, &driver.tunnel);
        let deadline = driver.tunnel.poll_timeout();
        let deadline = driver.endpoint.exchange_timeout(Instant::now()).map_or(deadline, |t| t.min(deadline));
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); break Stop::Signal("SIGTERM") }
            _ = int.recv() => { info!("SIGINT: stopping"); break Stop::Signal("SIGINT") }
            _ = hup.recv() => driver.reload(config_path, hops),
            ready = driver.endpoint.readable() => {
                ready?;
                driver.receive().await;
            }
            ready = tun_readable(&driver.tun, driver.tun_left) => {
                ready?;
                driver.transmit(&mut cell).await;
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                driver.tunnel.set_unix_time(now, daemonkit::unix_now());
                driver.tunnel.handle_timeout(now, &mut OsRng);
            }
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    tokio::spawn(control::serve(stream, ctl_tx.clone(), watching.clone()));
                }
            }
            Some((req, reply)) = ctl_rx.recv() => match req {
                // `watch` is served by its connection's task, one `status` at a time.
                Request::Status | Request::Watch => { let _ = reply.send(Answer::Status(Box::new(driver.status()))); }
                Request::Netcheck => driver.start_netcheck(reply),
                Request::Down => { info!("`meshvpn down`: going down"); drop(reply); break Stop::Down }
            },
        }
    };
    if let Some(to) = driver.tunnel.close(&mut cell, &mut OsRng)
        && driver.endpoint.socket().send(to, &cell).await.is_ok()
    {
        let _ = driver.endpoint.socket().flush().await;
    }
    Ok(stop)
}

/// Tells watchers of the control socket when the state or its reason changed.
fn publish(changes: &tokio::sync::watch::Sender<Published>, tunnel: &Tunnel) {
    changes.send_if_modified(|(state, reason)| {
        if *state == tunnel.state() && reason.as_deref() == tunnel.reason() {
            return false;
        }
        (*state, *reason) = (tunnel.state(), tunnel.reason().map(str::to_owned));
        true
    });
}

/// Resolves when the TUN device has packets: at once if the last drain stopped at [`BATCH`]
/// with packets left (their readiness was already consumed), else at the next edge.
/// Writes what GRO hands over into the TUN device; a refused write (or no device yet) loses
/// the packet, counted.
fn tun_writer<'a>(tun: &'a mut Option<AsyncFd<TunQueue>>, errors: &'a mut u64) -> impl FnMut(&[u8]) + 'a {
    move |packet| {
        if tun.as_mut().is_none_or(|t| t.get_mut().write(packet).is_err()) {
            *errors += 1;
        }
    }
}

async fn tun_readable(tun: &Option<AsyncFd<TunQueue>>, left: bool) -> std::io::Result<()> {
    match tun {
        Some(_) if left => Ok(()),
        Some(t) => t.readable().await.map(|mut g| g.clear_ready()),
        None => std::future::pending().await,
    }
}

impl Driver<'_> {
    /// Sends what the tunnel has queued and acts on its events.
    async fn flush(&mut self, cell: &mut [u8; CELL_LEN]) -> Result<()> {
        while let Some(event) = self.tunnel.poll_event() {
            self.on_event(event)?;
        }
        while let Some(to) = self.tunnel.poll_transmit(Instant::now(), cell, &mut OsRng) {
            self.send(to, cell).await;
        }
        self.send_flush().await;
        let now = Instant::now();
        self.endpoint.send_due(now).await;
        self.finish_netcheck(now);
        Ok(())
    }

    /// `meshvpn netcheck` while the client runs: netcheck's first phase (a Binding request to
    /// each relay) from the data socket, so the report gives the reflexive address the cells
    /// use. While the kill switch is on, only the guard is asked: nothing else may leave.
    fn start_netcheck(&mut self, reply: oneshot::Sender<Answer>) {
        let refuse = |why: &str| Answer::Error { error: why.to_owned() };
        if self.netcheck.is_some() || self.endpoint.exchanging() {
            let _ = reply.send(refuse("a STUN exchange is already running; try again in a second"));
            return;
        }
        let Ok(bound) = self.endpoint.local_addr() else {
            let _ = reply.send(refuse("the UDP socket has no local address"));
            return;
        };
        let servers = match (self.kill_switch, self.tunnel.guard()) {
            (false, _) => self.tunnel.relays().stun_servers(),
            (true, Some(guard)) => {
                let name = self.tunnel.path().first().filter(|r| r.hop.addr == guard).map(|r| r.desc.nickname.clone());
                vec![netcheck::StunServer { name: name.unwrap_or_else(|| "guard".into()), addr: guard }]
            }
            (true, None) => Vec::new(),
        };
        let mut probes = Vec::new();
        let mut requests = Vec::new();
        for s in servers.into_iter().filter(|s| s.addr.is_ipv4() == bound.is_ipv4()) {
            requests.push((probes.len(), s.addr, endpoint::binding_request()));
            let local = netcheck::local_towards(bound, s.addr);
            probes.push(Probe {
                server: s.name,
                addr: s.addr,
                local,
                test: Test::Binding,
                result: ProbeResult::Timeout,
            });
        }
        if probes.is_empty() {
            let _ = reply.send(refuse("no relay to ask yet (no guard chosen)"));
        } else if self.endpoint.start_exchange(requests, Instant::now(), NETCHECK_TIMEOUT) {
            self.netcheck = Some((probes, self.endpoint.counters().stray, reply));
        } else {
            let _ = reply.send(refuse("cannot encode a Binding request"));
        }
    }

    /// Answers the `netcheck` request once its exchange is over.
    fn finish_netcheck(&mut self, now: Instant) {
        if self.netcheck.is_none() {
            return;
        }
        let Some(results) = self.endpoint.take_results(now) else { return };
        let Some((mut probes, stray, reply)) = self.netcheck.take() else { return };
        for (i, result) in results {
            if let Some(p) = probes.get_mut(i) {
                p.result = result;
            }
        }
        let guard_only = self.kill_switch;
        let answer = match netcheck::report(probes, self.endpoint.counters().stray - stray) {
            Ok(mut report) => {
                report.notes.push(if guard_only {
                    "asked by the running client from its data socket; its kill switch lets only the guard be asked"
                        .to_owned()
                } else {
                    "asked by the running client from its data socket".to_owned()
                });
                Answer::Netcheck(Box::new(report))
            }
            Err(e) => Answer::Error { error: format!("{e:#}") },
        };
        let _ = reply.send(answer);
    }

    /// SIGHUP: applies new timers and a fresh directory; anything else needs a restart, which
    /// is logged by key. A file that does not load changes nothing.
    fn reload(&mut self, path: &Path, hops: Option<usize>) {
        notify(Notify::Reloading, "re-reading the configuration");
        match Config::load(path) {
            Ok(mut new) => {
                new.hops = hops.unwrap_or(new.hops);
                let restart = self.config.restart_needed(&new);
                if !restart.is_empty() {
                    warn!(keys = ?restart, "these changes apply at the next start (`meshvpn down` and `up`, or `systemctl restart meshvpn`)");
                }
                self.tunnel.set_timers(new.timers);
                let source = SignedFile::from_config(self.config);
                let fresh = source.load(daemonkit::unix_now()).map_err(|e| e.to_string());
                match fresh.and_then(|f| self.tunnel.relays().check_replacement(&f).map(|()| f)) {
                    Ok(fresh) => {
                        info!(
                            relays = fresh.relays.len(),
                            expires = fresh.expires,
                            "configuration and directory reloaded"
                        );
                        self.endpoint.set_relays(&fresh);
                        self.tunnel.set_relays(fresh);
                    }
                    Err(e) => warn!("keeping the directory already loaded: {e}"),
                }
            }
            Err(e) => warn!("keeping the running configuration: {e}"),
        }
        notify(Notify::Ready, self.tunnel.reason().unwrap_or("tunnel up"));
    }

    fn on_event(&mut self, event: TunnelEvent) -> Result<()> {
        match event {
            TunnelEvent::Guard(guard) => {
                if self.config.kill_switch {
                    self.system.kill_switch(killswitch::TABLE, &self.config.tun, guard)?;
                    self.kill_switch = true;
                }
                self.system.route_guard(guard)?;
                info!(%guard, "first hop");
            }
            TunnelEvent::SaveGuards => {
                if let Err(e) = self.tunnel.guards().save(&self.config.state_dir) {
                    warn!("cannot keep the guard set in {}: {e}", self.config.state_dir.display());
                }
            }
            TunnelEvent::Up(attached) => {
                // Checked by the tunnel already (crate::session); a second look costs nothing
                // and keeps a refused address away from the kernel whatever changes there.
                let (v4, v6) = crate::session::validate(&attached).context("unusable addresses from the exit")?;
                if self.tun.is_some() && self.addresses == Some((v4, v6)) {
                    // A resumed session: same addresses, nothing to change on the system.
                    info!("tunnel up again with the same inner addresses");
                    return Ok(());
                }
                self.addresses = Some((v4, v6));
                if self.tun.is_none() {
                    let mut tun = Tun::create_with(&self.config.tun, 1, true).with_context(|| {
                        format!("cannot create the TUN device {} (needs CAP_NET_ADMIN)", self.config.tun)
                    })?;
                    // Local TCP then arrives as super-packets, segmented in userspace (tso).
                    tun.enable_offloads().context("cannot enable the TUN device's offloads")?;
                    let queue = tun.queues().pop().context("TUN device without a queue")?;
                    // `AsyncFd::new` is deprecated because a `T` could close its descriptor while
                    // registered; a `TunQueue` owns its `File` and closes it only when dropped,
                    // which `AsyncFd` does after deregistering, so the registration stays valid.
                    #[allow(deprecated)]
                    let queue = AsyncFd::new(queue).context("cannot poll the TUN device")?;
                    self.tun = Some(queue);
                } else {
                    let _ = crate::system::run("ip", &["address", "flush", "dev", &self.config.tun], None);
                }
                tundev::configure(&self.config.tun, TUN_MTU as u32, v4, v6)
                    .with_context(|| format!("cannot configure {}", self.config.tun))?;
                routes::route_all_through(&self.config.tun)?;
                if !self.config.resolv_conf.as_os_str().is_empty() {
                    let servers = [IpAddr::V4(attached.dns.0), IpAddr::V6(attached.dns.1)];
                    self.system.set_dns(&self.config.resolv_conf, &servers)?;
                }
                let path: Vec<&str> = self.tunnel.path().iter().map(|r| r.desc.nickname.as_str()).collect();
                info!(path = %path.join(" -> "), inner4 = %v4.addr(), inner6 = %v6.addr(), "tunnel up");
                notify(Notify::Ready, &format!("tunnel up through {}", path.join(" > ")));
            }
            TunnelEvent::Down => {
                warn!(reason = self.tunnel.reason().unwrap_or("-"), "tunnel down; the kill switch holds traffic");
            }
        }
        Ok(())
    }

    /// Queues a cell; a failed send is logged (rate-limited by its cause: the kill switch
    /// or a dead route) and the cell is lost, as on any UDP path.
    async fn send(&mut self, to: std::net::SocketAddr, cell: &[u8; CELL_LEN]) {
        if let Err(e) = self.endpoint.socket().send(to, cell).await {
            self.send_failed(e);
        }
    }

    async fn send_flush(&mut self) {
        if let Err(e) = self.endpoint.socket().flush().await {
            self.send_failed(e);
        }
    }

    fn send_failed(&mut self, e: std::io::Error) {
        self.send_failures += 1;
        if self.send_failures.is_power_of_two() {
            let lost = self.endpoint.cells_lost();
            warn!(failures = self.send_failures, cells_lost = lost, "cannot send to the guard: {e}");
        }
    }

    /// Drains the UDP socket through the endpoint's demultiplexer: cells in, IP packets to the
    /// TUN device (TCP runs joined), and writes out the run held back at the end, so nothing
    /// waits for the next datagram.
    async fn receive(&mut self) {
        let now = Instant::now();
        let (tunnel, gro) = (&mut self.tunnel, &mut self.gro);
        let (tun, errors) = (&mut self.tun, &mut self.tun_write_errors);
        self.endpoint.receive(now, |from, cell| {
            if let Some(n) = tunnel.handle_cell(now, from, cell, &mut OsRng) {
                gro.push(payload(cell, n), &mut tun_writer(tun, errors));
            }
        });
        self.gro.flush(&mut tun_writer(&mut self.tun, &mut self.tun_write_errors));
    }

    /// Drains the TUN device: IP packets (TCP super-packets cut back into segments) in, each
    /// sealed straight into a cell and queued for the guard.
    async fn transmit(&mut self, cell: &mut [u8; CELL_LEN]) {
        self.tun_left = true;
        for _ in 0..BATCH {
            let Some(tun) = self.tun.as_mut() else { return };
            let Ok(n) = tun.get_mut().read(&mut self.tun_rx) else {
                self.tun_left = false;
                break;
            };
            let (tunnel, socket) = (&mut self.tunnel, self.endpoint.socket());
            let (read_errors, send_errors) = (&mut self.tun_read_errors, &mut self.send_errors);
            let segmented = tso::segment(&self.tun_rx[..n], &mut self.tso_scratch, &mut |packet| {
                if packet.len() > TUN_MTU {
                    *read_errors += 1;
                    return;
                }
                payload_mut(cell)[..packet.len()].copy_from_slice(packet);
                if let Some(to) = tunnel.seal_packet(packet.len(), cell)
                    && !socket.queue(to, cell)
                {
                    *send_errors += 1;
                }
            });
            if segmented.is_err() {
                self.tun_read_errors += 1;
            }
            if self.endpoint.socket().queued() >= crate::udp::GSO_CELLS {
                self.send_flush().await;
            }
        }
        self.send_flush().await;
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let t = &self.tunnel;
        let hop = |r: &Relay| HopStatus {
            nickname: r.desc.nickname.clone(),
            identity: r.id().to_string(),
            address: r.hop.addr.to_string(),
        };
        let session = t.session();
        let c = t.counters();
        Status {
            state: t.state(),
            reason: t.reason().map(str::to_owned),
            path: t.path().iter().map(hop).collect(),
            exit: t.path().last().filter(|_| session.is_some()).map(hop),
            inner_ipv4: session.map(|s| s.ipv4.0.to_string()),
            inner_ipv6: session.map(|s| s.ipv6.0.to_string()),
            dns: session.map(|s| vec![s.dns.0.to_string(), s.dns.1.to_string()]).unwrap_or_default(),
            bytes_sent: c.bytes_sent,
            bytes_received: c.bytes_received,
            packets_sent: c.packets_sent,
            packets_received: c.packets_received,
            packets_dropped: c.dropped_no_circuit,
            cells_rejected: c.dropped_bad_cells,
            stray_datagrams: self.endpoint.counters().stray,
            control_refused: c.control_refused,
            send_errors: self.send_errors + self.endpoint.cells_lost(),
            tun_write_errors: self.tun_write_errors,
            tun_read_errors: self.tun_read_errors,
            rtt_ms: t.rtt().map(|d| d.as_secs_f64() * 1e3),
            suites: t.circuit().map(|c| c.suites().iter().map(|s| s.name().to_owned()).collect()).unwrap_or_default(),
            uptime_secs: now.duration_since(self.started).as_secs(),
            circuit_age_secs: t.up_since().filter(|_| t.state() == State::Up).map(|u| now.duration_since(u).as_secs()),
            circuit_build_ms: t.circuit().and_then(|c| c.build_time()).map(|d| d.as_secs_f64() * 1e3),
            rebuilds: c.rebuilds,
            exit_changes: c.exit_changes,
            session_changes: c.session_changes,
            tampered: c.tampered,
            directory_expires: t.relays().expires,
            directory_expired: t.directory_expired(now),
            guards: t.guards().entries().iter().map(|g| g.id.to_string()).collect(),
            kill_switch: self.kill_switch,
            kill_switch_drops: self.kill_switch.then(|| killswitch::dropped(killswitch::TABLE)).flatten(),
            tun: self.tun.as_ref().map(|_| self.config.tun.clone()),
        }
    }
}

fn bind_control(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("another meshvpn answers on {}; run `meshvpn down` first", path.display());
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// `meshvpn up` without `--foreground`: starts the client in the background (its log in
/// `state_dir/meshvpn.log`) and returns once the tunnel is up, or fails with the log's end.
pub fn spawn_background(config_path: &Path, config: &Config, hops: Option<usize>) -> Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create the state directory {}", config.state_dir.display()))?;
    let log_path = config.state_dir.join("meshvpn.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open the log {}", log_path.display()))?;
    let log_start = log.seek(std::io::SeekFrom::End(0))?;
    let config_path = std::fs::canonicalize(config_path)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("up").arg("--config").arg(&config_path).arg("--foreground");
    if let Some(h) = hops {
        cmd.arg("--hops").arg(h.to_string());
    }
    // Its own process group: a Ctrl-C in this terminal must not reach it.
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let mut child = cmd.spawn().context("cannot start meshvpn in the background")?;
    let deadline = Instant::now() + UP_WAIT;
    loop {
        if let Some(code) = child.try_wait()? {
            bail!("meshvpn did not come up ({code}):\n{}", log_tail(&log_path, log_start));
        }
        if let Ok(s) = control::status(&config.control_socket)
            && s.state == State::Up
        {
            print!("{s}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the tunnel is not up after {} s; meshvpn (pid {}) keeps trying in the background: see `meshvpn status` and {}",
                UP_WAIT.as_secs(),
                child.id(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_tail(path: &Path, from: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let _ = f.seek(std::io::SeekFrom::Start(from));
    let mut lines: Vec<String> = std::io::BufReader::new(f).lines().map_while(Result::ok).collect();
    let keep = lines.len().saturating_sub(20);
    lines.drain(..keep);
    lines.join("\n")
}

/// `meshvpn down`: asks the running client to stop and waits until it has undone its
/// changes; with no client running, undoes what a crashed one left in `state_dir`.
pub fn down(socket: &Path, state_dir: Option<&Path>) -> Result<()> {
    match control::request(socket, Request::Down) {
        Ok(_) => {
            let deadline = Instant::now() + Duration::from_secs(15);
            while socket.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if socket.exists() {
                bail!("meshvpn did not finish stopping within 15 s; see its log");
            }
            println!("meshvpn is down");
            Ok(())
        }
        Err(e) => {
            if let Some(dir) = state_dir
                && crate::system::recover(dir)?
            {
                println!("meshvpn was not running; undid the changes a previous run left");
                return Ok(());
            }
            Err(e.context(match state_dir {
                Some(dir) => format!("meshvpn is not running, and left nothing to undo in {}", dir.display()),
                None => "meshvpn is not running; to remove a kill switch a stopped client left, run \
                         `meshvpn down --config FILE` with its configuration"
                    .to_owned(),
            }))
        }
    }
}
