//! A saved virtio-mmio transport comes from a snapshot file, which is
//! checksummed, not trusted: any state must be restored or refused with an
//! error, never panic, and a restored transport must then take register
//! accesses and notifications as a driver would make them. The input is the
//! state as JSON (the snapshot's encoding) followed, after a NUL byte, by
//! register operations.
#![no_main]

mod common;

use std::sync::Arc;

use common::NoIrq;
use devices::bus::BusDevice;
use devices::persist::Persist;
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, MmioTransportState};
use devices::virtio::transport::VirtioTransport;
use libfuzzer_sys::fuzz_target;
use devices::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    let (json, ops) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(state) = serde_json::from_slice::<MmioTransportState>(json) else {
        return;
    };
    let mem = devices::memory::anonymous(&[(GuestAddress(0), 0x10000)], false).unwrap();
    let dev = Block::open(common::image("restore", 0, 16), true, None).unwrap();
    let Ok(mut t) = MmioTransport::restore(
        (Box::new(dev), mem, Arc::new(NoIrq)),
        &state,
    ) else {
        return;
    };
    t.kick_after_restore();
    // Each operation: 1 byte kind, 2 bytes offset, 4 bytes value.
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1000;
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] & 3 {
            0 => t.write(offset, &value),
            1 => {
                let mut buf = [0u8; 4];
                t.read(offset, &mut buf);
            }
            _ => {
                t.core_mut().complete_activation();
                let _ = t.core_mut().notify_queue(usize::from(op[1]));
            }
        }
    }
    let _ = t.save();
});
