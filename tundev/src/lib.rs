//! Linux TUN devices for meshvpn: the exit's last hop (packets a circuit delivers are written
//! into it and the kernel routes them; replies are read back by the worker owning the circuit)
//! and the client's tunnel (everything the laptop sends is read from it and sealed into cells).
//!
//! A [`Tun`] is a Linux TUN device (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`: bare IP packets, no
//! packet-information header) with one file descriptor per queue. With more than one queue it is
//! created `IFF_MULTI_QUEUE`, and the kernel spreads the packets it routes into the device over
//! the queues by flow hash, so each worker thread can own one [`TunQueue`] with no lock between
//! them (the same shape as relayd's data path: one worker, its own descriptors, batched I/O).
//! Every descriptor is non-blocking: a worker polls it (or will submit it to its io_uring) and
//! reads until `EAGAIN`.
//!
//! **Clean-up.** The device is not persistent: it exists while at least one of its descriptors is
//! open and the kernel deletes it, with its addresses and routes, when the last one closes. A
//! crashed or killed exitd therefore leaves no interface behind (the kernel closes a dead
//! process's descriptors). If an operator pre-created a persistent device of the same name
//! (`ip tuntap add mode tun multi_queue name mvexit0 user exitd`, so exitd may attach without
//! `CAP_NET_ADMIN`), [`Tun::create`] attaches to it instead and [`Tun::persistent`] says so;
//! that device then outlives exitd, as its operator asked.
//!
//! **Configuration** ([`configure`], in `setup.rs`) runs `ip` (iproute2): it is one-time setup at
//! start, not on any packet path, exactly what `wg-quick` does, and it spares exitd a netlink
//! implementation. Its exit status is checked and its stderr is part of the error.
//!
//! **Offloads.** With `IFF_VNET_HDR` ([`Tun::create_with`]) every packet carries a
//! `virtio_net_hdr`. Writes: [`gro`] joins the TCP segments that come out of a circuit into one
//! GSO super-packet per write, as wireguard-go and Tailscale do. Reads: after
//! [`Tun::enable_offloads`] the kernel hands over TCP super-packets (up to 64 KiB) and packets
//! with partial checksums, which [`tso`] cuts into ordinary packets; without it, the kernel
//! segments and checksums first, no packet read exceeds the MTU, and a [`PACKET_BUF_LEN`]
//! buffer always fits one (a larger one is dropped and counted, never handed on truncated).
//!
//! All of the module's `unsafe` (in this file) is in three small private helpers around `struct ifreq`: zeroing
//! one, reading its flags, and the ioctl itself.

use std::ffi::CStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

pub mod gro;
mod setup;
pub mod tso;

pub use setup::configure;

/// The size of one packet buffer in a batch: room for any packet at an MTU up to 2048 (exitd
/// and the client give their devices 1304, the largest IP packet one cell carries through a
/// full-length circuit, `cellproto::cell::TUN_MTU`; the caller passes it to [`configure`]).
pub const PACKET_BUF_LEN: usize = 2048;

/// Length of the `struct virtio_net_hdr` before each packet of an `IFF_VNET_HDR` device (the
/// kernel's default `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;

/// The smallest MTU [`configure`] accepts: IPv6 needs 1280 (RFC 8200 §5).
pub const MIN_MTU: u32 = 1280;

/// The largest MTU [`configure`] accepts (the TUN driver's own limit).
pub const MAX_MTU: u32 = 65535;

/// The kernel's limit on a multi-queue TUN's queues (`MAX_TAP_QUEUES`).
pub const MAX_QUEUES: usize = 256;

const TUN_PATH: &str = "/dev/net/tun";

// The ioctls below take exactly a `struct ifreq` (the kernel copies `sizeof(struct ifreq)`).
const _: () = assert!(size_of::<libc::ifreq>() == 40);

/// Counters one queue keeps about its own work (exported as metrics by the worker).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TunStats {
    /// Packets read from the device.
    pub rx_packets: u64,
    /// Reads that failed, or packets dropped because they did not fit the buffer.
    pub rx_errors: u64,
    /// Packets written into the device.
    pub tx_packets: u64,
    /// Writes the kernel refused (the packets are lost).
    pub tx_errors: u64,
}

/// What [`TunQueue::write_batch`] did.
#[derive(Debug, Default)]
pub struct BatchWrite {
    /// Packets the kernel accepted.
    pub written: usize,
    /// Packets it refused (malformed, device down, out of memory, …).
    pub failed: usize,
    /// Why the last refused packet was refused.
    pub last_error: Option<io::Error>,
}

