//! The provided buffer ring: receive buffers the kernel picks from for the multishot `recvmsg`,
//! and the ring of descriptors through which they are handed to it.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;

/// Page-aligned zeroed memory the kernel reads or writes through raw pointers; never borrowed
/// as a whole by Rust while the kernel may use it.
pub(super) struct Region {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Set when the kernel might still use it at drop: then the memory is leaked.
    leak: bool,
}

impl Region {
    pub(super) fn new(size: usize) -> io::Result<Region> {
        let layout = Layout::from_size_align(size.max(1), 4096).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) }).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(Region { ptr, layout, leak: false })
    }

    pub(super) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.leak {
            // SAFETY: allocated in `new` with this layout, freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

/// `struct io_uring_buf`: one entry of the provided buffer ring. The ring's tail is the `resv`
/// field of entry 0, so entries are written field by field and `resv` never.
#[repr(C)]
struct BufEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// `count` buffers of `size` bytes and the ring that provides them. Every buffer is either in
/// the ring (the kernel's) or held by the backend between a completion and [`BufRing::provide`].
pub(super) struct BufRing {
    bufs: Region,
    ring: Region,
    size: usize,
    count: u16,
    /// Our copy of the ring's tail.
    tail: u16,
    /// Buffers the kernel holds.
    in_ring: usize,
}

impl BufRing {
    /// Allocates `count` (a power of two) buffers of `size` bytes, registers the ring as group
    /// `bgid` of `uring`, and provides every buffer.
    pub(super) fn new(uring: &IoUring, size: usize, count: u16, bgid: u16) -> io::Result<BufRing> {
        debug_assert!(count.is_power_of_two());
        let bufs = Region::new(size * usize::from(count))?;
        let ring = Region::new(size_of::<BufEntry>() * usize::from(count))?;
        // SAFETY: `ring` holds `count` entries (a power of two), is page-aligned and zeroed
        // (tail 0), and outlives the registration: the backend declares its `IoUring` before
        // its `BufRing`, so the ring is closed first, and leaks the memory if the kernel might
        // still use it (see `leak`).
        unsafe { uring.submitter().register_buf_ring_with_flags(ring.addr(), count, bgid, 0)? };
        let mut this = BufRing { bufs, ring, size, count, tail: 0, in_ring: 0 };
        for bid in 0..count {
            this.provide(bid);
        }
        this.publish();
        Ok(this)
    }

    /// The size of each buffer.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// Buffers the kernel holds (can receive into).
    pub(super) fn in_ring(&self) -> usize {
        self.in_ring
    }

    /// Notes that the kernel filled buffer `bid` and gave it back (returns whether `bid` is
    /// one of ours).
    pub(super) fn taken(&mut self, bid: u16) -> bool {
        self.in_ring = self.in_ring.saturating_sub(1);
        bid < self.count
    }

    /// The first byte of buffer `bid` (< count), for slices the backend makes while it holds
    /// the buffer.
    pub(super) fn buffer(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.count);
        self.bufs.ptr.as_ptr().wrapping_add(usize::from(bid) * self.size)
    }

    /// Puts buffer `bid` (one we hold) at the ring's tail, visible to the kernel after
    /// [`BufRing::publish`].
    pub(super) fn provide(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.count - 1));
        let addr = self.buffer(bid) as u64;
        // SAFETY: `idx` < `count`, the ring's entry count, so the entry is inside `ring`. Every
        // buffer is either in the ring or held by us, and this one is held, so the slot at our
        // tail is beyond the kernel's head: the kernel does not read it until `publish`. Only
        // `addr`, `len` and `bid` are written (`resv` of entry 0 is the tail the kernel reads).
        unsafe {
            let entry = self.ring.ptr.as_ptr().cast::<BufEntry>().add(idx);
            ptr::addr_of_mut!((*entry).addr).write(addr);
            ptr::addr_of_mut!((*entry).len).write(self.size as u32);
            ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.in_ring += 1;
    }

    /// Makes the provided buffers visible to the kernel.
    pub(super) fn publish(&self) {
        let entry0 = self.ring.ptr.as_ptr().cast::<BufEntry>();
        // SAFETY: the tail is the `u16` at offset 14 of the page-aligned ring (entry 0's
        // `resv`), valid for the ring's life and accessed atomically by the kernel too.
        let tail = unsafe { &*ptr::addr_of!((*entry0).resv).cast::<AtomicU16>() };
        // Release: the entries written before are visible to the kernel once it sees the tail.
        tail.store(self.tail, Ordering::Release);
    }

    /// Keeps the memory allocated forever: the kernel might still use it.
    pub(super) fn leak(&mut self) {
        self.bufs.leak = true;
        self.ring.leak = true;
    }
}
