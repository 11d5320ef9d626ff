//! Guest-controlled virtio-net transmit chains: the fuzz input is written over
//! the transmit queue's descriptor table, available ring and buffers; the device
//! sends whatever it accepts into a socket. It must never panic, hang or read
//! outside guest memory.
#![no_main]

mod common;

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
    // Transmit queue rings at 0x8000: descriptor table, then available ring; the
    // rest of the input is buffer memory from 0x10000.
    let (desc, rest) = data.split_at(data.len().min(16 * QSIZE as usize));
    let (avail, bufs) = rest.split_at(rest.len().min(4 + 2 * QSIZE as usize));
    mem.write_slice(desc, GuestAddress(0x8000)).unwrap();
    mem.write_slice(avail, GuestAddress(0x9000)).unwrap();
    mem.write_slice(&bufs[..bufs.len().min(0x10000)], GuestAddress(0x10000))
        .unwrap();
    let sock = socket_pair();
    let event_idx = data.first().is_some_and(|b| b & 1 == 1);
    let mut dev = Net::new(sock, [2, 0, 0, 0, 0, 1]);
    dev.activate(
        mem,
        vec![
            queue(0x1000, QSIZE, event_idx),
            queue(0x8000, QSIZE, event_idx),
        ],
        Interrupt::new(Arc::new(NoIrq)),
    )
    .unwrap();
    let _ = dev.process_queue(1);
});
