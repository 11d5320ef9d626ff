//! Guest-controlled virtio PCI accesses: the fuzz input is a sequence of
//! configuration-space and BAR 0 reads and writes (offset, width, value) to
//! a transport with a block device, interleaved with the event loop's
//! activation and queue passes and with interrupts the device raises. The
//! transport must never panic.
#![no_main]

mod common;

use std::sync::Arc;

use devices::bus::BusDevice;
use devices::pci::msix::MsiMessage;
use devices::pci::root::PciFunction;
use devices::virtio::block::Block;
use devices::virtio::pci::{MsiVectors, PciTransport, BAR_SIZE};
use devices::virtio::transport::VirtioTransport;
use libfuzzer_sys::fuzz_target;
use devices::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;

struct Vectors;
impl MsiVectors for Vectors {
    fn route(&self, _: u16, _: Option<MsiMessage>) -> std::io::Result<()> {
        Ok(())
    }
    fn raise(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = devices::memory::anonymous(&[(GuestAddress(0), 0x10000)], false).unwrap();
    let dev = Block::open(common::image("pci", 0, 16), true, None).unwrap();
    let mut t = PciTransport::new(Box::new(dev), mem, Arc::new(Vectors)).unwrap();
    // Each operation: 1 byte kind/width, 2 bytes offset, 4 bytes value.
    for op in data.chunks_exact(7) {
        let raw = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = [1usize, 2, 4, 8][(op[0] & 3) as usize];
        let value = [op[3], op[4], op[5], op[6], 0, 0, 0, 0];
        let mut buf = [0u8; 8];
        match op[0] >> 2 & 7 {
            0 => t.write(raw % BAR_SIZE, &value[..width]),
            1 => t.read(raw % BAR_SIZE, &mut buf[..width]),
            2 => t.write_config(raw % 0x1000, &value[..width]),
            3 => t.read_config(raw % 0x1000, &mut buf[..width]),
            4 => {
                // What the event loop does: activate a device DRIVER_OK left
                // waiting, then serve the notified queue.
                t.core_mut().complete_activation();
                let _ = t.core_mut().notify_queue(usize::from(op[1]));
            }
            5 => {
                // The device raising its interrupt, for any queue.
                let interrupt = t.core().device_interrupt();
                if op[3] & 1 == 0 {
                    interrupt.signal_used(usize::from(op[4]));
                } else {
                    interrupt.signal_config();
                }
            }
            // Offsets anywhere, widths of any length.
            6 => t.write(raw << 16 | u64::from(op[3]), &value[..usize::from(op[4] % 9)]),
            _ => t.read(u64::MAX - raw, &mut buf[..usize::from(op[4] % 9)]),
        }
    }
});