/// A Linux TUN device with one non-blocking descriptor per queue. Hand the queues to their
/// workers with [`Tun::queues`]; the device lives until the last queue is dropped.
#[derive(Debug)]
pub struct Tun {
    name: String,
    queue_count: usize,
    persistent: bool,
    queues: Vec<TunQueue>,
}

impl Tun {
    /// Creates (or attaches to) the TUN device `name` with `queues` queues: one open of
    /// `/dev/net/tun` and one `TUNSETIFF` per queue, `IFF_MULTI_QUEUE` when `queues > 1`. The
    /// device is created in the network namespace of the calling thread, and down: see
    /// [`configure`].
    ///
    /// `name` follows the kernel's rules (1–15 bytes, printable ASCII, no `/` or `:`); it may be
    /// a template such as `"mvexit%d"`, in which case [`Tun::name`] is the name the kernel chose.
    /// Needs `CAP_NET_ADMIN`, unless attaching to a persistent device its owner may use. Fails if
    /// `name` is another kind of interface, or a TUN device with other flags or in use.
    pub fn create(name: &str, queues: usize) -> io::Result<Tun> {
        Self::create_with(name, queues, false)
    }

    /// [`Tun::create`], optionally with `IFF_VNET_HDR`: then every packet read begins with a
    /// [`VNET_HDR_LEN`]-byte `struct virtio_net_hdr` (all zero: no offloads are enabled for
    /// reads), and every packet written must begin with one, which lets a writer hand the
    /// kernel a GSO super-packet (many TCP segments in one write, as wireguard-go does).
    pub fn create_with(name: &str, queues: usize, vnet_hdr: bool) -> io::Result<Tun> {
        validate_name(name, true)?;
        if queues == 0 || queues > MAX_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a TUN device has 1 to {MAX_QUEUES} queues, not {queues}"),
            ));
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        // c_short is what the kernel reads; every flag above fits in 16 bits.
        let flags = flags as libc::c_short;

        let mut name = name.to_owned();
        let mut opened = Vec::with_capacity(queues);
        for index in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK) // std adds O_CLOEXEC itself
                .open(TUN_PATH)
                .map_err(|e| context(e, format_args!("opening {TUN_PATH}")))?;
            let mut ifr = ifreq_for(&name, flags)?;
            tun_ioctl(&file, libc::TUNSETIFF, &mut ifr)
                .map_err(|e| context(e, format_args!("TUNSETIFF {name:?} (queue {} of {queues})", index + 1)))?;
            // The kernel writes back the device's name: the real one if `name` was a template.
            if index == 0 {
                name = ifreq_name(&ifr)?;
            }
            opened.push(TunQueue { file, name: name.clone(), index, stats: TunStats::default() });
        }

        let persistent = match opened.first() {
            Some(first) => {
                let mut ifr = ifreq_for(&name, 0)?;
                tun_ioctl(&first.file, libc::TUNGETIFF, &mut ifr)
                    .map_err(|e| context(e, format_args!("TUNGETIFF {name:?}")))?;
                ifreq_flags(&ifr) & libc::IFF_PERSIST as libc::c_short != 0
            }
            None => false,
        };
        Ok(Tun { name, queue_count: queues, persistent, queues: opened })
    }

    /// The device's name (the kernel's choice if [`Tun::create`] was given a template).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many queues the device was created with (whether or not they were handed out).
    pub fn queue_count(&self) -> usize {
        self.queue_count
    }

    /// Whether the device is persistent, i.e. was pre-created by the operator and outlives its
    /// descriptors. A device [`Tun::create`] made itself is not.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// [`TunQueue::enable_offloads`] for the device (through its first queue).
    pub fn enable_offloads(&self) -> io::Result<()> {
        match self.queues.first() {
            Some(q) => q.enable_offloads(),
            None => Err(io::Error::other("the queues were handed out already")),
        }
    }

    /// Hands the queues over, one per worker, in order; later calls return an empty `Vec`. The
    /// device lives as long as any of them.
    pub fn queues(&mut self) -> Vec<TunQueue> {
        std::mem::take(&mut self.queues)
    }

    /// Consumes the device, handing over the queues not yet taken.
    pub fn into_queues(self) -> Vec<TunQueue> {
        self.queues
    }
}

/// One queue of a [`Tun`]: a non-blocking descriptor meant to be owned by one worker thread.
/// Each read returns one whole IP packet; each write injects one.
pub struct TunQueue {
    file: File,
    name: String,
    index: usize,
    stats: TunStats,
}

