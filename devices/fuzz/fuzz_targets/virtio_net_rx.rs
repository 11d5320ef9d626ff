//! Guest-controlled virtio-net receive chains: the fuzz input is written over
//! the receive queue's descriptor table, available ring and buffers, and picks
//! MRG_RXBUF, EVENT_IDX and the sizes of the frames waiting in the backend. The
//! device must never panic, hang, or write outside the buffers it was given.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use devices::virtio::net::{Net, NetBackend};
use devices::virtio::{Interrupt, VirtioDevice};
use devices::InterruptLine;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x20000;
const QSIZE: u16 = 16;

struct NoIrq;
impl InterruptLine for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The device's end of a socket pair, and the peer end kept open.
struct Sock(OwnedFd, OwnedFd);
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

fn queue(base: u64, event_idx: bool) -> Queue {
    let mut q = Queue::new(256).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
    q.set_ready(true);
    q.set_event_idx(event_idx);
    q
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let Some((&flags, data)) = data.split_first() else { return };
    // Frame lengths waiting in the backend: three, from 0 to 8191 bytes.
    let (lens, data) = data.split_at(data.len().min(6));
    // Receive queue rings at 0x1000: descriptor table, then available ring; the
    // rest of the input is buffer memory from 0x10000.
    let (desc, rest) = data.split_at(data.len().min(16 * QSIZE as usize));
    let (avail, bufs) = rest.split_at(rest.len().min(4 + 2 * QSIZE as usize));
    mem.write_slice(desc, GuestAddress(0x1000)).unwrap();
    mem.write_slice(avail, GuestAddress(0x2000)).unwrap();
    mem.write_slice(&bufs[..bufs.len().min(0x10000)], GuestAddress(0x10000)).unwrap();
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into `fds`.
    assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are new and owned here.
    let sock = unsafe { Sock(OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let frame = [0x5au8; 8192];
    for pair in lens.chunks(2) {
        let len = usize::from(u16::from_le_bytes([pair[0], *pair.get(1).unwrap_or(&0)])) % frame.len();
        // SAFETY: sends from a valid buffer of at least `len` bytes.
        unsafe { libc::send(sock.1.as_raw_fd(), frame.as_ptr().cast(), len, 0) };
    }
    let event_idx = flags & 1 == 1;
    let mut features = 1u64 << 32;
    if flags & 2 == 2 {
        features |= 1 << 15; // MRG_RXBUF
    }
    let mut dev = Net::new(sock, [2, 0, 0, 0, 0, 1]);
    dev.ack_features(features);
    dev.activate(mem.clone(), vec![queue(0x1000, event_idx), queue(0x8000, event_idx)], Interrupt::new(Arc::new(NoIrq)))
        .unwrap();
    let _ = dev.process_queue(0);
    let _ = dev.process_backend();
    // Whatever the device reported used must lie within the queue.
    let used: u16 = mem.read_obj(GuestAddress(0x3002)).unwrap();
    assert!(used <= 3 * QSIZE);
});
