//! A minimal AF_XDP transmitter in copy mode, with raw syscalls (no libxdp, no new crate):
//! what a tenant with `CAP_NET_RAW` can do to put frames on its interface without any
//! socket-address hook seeing them. `dg-probe xdp-tx` runs it inside a pod-like namespace.
//!
//! The sequence a TX-only socket needs (Documentation/networking/af_xdp.rst): register a
//! UMEM (the frames' memory), size its fill and completion rings (the kernel requires both
//! even for TX only), size the TX ring, map the TX and completion rings, bind to queue 0
//! with `XDP_COPY` (generic copy mode works on any netdev, veth included, and needs no XDP
//! program: that is only for receiving), write one descriptor per frame, publish them, and
//! kick the kernel with `sendto`. The completion ring then hands back every frame the
//! kernel transmitted: that is the sender's own proof of sending (delivery is the test's
//! to count on the far side).

use std::{
    mem::{size_of, zeroed},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Size of one UMEM frame (and the UMEM is [`RING`] of them).
const FRAME: usize = 4096;
/// Entries in each ring (a power of two, as the kernel requires) and frames per call.
const RING: u32 = 16;

/// A failed step: the syscall that failed and its errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpError {
    pub errno: i32,
    pub step: String,
}

impl std::fmt::Display for XdpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let msg = std::io::Error::from_raw_os_error(self.errno).to_string();
        let msg = msg.split(" (os error").next().unwrap_or(&msg).to_owned();
        write!(f, "{}: {msg} (errno {})", self.step, self.errno)
    }
}

fn last_error(step: &str) -> XdpError {
    XdpError {
        errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        step: step.to_owned(),
    }
}

