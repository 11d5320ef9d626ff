//! Guest-controlled virtio-net receive chains: the fuzz input is written over
//! the receive queue's descriptor table, available ring and buffers, and picks
//! MRG_RXBUF, EVENT_IDX and the sizes of the frames waiting in the backend. The
//! device must never panic, hang, or write outside the buffers it was given.
#![no_main]

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::{queue, socket_pair, NoIrq};
use devices::virtio::net::Net;
use devices::virtio::{Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use devices::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x20000;
const QSIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let mem = devices::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)], false).unwrap();
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    // Frame lengths waiting in the backend: three, from 0 to 8191 bytes.
    let (lens, data) = data.split_at(data.len().min(6));
    // Receive queue rings at 0x1000: descriptor table, then available ring; the
    // rest of the input is buffer memory from 0x10000.
    let (desc, rest) = data.split_at(data.len().min(16 * QSIZE as usize));
    let (avail, bufs) = rest.split_at(rest.len().min(4 + 2 * QSIZE as usize));
    mem.write_slice(desc, GuestAddress(0x1000)).unwrap();
    mem.write_slice(avail, GuestAddress(0x2000)).unwrap();
    mem.write_slice(&bufs[..bufs.len().min(0x10000)], GuestAddress(0x10000))
        .unwrap();
    let sock = socket_pair();
    let frame = [0x5au8; 8192];
    for pair in lens.chunks(2) {
        let len =
            usize::from(u16::from_le_bytes([pair[0], *pair.get(1).unwrap_or(&0)])) % frame.len();
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
    dev.activate(
        mem,
        vec![
            queue(0x1000, QSIZE, event_idx),
            queue(0x8000, QSIZE, event_idx),
        ],
        Interrupt::new(Arc::new(NoIrq)),
    )
    .unwrap();
    let _ = dev.process_queue(0);
    let _ = dev.process_backend();
    // The device cannot deliver more frames than the backend held. (The used
    // ring itself proves nothing: a guest may point buffers at its own rings.)
    assert!(dev.counters().rx_packets <= 3);
});