impl fmt::Debug for TunQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunQueue")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("fd", &self.file.as_raw_fd())
            .finish()
    }
}

impl TunQueue {
    /// Lets the kernel hand over TCP super-packets and packets with partial checksums
    /// (`TUNSETOFFLOAD`: checksum, TSO4, TSO6), which [`tso::segment`] turns back into plain
    /// packets. Needs an `IFF_VNET_HDR` device ([`Tun::create_with`]); the setting is the
    /// device's, so one queue is enough.
    pub fn enable_offloads(&self) -> io::Result<()> {
        offload_ioctl(&self.file, libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .map_err(|e| context(e, format_args!("TUNSETOFFLOAD on {:?}", self.name)))
    }

    /// Reads one packet into `buf`, returning its length; `ErrorKind::WouldBlock` when none is
    /// waiting. A packet longer than `buf` (which the kernel truncates to fit) is dropped with
    /// `ErrorKind::InvalidData`, detected by its IP header's length field.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = loop {
            match self.file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match result {
            // The TUN driver copies what fits and returns that length, so a packet that filled
            // the buffer may have been cut: its IP header says.
            Ok(n) if n >= buf.len() && ip_length(buf).is_some_and(|len| len > buf.len()) => {
                self.stats.rx_errors += 1;
                let len = ip_length(buf).unwrap_or(n);
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: dropped a {len}-byte packet larger than the {}-byte buffer", self.name, buf.len()),
                ))
            }
            Ok(n) => {
                self.stats.rx_packets += 1;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                self.stats.rx_errors += 1;
                Err(e)
            }
        }
    }

    /// Writes one IP packet into the device (the kernel then routes it as if received),
    /// returning the bytes written. The kernel refuses anything that is not IPv4 or IPv6 by its
    /// first nibble (`EINVAL`) and drops malformed IP later, silently; an empty packet is refused
    /// here.
    pub fn write(&mut self, packet: &[u8]) -> io::Result<usize> {
        if packet.is_empty() {
            self.stats.tx_errors += 1;
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty packet"));
        }
        let result = loop {
            match self.file.write(packet) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match &result {
            Ok(_) => self.stats.tx_packets += 1,
            Err(_) => self.stats.tx_errors += 1,
        }
        result
    }

    /// Reads packets into `bufs` until none is waiting or `bufs` (or `lens`) is full, storing
    /// packet `i`'s length in `lens[i]`; returns how many were read (0 when none was waiting).
    /// Oversized packets are skipped (and counted). An error other than "would block" is
    /// returned only if it comes first; after some packets it ends the batch and will recur on
    /// the next call if it persists.
    pub fn read_batch(&mut self, bufs: &mut [[u8; PACKET_BUF_LEN]], lens: &mut [usize]) -> io::Result<usize> {
        let capacity = bufs.len().min(lens.len());
        let mut count = 0;
        while count < capacity {
            let (Some(buf), Some(len)) = (bufs.get_mut(count), lens.get_mut(count)) else { break };
            match self.read(buf) {
                Ok(0) => break,
                Ok(n) => {
                    *len = n;
                    count += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if count == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(count)
    }

    /// Writes each packet; a refused packet is counted and the rest are still written. Never
    /// fails as a whole and never panics.
    pub fn write_batch<I>(&mut self, packets: I) -> BatchWrite
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let mut outcome = BatchWrite::default();
        for packet in packets {
            match self.write(packet.as_ref()) {
                Ok(_) => outcome.written += 1,
                Err(e) => {
                    outcome.failed += 1;
                    outcome.last_error = Some(e);
                }
            }
        }
        outcome
    }

    /// The descriptor, for polling or for submitting to an io_uring.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which queue this is (0-based, in [`Tun::queues`] order).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Counters so far.
    pub fn stats(&self) -> TunStats {
        self.stats
    }
}

impl AsFd for TunQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for TunQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The length an IPv4 or IPv6 packet's header claims for the whole packet, if `packet` starts
/// with enough of one to say.
fn ip_length(packet: &[u8]) -> Option<usize> {
    let field = |at: usize| Some(usize::from(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?])));
    match packet.first()? >> 4 {
        4 => field(2),
        6 => field(4).map(|payload| payload + 40),
        _ => None,
    }
}