/// An anonymous or ring mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: i32, len: usize, offset: u64, step: &str) -> Result<Mapping, XdpError> {
        let (flags, fd) = if fd < 0 {
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
        } else {
            (libc::MAP_SHARED | libc::MAP_POPULATE, fd)
        };
        // SAFETY: a fresh mapping the kernel chooses the address of; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_error(step));
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| last_error(step))?;
        Ok(Mapping { ptr, len })
    }

    /// The u32 ring index at byte `offset` (producer or consumer), shared with the kernel.
    fn index(&self, offset: u64) -> &AtomicU32 {
        assert!(offset as usize + 4 <= self.len);
        // SAFETY: in bounds (checked), 4-aligned (the kernel's offsets are), and the kernel
        // only ever accesses it atomically too.
        unsafe { &*self.ptr.as_ptr().add(offset as usize).cast::<AtomicU32>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by mmap with this length and is not used after.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn setsockopt<T>(fd: &OwnedFd, name: i32, value: &T, step: &str) -> Result<(), XdpError> {
    // SAFETY: valid fd; value points to a T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(last_error(step));
    }
    Ok(())
}

/// Sends `frames` (complete Ethernet frames, at most [`RING`], each at most [`FRAME`] bytes)
/// on queue 0 of `ifindex` through an AF_XDP socket bound in copy mode, and waits until the
/// completion ring has handed every one back (or `timeout` passes). Returns how many the
/// kernel completed.
pub fn send_frames(ifindex: u32, frames: &[Vec<u8>], timeout: Duration) -> Result<u32, XdpError> {
    assert!(frames.len() <= RING as usize && frames.iter().all(|f| f.len() <= FRAME));
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last_error("socket(AF_XDP)"));
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    let umem = Mapping::new(-1, FRAME * RING as usize, 0, "mmap(UMEM)")?;
    // SAFETY: xdp_umem_reg is plain data; all-zero (no flags, no headroom) is valid.
    let mut reg: libc::xdp_umem_reg = unsafe { zeroed() };
    reg.addr = umem.ptr.as_ptr() as u64;
    reg.len = umem.len as u64;
    reg.chunk_size = FRAME as u32;
    setsockopt(&fd, libc::XDP_UMEM_REG, &reg, "setsockopt(XDP_UMEM_REG)")?;
    setsockopt(
        &fd,
        libc::XDP_UMEM_FILL_RING,
        &RING,
        "setsockopt(XDP_UMEM_FILL_RING)",
    )?;
    setsockopt(
        &fd,
        libc::XDP_UMEM_COMPLETION_RING,
        &RING,
        "setsockopt(XDP_UMEM_COMPLETION_RING)",
    )?;
    setsockopt(&fd, libc::XDP_TX_RING, &RING, "setsockopt(XDP_TX_RING)")?;

    // SAFETY: xdp_mmap_offsets is plain data the kernel fills.
    let mut off: libc::xdp_mmap_offsets = unsafe { zeroed() };
    let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
    // SAFETY: valid fd, buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_MMAP_OFFSETS,
            (&raw mut off).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(last_error("getsockopt(XDP_MMAP_OFFSETS)"));
    }
    let tx_len = off.tx.desc as usize + RING as usize * size_of::<libc::xdp_desc>();
    let tx = Mapping::new(
        fd.as_raw_fd(),
        tx_len,
        libc::XDP_PGOFF_TX_RING as u64,
        "mmap(TX ring)",
    )?;
    let cr_len = off.cr.desc as usize + RING as usize * size_of::<u64>();
    let cr = Mapping::new(
        fd.as_raw_fd(),
        cr_len,
        libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        "mmap(completion ring)",
    )?;

    // SAFETY: sockaddr_xdp is plain data; all-zero is valid.
    let mut sxdp: libc::sockaddr_xdp = unsafe { zeroed() };
    sxdp.sxdp_family = libc::AF_XDP as u16;
    sxdp.sxdp_flags = libc::XDP_COPY;
    sxdp.sxdp_ifindex = ifindex;
    sxdp.sxdp_queue_id = 0;
    // The queue stays taken for a moment after the previous AF_XDP socket on it closed (the
    // kernel releases its buffer pool from a workqueue): EBUSY until then, so try again.
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: valid fd and sockaddr of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sxdp).cast(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
        let e = last_error("bind(AF_XDP, XDP_COPY, queue 0)");
        if e.errno != libc::EBUSY || Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    // Fill the UMEM frames and the TX descriptors, then publish them with one release store
    // of the producer index (the kernel reads descriptors only below it).
    let producer = tx.index(off.tx.producer);
    let start = producer.load(Ordering::Relaxed);
    for (i, frame) in frames.iter().enumerate() {
        let addr = i * FRAME;
        // SAFETY: the frame fits its UMEM chunk (asserted above); the kernel reads it only
        // after the producer store below.
        unsafe {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), umem.ptr.as_ptr().add(addr), frame.len());
        }
        let slot = (start.wrapping_add(i as u32) & (RING - 1)) as usize;
        let desc = libc::xdp_desc {
            addr: addr as u64,
            len: frame.len() as u32,
            options: 0,
        };
        // SAFETY: slot < RING, inside the TX ring's descriptor array mapped above.
        unsafe {
            tx.ptr
                .as_ptr()
                .add(off.tx.desc as usize + slot * size_of::<libc::xdp_desc>())
                .cast::<libc::xdp_desc>()
                .write_volatile(desc);
        }
    }
    producer.store(start.wrapping_add(frames.len() as u32), Ordering::Release);

    // Copy mode transmits in the sendto call; kick until every frame is completed.
    let completed = cr.index(off.cr.producer);
    let cr_start = cr.index(off.cr.consumer).load(Ordering::Relaxed);
    loop {
        // SAFETY: valid fd; no buffer, no address: a TX kick.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        if rc < 0 {
            let e = last_error("sendto(AF_XDP kick)");
            // Busy or out of buffers: the kernel is still working; try again.
            if ![libc::EAGAIN, libc::EBUSY, libc::ENOBUFS].contains(&e.errno) {
                return Err(e);
            }
        }
        let done = completed.load(Ordering::Acquire).wrapping_sub(cr_start);
        if done >= frames.len() as u32 || Instant::now() >= deadline {
            return Ok(done);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
