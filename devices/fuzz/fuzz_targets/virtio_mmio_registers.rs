//! Guest-controlled virtio-mmio register accesses: the fuzz input is a sequence
//! of reads and writes (offset, width, value) to a transport with a block device,
//! interleaved with queue notifications. The transport must never panic.
#![no_main]

mod common;

use std::sync::Arc;

use common::NoIrq;
use devices::bus::BusDevice;
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::transport::VirtioTransport;
use libfuzzer_sys::fuzz_target;
use devices::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    let mem = devices::memory::anonymous(&[(GuestAddress(0), 0x10000)], false).unwrap();
    let dev = Block::open(common::image("mmio", 0, 16), true, None).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), mem, Arc::new(NoIrq)).unwrap();
    // Each operation: 1 byte kind/width, 2 bytes offset, 4 bytes value.
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1000;
        let width = [1usize, 2, 4, 8][(op[0] & 3) as usize];
        let value = [op[3], op[4], op[5], op[6], 0, 0, 0, 0];
        match op[0] >> 2 & 3 {
            0 => t.write(offset, &value[..width]),
            1 => {
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..width]);
            }
            2 => {
                // What the event loop does: activate a device DRIVER_OK left
                // waiting, then serve the notified queue.
                t.core_mut().complete_activation();
                let _ = t.core_mut().notify_queue(usize::from(op[1]));
            }
            _ => t.write(0x070, &u32::from(op[3]).to_le_bytes()),
        }
    }
});