/// Checks `name` against the kernel's `dev_valid_name` (and keeps it from reading as an option
/// to `ip`): 1–15 bytes of printable ASCII other than `/` and `:`, not `.` or `..`, not starting
/// with `-`. `%` (a template for the kernel to fill in) only if `template`.
fn validate_name(name: &str, template: bool) -> io::Result<()> {
    let valid = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && (template || b != b'%'));
    if valid {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a valid interface name")))
    }
}

/// An `ifreq` carrying `name` and `flags`.
fn ifreq_for(name: &str, flags: libc::c_short) -> io::Result<libc::ifreq> {
    let mut ifr = zeroed_ifreq();
    // `validate_name` keeps names below IFNAMSIZ; checked again so the NUL always fits.
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name:?} is too long")));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags;
    Ok(ifr)
}

/// The name the kernel wrote back into `ifr`.
fn ifreq_name(ifr: &libc::ifreq) -> io::Result<String> {
    let bytes: Vec<u8> = ifr.ifr_name.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .ok()
        .and_then(|name| name.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the kernel returned an unreadable interface name"))
}

/// The flags in `ifr`.
fn ifreq_flags(ifr: &libc::ifreq) -> libc::c_short {
    // SAFETY: every `ifreq` here comes from `zeroed_ifreq`, so all bytes of the union are
    // initialised, and any bit pattern is a valid `c_short`.
    unsafe { ifr.ifr_ifru.ifru_flags }
}

/// An all-zero `ifreq`.
fn zeroed_ifreq() -> libc::ifreq {
    // SAFETY: `ifreq` is a C struct of a `c_char` array and a union of integers, integer arrays,
    // `sockaddr`s (integers) and a raw pointer; the all-zero bit pattern is valid for each (a
    // null pointer is a valid raw pointer value).
    unsafe { std::mem::zeroed() }
}

/// `ioctl(file, request, ifr)` for the TUN ioctls that take a `struct ifreq`.
fn offload_ioctl(file: &File, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: `file` is an open descriptor of /dev/net/tun, borrowed for the call; TUNSETOFFLOAD
    // takes its argument by value (an unsigned long of TUN_F_* flags), so no memory of ours is
    // read or written.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn tun_ioctl(file: &File, request: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `file` is an open descriptor of /dev/net/tun, borrowed for the call. `request` is
    // TUNSETIFF or TUNGETIFF (the only callers), which read and/or write exactly one
    // `struct ifreq` at the pointer: `ifr` is a valid, exclusively borrowed, fully initialised
    // `libc::ifreq` of the kernel's size (asserted at compile time above), living across the
    // call. The kernel keeps no reference to it afterwards.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request, std::ptr::from_mut(ifr)) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `e` with `what` in front of its message, keeping its kind.
fn context(e: io::Error, what: fmt::Arguments<'_>) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_rules() {
        for ok in ["mvexit0", "a", "tun-1_x.y", "fifteen_chars_x"] {
            assert!(validate_name(ok, false).is_ok(), "{ok}");
        }
        assert!(validate_name("mvexit%d", true).is_ok());
        for bad in ["", ".", "..", "sixteen_chars_xx", "a/b", "a:b", "a b", "-x", "é", "a\0b", "mvexit%d"] {
            assert!(validate_name(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ifreq_round_trips_a_name() {
        let ifr = ifreq_for("mvexit0", 0x1001).unwrap();
        assert_eq!(ifreq_name(&ifr).unwrap(), "mvexit0");
        assert_eq!(ifreq_flags(&ifr), 0x1001);
        assert!(ifreq_for("0123456789abcdef", 0).is_err());
    }

    #[test]
    fn bad_arguments_are_refused_before_any_syscall() {
        assert_eq!(Tun::create("mvexit0", 0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(Tun::create("mvexit0", MAX_QUEUES + 1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(Tun::create("bad/name", 1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let v4 = "10.8.0.1/16".parse().unwrap();
        let v6 = "fd00:8::1/64".parse().unwrap();
        assert_eq!(configure("mvexit0", 1279, v4, v6).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(configure("mvexit0", 65536, v4, v6).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(configure("-h", 1304, v4, v6).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn ip_length_reads_the_header() {
        assert_eq!(ip_length(&[0x45, 0, 0x0b, 0xd4]), Some(3028));
        assert_eq!(ip_length(&[0x60, 0, 0, 0, 0x05, 0xdc]), Some(1540));
        assert_eq!(ip_length(&[0x45, 0]), None);
        assert_eq!(ip_length(&[0x60, 0, 0, 0, 0x05]), None);
        assert_eq!(ip_length(&[0x15; 40]), None);
        assert_eq!(ip_length(&[]), None);
    }
}
