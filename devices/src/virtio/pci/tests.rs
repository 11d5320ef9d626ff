//! The test plays the PCI core and the virtio driver: configuration space
//! through the function, BAR 0 through the bus device.

use std::sync::Mutex;

use vm_memory::GuestAddress;

use super::*;
use crate::persist::Persist;
use crate::virtio::rng::Rng;
use crate::virtio::Interrupt;

/// Records what the transport asks of the VMM's vectors.
#[derive(Default)]
struct Vectors {
    routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
    raised: Mutex<Vec<u16>>,
}

impl MsiVectors for Vectors {
    fn route(&self, v: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        self.routes.lock().unwrap().push((v, message));
        Ok(())
    }
    fn raise(&self, v: u16) -> std::io::Result<()> {
        self.raised.lock().unwrap().push(v);
        Ok(())
    }
}

fn transport() -> (PciTransport, Arc<Vectors>) {
    let mem = crate::memory::anonymous(&[(GuestAddress(0), 0x100000)], false).unwrap();
    let vectors = Arc::new(Vectors::default());
    let t = PciTransport::new(Box::new(Rng::new()), mem, vectors.clone()).unwrap();
    (t, vectors)
}

fn cfg8(t: &PciTransport, off: u64) -> u8 {
    let mut b = [0u8; 1];
    t.read_config(off, &mut b);
    b[0]
}

