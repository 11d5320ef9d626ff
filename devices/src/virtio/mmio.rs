//! The virtio-mmio transport (virtio 1.2 §4.2, modern interface only): the register
//! block the guest driver programs, the status state machine, feature negotiation
//! and queue set-up with validation of every guest-given value.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, Interrupt, VirtioDevice, INTERRUPT_CONFIG_CHANGE, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4d56; // "VMMU"

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of the queue notification register, where the VMM places ioeventfds.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;
/// Size of the register window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// The register block of one virtio device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    /// Signalled when the guest writes a queue's index to QueueNotify without an
    /// ioeventfd in between (the VMM registers ioeventfds for the same effect).
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    /// Queues given a size (zero, too big, not a power of two) or a ring address
    /// (misaligned) that the Queue rejected: it keeps the old value, so the
    /// transport remembers and refuses to start the device.
    bad_config: Vec<bool>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// A transport for `device`, raising `interrupt`, with access to guest memory.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<std::io::Result<Vec<_>>>()?;
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            bad_config: vec![false; queues.len()],
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The eventfds signalled by queue notifications, one per queue.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// One line of device statistics for the log at exit.
    pub fn report(&self) -> Option<String> {
        self.device.report()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport, to change (see [`Self::config_changed`]).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Tells the driver that the device configuration changed (e.g. a disk's
    /// capacity): a new configuration generation and, once the driver runs the
    /// device, a configuration-change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.raise(INTERRUPT_CONFIG_CHANGE);
        }
    }

    /// Whether the device runs: activated and not broken. A device that needs
    /// a reset is not called again until the driver resets it.
    fn running(&self) -> bool {
        self.activated && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Processes queue `index` after a notification (from the event loop).
    /// Returns true if the queue has work left after a pass that stopped at
    /// its budget: the caller signals the queue again.
    pub fn notify_queue(&mut self, index: usize) -> bool {
        if !self.running() || index >= self.queues.len() {
            return false;
        }
        if !self.device.process_queue(index) {
            self.mark_needs_reset();
            return false;
        }
        self.device.queue_pending(index)
    }

    /// The device's backend descriptor, if it has one.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Handles backend readiness (from the event loop).
    pub fn process_backend(&mut self) {
        if self.running() && !self.device.process_backend() {
            self.mark_needs_reset();
        }
    }

    /// Whether the backend descriptor should be watched now (never while the
    /// device is broken: a readable backend would wake the loop for nothing).
    pub fn wants_backend_events(&self) -> bool {
        self.running() && self.device.wants_backend_events()
    }

    fn mark_needs_reset(&mut self) {
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            if self.status & status::DRIVER_OK != 0 {
                self.interrupt.raise(INTERRUPT_CONFIG_CHANGE);
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue set-up is only allowed before DRIVER_OK (§4.2.3.2).
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.bad_config.fill(false);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    /// Applies a status write, enforcing the order of §3.1.1.
    fn set_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, never removed, except by a reset.
        if value & self.status != self.status {
            crate::guest_warn!(
                "virtio: driver cleared status bits {:#x} -> {value:#x}; ignored",
                self.status
            );
            return;
        }
        let new = value & !self.status;
        if new & FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
                && self.status & DRIVER != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                crate::guest_warn!(
                    "virtio: driver features {:#x} rejected",
                    self.driver_features
                );
                self.status |= value & !FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        if new & DRIVER_OK != 0 {
            if self.status & FEATURES_OK == 0 && value & FEATURES_OK == 0 {
                crate::guest_warn!("virtio: DRIVER_OK before FEATURES_OK; device not started");
                self.status = value & !DRIVER_OK;
                self.mark_needs_reset();
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << super::VIRTIO_RING_F_EVENT_IDX) != 0;
        if let Some(i) = self
            .queues
            .iter()
            .zip(&self.bad_config)
            // virtio-queue cannot read an available ring at guest address 0.
            .position(|(q, &bad)| {
                bad || !q.ready() || !q.is_valid(&self.mem) || q.avail_ring() == 0
            })
        {
            crate::guest_warn!("virtio: queue {i} is not ready or not valid at DRIVER_OK");
            self.mark_needs_reset();
            return;
        }
        // The device takes the configured queues; the transport keeps fresh ones
        // of the same maximum size for after a reset.
        let mut ready = Vec::with_capacity(self.queues.len());
        for q in self.queues.iter_mut() {
            let fresh = match Queue::new(q.max_size()) {
                Ok(f) => f,
                Err(e) => {
                    log::error!("virtio: cannot create a queue: {e:?}");
                    self.mark_needs_reset();
                    return;
                }
            };
            let mut live = std::mem::replace(q, fresh);
            live.set_event_idx(event_idx);
            ready.push(live);
        }
        match self
            .device
            .activate(self.mem.clone(), ready, self.interrupt.clone())
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                crate::guest_warn!("virtio: device activation failed: {e}");
                self.mark_needs_reset();
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => match self.queues.get(self.queue_sel as usize) {
                Some(_) if self.activated => 1,
                Some(q) => u32::from(q.ready()),
                None => 0,
            },
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: length -1 (§4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let features_allowed = self.status & status::DRIVER != 0
            && self.status & (status::FEATURES_OK | status::FAILED) == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if features_allowed => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                let sel = self.queue_sel as usize;
                if let Some(q) = self.selected_queue() {
                    let size = u16::try_from(value).unwrap_or(0);
                    let valid = size != 0 && size <= q.max_size() && size.is_power_of_two();
                    if valid {
                        q.set_size(size);
                    }
                    self.bad_config[sel] = !valid;
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            // Ring alignment (§2.7): descriptor table 16, available ring 2, used ring 4.
            REG_QUEUE_DESC_LOW => {
                self.with_queue(value, 16, |q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.with_queue(0, 1, |q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_DRIVER_LOW => {
                self.with_queue(value, 2, |q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.with_queue(0, 1, |q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => {
                self.with_queue(value, 4, |q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.with_queue(0, 1, |q| q.set_used_ring_address(None, Some(value)))
            }
            REG_QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        log::warn!("virtio: cannot signal queue {value}: {e}");
                    }
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            REG_SHM_SEL => {}
            _ => log::debug!("virtio: ignored write {value:#x} at {offset:#x}"),
        }
    }

    /// Applies `f` to the selected queue; a `low` address not aligned to `align`
    /// marks the queue as misconfigured instead.
    fn with_queue(&mut self, low: u32, align: u32, f: impl FnOnce(&mut Queue)) {
        let sel = self.queue_sel as usize;
        if let Some(q) = self.selected_queue() {
            if low.is_multiple_of(align) {
                f(q);
            } else {
                self.bad_config[sel] = true;
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32 bits wide and aligned; anything else reads as zero.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            // Config writes only while the driver is setting the device up or running it.
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// Runs a transport's queue processing in the VMM's event loop: one eventfd per
/// queue, signalled by a KVM ioeventfd (or by the transport itself), plus the
/// device's backend descriptor (a TAP), watched only while the device can take
/// input.
pub struct QueueEvents {
    transport: Arc<Mutex<MmioTransport>>,
    /// Set while the VM is paused: notifications are consumed but not served
    /// (the VMM signals every queue again on resume), the backend is not watched.
    paused: Arc<AtomicBool>,
    evts: Vec<EventFd>,
    backend: Option<std::os::fd::RawFd>,
    backend_watched: bool,
}

impl QueueEvents {
    /// Watches the queue eventfds and the backend of `transport`.
    pub fn new(
        transport: Arc<Mutex<MmioTransport>>,
        paused: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let t = transport.lock().unwrap_or_else(|e| e.into_inner());
        let evts = t
            .queue_evts()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        let backend = t.backend_fd();
        drop(t);
        Ok(QueueEvents {
            transport,
            paused,
            evts,
            backend,
            backend_watched: false,
        })
    }

    /// Adds or removes the backend from the watch list as the device wants.
    fn update_backend_interest(&mut self, wants: bool, ops: &mut EventOps) {
        let Some(fd) = self.backend else { return };
        if wants != self.backend_watched {
            let ev = Events::with_data_raw(fd, self.evts.len() as u32, EventSet::IN);
            let r = if wants { ops.add(ev) } else { ops.remove(ev) };
            match r {
                Ok(()) => self.backend_watched = wants,
                Err(e) => log::error!("virtio: cannot change the backend watch: {e:?}"),
            }
        }
    }
}

impl MutEventSubscriber for QueueEvents {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let index = events.data() as usize;
        if self.paused.load(Ordering::SeqCst) {
            if let Some(evt) = self.evts.get(index) {
                let _ = evt.read();
            }
            self.update_backend_interest(false, ops);
            return;
        }
        let wants = {
            let mut t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(evt) = self.evts.get(index) {
                // Coalesced notifications: one pass over the queue serves them all.
                let _ = evt.read();
                if t.notify_queue(index) {
                    // Work left after a bounded pass: come back after the others.
                    if let Err(e) = evt.write(1) {
                        log::error!("virtio: cannot signal queue {index} again: {e}");
                    }
                }
            } else if index == self.evts.len() {
                t.process_backend();
            }
            t.wants_backend_events()
        };
        self.update_backend_interest(wants, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {i}: {e:?}");
            }
        }
        let wants = self
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wants_backend_events();
        self.update_backend_interest(wants, ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::CountingIrq;
    use crate::virtio::block::Block;
    use std::io::Write;
    use vm_memory::GuestAddress;

    fn transport(tag: &str) -> (MmioTransport, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("vmm-mmio-{}-{tag}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[0u8; 4096])
            .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let dev = Block::open(&path, false, None).unwrap();
        let t = MmioTransport::new(
            Box::new(dev),
            mem,
            Interrupt::new(Arc::new(CountingIrq::default())),
        )
        .unwrap();
        (t, path)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, REG_STATUS, status::ACKNOWLEDGE);
        w(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, 1); // VERSION_1 (bit 32)
        w(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, size: u32) {
        w(t, REG_QUEUE_SEL, 0);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, 0x1000);
        w(t, REG_QUEUE_DRIVER_LOW, 0x3000);
        w(t, REG_QUEUE_DEVICE_LOW, 0x4000);
        w(t, REG_QUEUE_READY, 1);
    }

    const RUNNING: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, p) = transport("id");
        assert_eq!(r(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 2);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 256);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES) & 1, 1, "VERSION_1 offered");
        assert_eq!(r(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn full_bring_up_activates_the_device() {
        let (mut t, p) = transport("up");
        negotiate(&mut t);
        assert_ne!(r(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        assert_eq!(r(&mut t, REG_STATUS), RUNNING);
        assert!(t.activated);
        // Queue registers are frozen once the device runs.
        w(&mut t, REG_QUEUE_NUM, 8);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        // Reset returns everything to the initial state.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert!(!t.activated);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn features_without_version_1_or_unknown_are_rejected() {
        let (mut t, p) = transport("feat");
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r(&mut t, REG_STATUS) & status::FEATURES_OK,
            0,
            "no VERSION_1"
        );
        w(&mut t, REG_STATUS, 0);
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1 | (1 << 20)); // an unoffered feature
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn invalid_queues_mark_the_device_as_needing_reset() {
        for (name, size, desc) in [
            ("size not a power of two", 15u32, 0x1000u32),
            ("size above the maximum", 512, 0x1000),
            ("size zero", 0, 0x1000),
            ("descriptor table outside memory", 16, 0xfff0_0000),
            ("misaligned descriptor table", 16, 0x1001),
        ] {
            let (mut t, p) = transport(&format!("q{size}{desc}"));
            negotiate(&mut t);
            setup_queue(&mut t, size);
            w(&mut t, REG_QUEUE_DESC_LOW, desc);
            w(&mut t, REG_STATUS, RUNNING);
            assert!(!t.activated, "{name}");
            assert_ne!(
                r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET,
                0,
                "{name}"
            );
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn driver_ok_without_features_ok_does_not_start_the_device() {
        let (mut t, p) = transport("order");
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        setup_queue(&mut t, 16);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(!t.activated);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn notify_signals_only_existing_queues_and_odd_accesses_are_ignored() {
        let (mut t, p) = transport("notify");
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 7);
        w(&mut t, REG_QUEUE_NOTIFY, u32::MAX);
        t.notify_queue(usize::MAX);
        // Unaligned or narrow register accesses do nothing.
        t.write(REG_STATUS + 1, &[1, 0, 0, 0]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        // Config space: capacity of the 4 KiB image is 8 sectors.
        let mut cap = [0u8; 8];
        t.read(CONFIG_SPACE, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let (mut t, p) = transport("clear");
        negotiate(&mut t);
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        assert_ne!(r(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_queue_with_its_driver_area_at_address_0_is_refused() {
        // virtio-queue cannot read an available ring at 0: starting the device
        // on it would leave a queue that says it has work the device cannot take.
        let (mut t, p) = transport("zero");
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_QUEUE_READY, 0);
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, RUNNING);
        assert!(!t.activated);
        assert_ne!(r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        let _ = std::fs::remove_file(p);
    }

    /// A device whose queue processing always fails, with a backend descriptor
    /// it always wants watched; counts the calls it gets.
    struct Failing {
        calls: Arc<std::sync::atomic::AtomicUsize>,
        backend: std::fs::File,
    }
    impl VirtioDevice for Failing {
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << super::super::VIRTIO_F_VERSION_1
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: Vec<Queue>,
            _: Interrupt,
        ) -> Result<(), super::super::ActivateError> {
            Ok(())
        }
        fn process_queue(&mut self, _: usize) -> bool {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            false
        }
        fn process_backend(&mut self) -> bool {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            false
        }
        fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
            Some(std::os::fd::AsRawFd::as_raw_fd(&self.backend))
        }
        fn wants_backend_events(&self) -> bool {
            true
        }
        fn reset(&mut self) {}
    }

    #[test]
    fn a_broken_device_is_not_called_again_and_its_backend_not_watched() {
        // Found in review: a device that failed kept its (readable) backend in
        // the level-triggered event loop, which then spun.
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dev = Failing {
            calls: calls.clone(),
            backend: std::fs::File::open("/dev/null").unwrap(),
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let mut t = MmioTransport::new(
            Box::new(dev),
            mem,
            Interrupt::new(Arc::new(CountingIrq::default())),
        )
        .unwrap();
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        assert!(t.activated);
        assert!(t.wants_backend_events());
        assert!(!t.notify_queue(0));
        assert_ne!(r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(
            !t.wants_backend_events(),
            "a broken device's backend is not watched"
        );
        t.process_backend();
        assert!(!t.notify_queue(0));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // After the driver resets it, the device runs again.
        w(&mut t, REG_STATUS, 0);
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        assert!(t.wants_backend_events());
    }
}
