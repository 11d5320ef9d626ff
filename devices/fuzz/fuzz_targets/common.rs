//! What the fuzz targets share: an interrupt line that does nothing, queues over
//! fuzz-written rings, and a datagram socket pair standing in for a TAP device.
#![allow(dead_code)] // each target uses a part

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use devices::virtio::net::NetBackend;
use devices::InterruptLine;
use virtio_queue::{Queue, QueueT};

/// A disk image of `sectors` sectors of `fill` in the temporary directory,
/// created on first use (one per fuzzing process).
pub fn image(tag: &str, fill: u8, sectors: usize) -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("vmm-fuzz-{tag}-{}.img", std::process::id()));
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&vec![fill; sectors * 512])
            .unwrap();
        p
    })
}

pub struct NoIrq;
impl InterruptLine for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}
impl devices::virtio::VirtioInterrupt for NoIrq {
    fn trigger(&self, _: devices::virtio::InterruptCause) -> std::io::Result<()> {
        Ok(())
    }
}

/// A ready queue of `size` entries: descriptor table at `base`, available ring
/// at `base + 0x1000`, used ring at `base + 0x2000`.
pub fn queue(base: u64, size: u16, event_idx: bool) -> Queue {
    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
    q.set_ready(true);
    q.set_event_idx(event_idx);
    q
}

/// The device's end of a SOCK_DGRAM socket pair (`.0`) and the peer end (`.1`).
pub struct Sock(pub OwnedFd, pub OwnedFd);
impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
impl NetBackend for Sock {
    fn supports_offloads(&self) -> bool {
        false
    }
    fn set_offloads(&mut self, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn socket_pair() -> Sock {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into `fds`.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both descriptors are new and owned here.
    unsafe { Sock(OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}
