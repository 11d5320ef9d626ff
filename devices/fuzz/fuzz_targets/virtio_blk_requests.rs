//! Guest-controlled virtio-blk requests: the fuzz input is written over the
//! descriptor table, the available ring and the request buffers of a running
//! device's queue, which then processes whatever it finds there. The device must
//! never panic, hang or touch memory outside the guest's.
#![no_main]

mod common;

use std::sync::Arc;

use common::NoIrq;
use devices::virtio::block::Block;
use devices::virtio::{Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use devices::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x10000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let mem = devices::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)], false).unwrap();
    // Layout of the input: descriptor table (16 x 16 bytes), available ring, then
    // request buffers from 0x4000.
    let (desc, rest) = data.split_at(data.len().min(16 * QSIZE as usize));
    let (avail, bufs) = rest.split_at(rest.len().min(4 + 2 * QSIZE as usize));
    mem.write_slice(desc, GuestAddress(DESC)).unwrap();
    mem.write_slice(avail, GuestAddress(AVAIL)).unwrap();
    let bufs = &bufs[..bufs.len().min(MEM_SIZE - 0x4000)];
    mem.write_slice(bufs, GuestAddress(0x4000)).unwrap();

    let mut q = Queue::new(256).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q.set_event_idx(data.first().is_some_and(|b| b & 1 == 1));
    let mut dev = Block::open(common::image("blk", 0x5a, 64), true, Some("fuzz")).unwrap();
    dev.activate(mem, vec![q], Interrupt::new(Arc::new(NoIrq)))
        .unwrap();
    let _ = dev.process_queue(0);
});