fn cfg32(t: &PciTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

fn bar_r(t: &mut PciTransport, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    BusDevice::read(t, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn bar_w(t: &mut PciTransport, off: u64, len: usize, v: u64) {
    BusDevice::write(t, off, &v.to_le_bytes()[..len]);
}

/// The capabilities in configuration space: (offset, ID).
fn caps(t: &PciTransport) -> Vec<(u64, u8)> {
    let mut out = Vec::new();
    let mut at = u64::from(cfg8(t, 0x34));
    while at != 0 && out.len() < 16 {
        out.push((at, cfg8(t, at)));
        at = u64::from(cfg8(t, at + 1));
    }
    out
}

/// Brings the device up as Linux's virtio_pci does, queue 0 on vector 1
/// and configuration changes on vector 0.
fn bring_up(t: &mut PciTransport) {
    use status::*;
    bar_w(t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
    bar_w(t, 0x08, 4, 1);
    bar_w(t, 0x0c, 4, 1); // VERSION_1 (bit 32)
    bar_w(t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
    bar_w(t, 0x10, 2, 0);
    bar_w(t, 0x16, 2, 0);
    bar_w(t, 0x18, 2, 16);
    bar_w(t, 0x1a, 2, 1);
    bar_w(t, 0x20, 4, 0x1000);
    bar_w(t, 0x24, 4, 0);
    bar_w(t, 0x28, 4, 0x2000);
    bar_w(t, 0x2c, 4, 0);
    bar_w(t, 0x30, 4, 0x3000);
    bar_w(t, 0x34, 4, 0);
    bar_w(t, 0x1c, 2, 1);
    bar_w(
        t,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
}

#[test]
fn the_function_is_a_modern_virtio_device_with_its_capabilities() {
    let (t, _) = transport();
    assert_eq!(cfg32(&t, 0), 0x1044_1af4, "virtio-rng: 0x1040 + 4");
    assert_eq!(
        cfg32(&t, 0x2c) >> 16,
        0x40,
        "subsystem ID of a modern device"
    );
    let caps = caps(&t);
    let vendor: Vec<(u8, u64, u64)> = caps
        .iter()
        .filter(|c| c.1 == CAP_VENDOR)
        .map(|&(at, _)| {
            (
                cfg8(&t, at + 3),
                u64::from(cfg32(&t, at + 8)),
                u64::from(cfg32(&t, at + 12)),
            )
        })
        .collect();
    assert_eq!(
        vendor,
        vec![
            (CAP_COMMON, COMMON, COMMON_LEN),
            (CAP_NOTIFY, NOTIFY, 4),
            (CAP_ISR, ISR, 1),
            (CAP_DEVICE, DEVICE, DEVICE_LEN),
            (CAP_PCI_CFG, 0, 0),
        ]
    );
    let notify = caps
        .iter()
        .find(|c| cfg8(&t, c.0 + 3) == CAP_NOTIFY)
        .unwrap();
    assert_eq!(cfg32(&t, notify.0 + 16), NOTIFY_MULTIPLIER);
    let msix = caps.iter().find(|c| c.1 == 0x11).expect("MSI-X").0;
    assert_eq!(
        cfg32(&t, msix) >> 16 & 0x7ff,
        1,
        "two vectors: queue and config"
    );
    assert_eq!(cfg32(&t, msix + 4), MSIX_TABLE as u32, "table in BAR 0");
    assert_eq!(cfg32(&t, msix + 8), MSIX_PBA as u32);
    assert_eq!(cfg8(&t, 0x3d), 0, "no INTx pin: MSI-X only");
}

#[test]
fn a_driver_brings_the_device_up_through_the_common_configuration() {
    let (mut t, _) = transport();
    assert_eq!(bar_r(&mut t, 0x04, 4), 0, "feature word 0");
    bar_w(&mut t, 0x00, 4, 1);
    assert_eq!(bar_r(&mut t, 0x04, 4), 1, "VERSION_1 in word 1");
    assert_eq!(bar_r(&mut t, 0x12, 2), 1, "one queue");
    assert_eq!(
        bar_r(&mut t, 0x18, 2),
        256,
        "queue size starts at the maximum"
    );
    bring_up(&mut t);
    assert_eq!(bar_r(&mut t, 0x18, 2), 16);
    assert_eq!(bar_r(&mut t, 0x1a, 2), 1);
    assert_eq!(bar_r(&mut t, 0x10, 2), 0);
    assert_eq!(bar_r(&mut t, 0x20, 4), 0x1000);
    assert_eq!(bar_r(&mut t, 0x28, 4), 0x2000);
    assert_eq!(bar_r(&mut t, 0x30, 4), 0x3000);
    assert!(t.core.complete_activation(), "started on the event loop");
    assert_eq!(bar_r(&mut t, 0x1c, 2), 1);
    // A notification is the queue's eventfd, as the ioeventfd makes it.
    bar_w(&mut t, NOTIFY, 2, 0);
    assert_eq!(t.core.queue_evts()[0].read().unwrap(), 1);
    // Reset: status 0, vectors unassigned.
    bar_w(&mut t, 0x14, 1, 0);
    assert_eq!(bar_r(&mut t, 0x14, 1), 0);
    assert_eq!(bar_r(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(bar_r(&mut t, 0x10, 2), u64::from(NO_VECTOR));
}

#[test]
fn queues_raise_their_own_vectors_through_msi_x_with_masking() {
    let (mut t, vectors) = transport();
    bring_up(&mut t);
    assert!(t.core.complete_activation());
    let msix = caps(&t).iter().find(|c| c.1 == 0x11).unwrap().0;
    // Enable MSI-X with the function masked, program vector 1, unmask.
    t.write_config(msix + 3, &[0xc0]);
    bar_w(&mut t, MSIX_TABLE + 16, 8, 0xfee0_0000);
    bar_w(&mut t, MSIX_TABLE + 24, 4, 0x41);
    bar_w(&mut t, MSIX_TABLE + 28, 4, 0);
    let interrupt = Interrupt::new(t.interrupt.clone());
    interrupt.signal_used(0);
    assert!(vectors.raised.lock().unwrap().is_empty(), "function masked");
    let mut pba = [0u8; 1];
    BusDevice::read(&mut t, MSIX_PBA, &mut pba);
    assert_eq!(pba[0], 0b10, "vector 1 pending");
    t.write_config(msix + 3, &[0x80]);
    assert_eq!(*vectors.raised.lock().unwrap(), [1], "delivered on unmask");
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    assert!(vectors.routes.lock().unwrap().contains(&(1, Some(msg))));
    interrupt.signal_used(0);
    assert_eq!(*vectors.raised.lock().unwrap(), [1, 1]);
    // Configuration changes go to vector 0, masked until programmed.
    interrupt.signal_config();
    assert_eq!(*vectors.raised.lock().unwrap(), [1, 1]);
    BusDevice::read(&mut t, MSIX_PBA, &mut pba);
    assert_eq!(pba[0], 0b01);
    // The ISR says both causes to a driver that reads it, and clears.
    assert_eq!(bar_r(&mut t, ISR, 1), 3);
    assert_eq!(bar_r(&mut t, ISR, 1), 0);
}

#[test]
fn a_vector_the_function_does_not_have_reads_back_as_none() {
    let (mut t, _) = transport();
    bar_w(&mut t, 0x10, 2, 2);
    assert_eq!(bar_r(&mut t, 0x10, 2), u64::from(NO_VECTOR));
    bar_w(&mut t, 0x16, 2, 0);
    bar_w(&mut t, 0x1a, 2, 0x7ff);
    assert_eq!(bar_r(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    bar_w(&mut t, 0x1a, 2, 1);
    assert_eq!(bar_r(&mut t, 0x1a, 2), 1);
}

#[test]
fn hostile_bar_and_window_accesses_change_nothing() {
    let (mut t, vectors) = transport();
    bring_up(&mut t);
    let before = (bar_r(&mut t, 0x14, 1), bar_r(&mut t, 0x18, 2));
    // Wrong widths in the common configuration, a misaligned ring, queues
    // and offsets that do not exist, past the end of BAR 0.
    bar_w(&mut t, 0x14, 4, 0);
    bar_w(&mut t, 0x18, 1, 2);
    bar_w(&mut t, 0x16, 2, 9);
    assert_eq!(bar_r(&mut t, 0x18, 2), 0, "no queue 9");
    bar_w(&mut t, 0x16, 2, 0);
    bar_w(&mut t, NOTIFY + 4, 2, 1);
    bar_w(&mut t, BAR_SIZE - 2, 4, u64::MAX);
    bar_w(&mut t, u64::MAX - 1, 4, u64::MAX);
    assert_eq!(bar_r(&mut t, u64::MAX - 1, 4), 0);
    assert_eq!(bar_r(&mut t, MSIX_TABLE + 2, 4), 0);
    assert_eq!((bar_r(&mut t, 0x14, 1), bar_r(&mut t, 0x18, 2)), before);
    // The configuration access window: only BAR 0, widths 1, 2 and 4.
    let window = caps(&t)
        .into_iter()
        .map(|c| c.0)
        .find(|&at| cfg8(&t, at + 3) == CAP_PCI_CFG)
        .unwrap();
    t.write_config(window + 4, &[5]);
    t.write_config(window + 8, &0x14u32.to_le_bytes());
    t.write_config(window + 12, &1u32.to_le_bytes());
    t.write_config(window + 16, &0u32.to_le_bytes());
    assert_eq!(bar_r(&mut t, 0x14, 1), before.0, "BAR 5 is not there");
    t.write_config(window + 4, &[0]);
    t.write_config(window + 12, &3u32.to_le_bytes());
    t.write_config(window + 16, &0u32.to_le_bytes());
    assert_eq!(bar_r(&mut t, 0x14, 1), before.0, "3 bytes is not a width");
    // Through the window, a read of the status works.
    t.write_config(window + 12, &1u32.to_le_bytes());
    assert_eq!(cfg32(&t, window + 16) & 0xff, before.0 as u32);
    assert!(vectors.raised.lock().unwrap().is_empty());
}

#[test]
fn a_saved_transport_restores_its_bar_vectors_and_msi_x_and_runs_on() {
    let (mut t, _) = transport();
    t.write_config(0x10, &0xe000_0000u32.to_le_bytes());
    t.write_config(0x14, &0u32.to_le_bytes());
    t.write_config(4, &[0x06, 0]);
    bring_up(&mut t);
    assert!(t.core.complete_activation());
    let msix = caps(&t).iter().find(|c| c.1 == 0x11).unwrap().0;
    t.write_config(msix + 3, &[0x80]);
    bar_w(&mut t, MSIX_TABLE + 16, 8, 0xfee0_0000);
    bar_w(&mut t, MSIX_TABLE + 24, 4, 0x41);
    bar_w(&mut t, MSIX_TABLE + 28, 4, 0);
    let saved = t.save();

    let mem = crate::memory::anonymous(&[(GuestAddress(0), 0x100000)], false).unwrap();
    let vectors = Arc::new(Vectors::default());
    let dev: Box<dyn VirtioDevice> = Box::new(Rng::new());
    let mut back = PciTransport::restore((dev, mem, vectors.clone()), &saved).unwrap();
    assert_eq!(back.save(), saved, "what was saved is what is restored");
    assert_eq!(back.bar0(), (0xe000_0000, true));
    assert!(back.core.activated, "started again with its saved queue");
    assert_eq!(bar_r(&mut back, 0x1a, 2), 1, "queue 0 on vector 1");
    assert_eq!(bar_r(&mut back, 0x18, 2), 16);
    back.kick_after_restore();
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    assert!(vectors.routes.lock().unwrap().contains(&(1, Some(msg))));
    assert!(
        vectors.routes.lock().unwrap().contains(&(0, None)),
        "vector 0 masked"
    );
    Interrupt::new(back.interrupt.clone()).signal_used(0);
    assert_eq!(*vectors.raised.lock().unwrap(), [1]);
}

#[test]
fn a_hostile_saved_transport_is_refused_or_cut_to_what_a_guest_could_write() {
    let (t, _) = transport();
    let good = t.save();
    let restore = |s: &PciTransportState| {
        let mem = crate::memory::anonymous(&[(GuestAddress(0), 0x100000)], false).unwrap();
        let dev: Box<dyn VirtioDevice> = Box::new(Rng::new());
        PciTransport::restore((dev, mem, Arc::new(Vectors::default())), s)
    };
    let mut short = good.clone();
    short.config.truncate(3);
    assert!(restore(&short).is_err());
    let mut table = good.clone();
    table.msix = Msix::new(9);
    assert!(restore(&table).is_err());
    let mut queues = good.clone();
    queues.queue_vectors.push(0);
    assert!(restore(&queues).is_err());
    let mut odd = good.clone();
    odd.config[0] = 0x1234_5678;
    odd.queue_vectors[0] = 0x7ff;
    odd.config_vector = 5;
    odd.isr = u32::MAX;
    let mut back = restore(&odd).unwrap();
    assert_eq!(cfg32(&back, 0), 0x1044_1af4, "the identity is the device's");
    assert_eq!(bar_r(&mut back, 0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(bar_r(&mut back, 0x10, 2), u64::from(NO_VECTOR));
    assert_eq!(bar_r(&mut back, ISR, 1), 3);
}
