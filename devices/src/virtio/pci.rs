//! The virtio PCI transport (virtio 1.2 §4.1, modern only): a PCI function
//! (vendor 0x1af4, device 0x1040 + the virtio device ID) whose BAR 0 holds
//! the common configuration, the notification area, the ISR status, the
//! device-specific configuration and the MSI-X table and pending bits, each
//! announced by a vendor-specific capability. Registers decode into the
//! transport-neutral [`VirtioCore`]; interrupts go out by MSI-X, one vector
//! per queue and one for configuration changes, as the driver assigns them.
//!
//! The VMM places BAR 0 on its MMIO bus (and moves it where the guest
//! programs it), connects each vector to a KVM MSI route and irqfd
//! ([`MsiVectors`]) and announces the PCI root in ACPI.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::transport::{CoreState, RestoreError, Ring, VirtioCore, VirtioTransport};
use super::{
    status, InterruptCause, VirtioDevice, VirtioInterrupt, INTERRUPT_CONFIG_CHANGE,
    INTERRUPT_USED_BUFFER,
};
use crate::bus::BusDevice;
use crate::memory::GuestMemoryMmap;
use crate::pci::config::{Identity, PciConfig};
use crate::pci::msix::{Changes, MsiMessage, Msix};
use crate::pci::root::PciFunction;
use crate::persist::Persist;

/// Virtio's PCI vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern virtio devices are 0x1040 + their virtio device ID.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// "No vector" for a queue or the configuration.
pub const NO_VECTOR: u16 = 0xffff;

/// BAR 0's size and layout.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
/// Where queue notifications go: queue i at `NOTIFY + i * NOTIFY_MULTIPLIER`.
pub const NOTIFY: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;

/// Capability types (`cfg_type`).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Vendor-specific capability ID.
const CAP_VENDOR: u8 = 0x09;

/// Where the guest's MSI-X messages go: the VMM connects each vector to
/// the guest (a KVM MSI route and an irqfd per vector) and raises it.
pub trait MsiVectors: Send + Sync {
    /// Vector `v`'s message changed (None: masked or disabled); the VMM
    /// updates its route.
    fn route(&self, v: u16, message: Option<MsiMessage>) -> std::io::Result<()>;
    /// Raises vector `v` (its route is current).
    fn raise(&self, v: u16) -> std::io::Result<()>;
}

/// The transport's interrupt: queue and configuration causes mapped to the
/// vectors the driver chose, through the MSI-X state (masking, pending bits).
pub struct PciInterrupt {
    msix: Mutex<Msix>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    /// ISR status (for a driver without MSI-X: read and cleared by it).
    isr: AtomicU32,
    vectors: Arc<dyn MsiVectors>,
}

impl PciInterrupt {
    fn new(queues: usize, vectors: Arc<dyn MsiVectors>) -> Self {
        PciInterrupt {
            msix: Mutex::new(Msix::new(queues as u16 + 1)),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            isr: AtomicU32::new(0),
            vectors,
        }
    }

    fn msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies what a guest access to the MSI-X state changed: routes and
    /// vectors that were pending.
    fn apply(&self, changes: Changes) {
        let msix = self.msix();
        for v in changes.vectors {
            let live = msix.enabled() && msix.entries[usize::from(v)].control & 1 == 0;
            let message = if live { msix.message(v) } else { None };
            if let Err(e) = self.vectors.route(v, message) {
                log::warn!("virtio-pci: cannot route MSI-X vector {v}: {e}");
            }
        }
        drop(msix);
        for (v, _) in changes.deliver {
            if let Err(e) = self.vectors.raise(v) {
                log::warn!("virtio-pci: cannot raise MSI-X vector {v}: {e}");
            }
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
        let (vector, bit) = match cause {
            InterruptCause::Queue(i) => (
                self.queue_vectors
                    .get(i)
                    .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst)),
                INTERRUPT_USED_BUFFER,
            ),
            InterruptCause::Config => (
                self.config_vector.load(Ordering::SeqCst),
                INTERRUPT_CONFIG_CHANGE,
            ),
        };
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if vector == NO_VECTOR {
            return Ok(());
        }
        let fire = self.msix().fire(vector);
        match fire {
            Some(_) => self.vectors.raise(vector),
            None => Ok(()),
        }
    }
}

/// One virtio device as a PCI function.
pub struct PciTransport {
    pub(crate) core: VirtioCore,
    config: PciConfig,
    interrupt: Arc<PciInterrupt>,
    /// Offset of the MSI-X capability in configuration space.
    msix_cap: usize,
    /// Offset of the PCI configuration access capability.
    pci_cfg_cap: usize,
}

impl VirtioTransport for PciTransport {
    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
    }

    /// Routes every vector as the table says, raises what was pending and
    /// deliverable, and looks at every queue once.
    fn kick_after_restore(&self) {
        let vectors = self.interrupt.msix().vectors();
        let changes = Changes {
            vectors: (0..vectors).collect(),
            deliver: Vec::new(),
        };
        self.interrupt.apply(changes);
        self.core.kick_queues();
    }
}

/// A vendor-specific virtio capability body (after ID and next pointer).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl PciTransport {
    /// `device` as a PCI function, its vectors raised through `vectors`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        vectors: Arc<dyn MsiVectors>,
    ) -> std::io::Result<Self> {
        let (config, interrupt, msix_cap, pci_cfg_cap) = Self::function(device.as_ref(), vectors)?;
        let core = VirtioCore::new(device, mem, interrupt.clone())?;
        Ok(PciTransport {
            core,
            config,
            interrupt,
            msix_cap,
            pci_cfg_cap,
        })
    }

    /// The PCI side of a transport for `device`: its configuration space
    /// with the capabilities, the interrupt, and where the MSI-X and access
    /// window capabilities are.
    fn function(
        device: &dyn VirtioDevice,
        vectors: Arc<dyn MsiVectors>,
    ) -> std::io::Result<(PciConfig, Arc<PciInterrupt>, usize, usize)> {
        let device_type = device.device_type();
        let queues = device.queue_max_sizes().len();
        let interrupt = Arc::new(PciInterrupt::new(queues, vectors));
        let mut config = PciConfig::new(
            Identity {
                vendor: VENDOR_ID,
                device: DEVICE_ID_BASE + device_type as u16,
                revision: 1,
                class: (0xff, 0x00, 0x00),
                subsystem_vendor: VENDOR_ID,
                subsystem: 0x40,
            },
            false,
        );
        // Every virtio function says it may have siblings: a device's other
        // functions can then be plugged in (and found by a rescan) later.
        config.set_multifunction();
        let layout = |e: crate::pci::config::Error| std::io::Error::other(e.to_string());
        config.add_memory_bar(0, BAR_SIZE, true).map_err(layout)?;
        let notify_len = queues as u64 * u64::from(NOTIFY_MULTIPLIER);
        let caps = [
            virtio_cap(CAP_COMMON, COMMON, COMMON_LEN, &[]),
            virtio_cap(
                CAP_NOTIFY,
                NOTIFY,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(CAP_ISR, ISR, 1, &[]),
            virtio_cap(CAP_DEVICE, DEVICE, DEVICE_LEN, &[]),
        ];
        for body in &caps {
            config
                .add_capability(CAP_VENDOR, body, &[])
                .map_err(layout)?;
        }
        // The access window: bar, offset and length, and the data, are the
        // driver's to write.
        let mut w = vec![0u8; 18];
        w[2] = 0xff;
        w[6..18].fill(0xff);
        let pci_cfg = virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let pci_cfg_cap = config
            .add_capability(CAP_VENDOR, &pci_cfg, &w)
            .map_err(layout)?;
        let (body, writable) = interrupt
            .msix()
            .capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config
            .add_capability(crate::pci::msix::CAP_ID, &body, &writable)
            .map_err(layout)?;
        Ok((config, interrupt, msix_cap, pci_cfg_cap))
    }

    /// BAR 0's guest-physical address (0 until the guest programs it) and
    /// whether memory decoding is on.
    pub fn bar0(&self) -> (u64, bool) {
        (
            self.config.bar(0).map_or(0, |b| b.0),
            self.config.memory_enabled(),
        )
    }

    /// Places BAR 0 at `addr` (aligned to [`BAR_SIZE`]) before the guest
    /// runs, as firmware would.
    pub fn set_bar0(&mut self, addr: u64) -> std::io::Result<()> {
        self.config
            .set_bar_address(0, addr)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let c = &self.core;
        let sel = c.queue_sel as usize;
        let q = c.queues.get(sel);
        let vector = |v: &AtomicU16| u64::from(v.load(Ordering::SeqCst));
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(c.device_features_sel),
            (0x04, 4) => u64::from(c.device_features_word()),
            (0x08, 4) => u64::from(c.driver_features_sel),
            (0x0c, 4) => u64::from(c.driver_features_word()),
            (0x10, 2) => vector(&self.interrupt.config_vector),
            (0x12, 2) => c.queues.len() as u64,
            (0x14, 1) => u64::from(c.status),
            (0x15, 1) => u64::from(c.config_generation as u8),
            (0x16, 2) => u64::from(c.queue_sel),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size())),
            (0x1a, 2) => self
                .interrupt
                .queue_vectors
                .get(sel)
                .map_or(u64::from(NO_VECTOR), vector),
            (0x1c, 2) => match q {
                Some(_) if c.activated || c.pending.is_some() => 1,
                Some(q) => u64::from(q.ready()),
                None => 0,
            },
            (0x1e, 2) => sel as u64,
            (0x20, 4) => q.map_or(0, |q| q.desc_table() & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc_table() >> 32),
            (0x28, 4) => q.map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail_ring() >> 32),
            (0x30, 4) => q.map_or(0, |q| q.used_ring() & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(b);
        let v32 = value as u32;
        match (offset, data.len()) {
            (0x00, 4) => self.core.device_features_sel = v32,
            (0x08, 4) => self.core.driver_features_sel = v32,
            (0x0c, 4) => self.core.write_driver_features_word(v32),
            (0x10, 2) => {
                let v = self.valid_vector(value as u16);
                self.interrupt.config_vector.store(v, Ordering::SeqCst);
            }
            (0x14, 1) => {
                self.core.set_status(v32);
                if v32 == 0 {
                    self.reset_vectors();
                }
            }
            (0x16, 2) => self.core.queue_sel = v32,
            (0x18, 2) => self.core.set_queue_size(v32),
            (0x1a, 2) => {
                let v = self.valid_vector(value as u16);
                let sel = self.core.queue_sel as usize;
                // Only while the queue is being set up.
                if self.core.selected_queue().is_some() {
                    if let Some(slot) = self.interrupt.queue_vectors.get(sel) {
                        slot.store(v, Ordering::SeqCst);
                    }
                }
            }
            (0x1c, 2) => self.core.set_queue_ready(v32),
            (0x20 | 0x24, 4) => self
                .core
                .set_ring_address(Ring::Descriptors, offset == 0x24, v32),
            (0x28 | 0x2c, 4) => self
                .core
                .set_ring_address(Ring::Driver, offset == 0x2c, v32),
            (0x30 | 0x34, 4) => self
                .core
                .set_ring_address(Ring::Device, offset == 0x34, v32),
            _ => log::debug!("virtio-pci: ignored common write {value:#x} at {offset:#x}"),
        }
    }

    /// `v` if the function has that vector, else NO_VECTOR (which the
    /// driver reads back and knows it failed).
    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.interrupt.msix().vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn reset_vectors(&self) {
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.interrupt.isr.store(0, Ordering::SeqCst);
    }

    /// A BAR 0 access at `offset` through the PCI configuration access
    /// capability's window.
    fn window(&self) -> Option<(u64, usize)> {
        let at = self.pci_cfg_cap;
        let bar = self.config.byte(at + 4);
        let le32 = |o: usize| {
            u32::from_le_bytes([
                self.config.byte(o),
                self.config.byte(o + 1),
                self.config.byte(o + 2),
                self.config.byte(o + 3),
            ])
        };
        let (offset, length) = (u64::from(le32(at + 8)), le32(at + 12) as usize);
        (bar == 0 && matches!(length, 1 | 2 | 4)).then_some((offset, length))
    }
}

impl PciTransport {
    /// Reads BAR 0 at `offset` (also through the configuration access
    /// window). Anything outside the regions, or of a width a region does
    /// not take, reads as zero.
    fn read_bar(&self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        let inside = |base: u64, size: u64| {
            offset >= base
                && offset
                    .checked_add(len)
                    .is_some_and(|end| end <= base + size)
        };
        if inside(COMMON, COMMON_LEN) && matches!(len, 1 | 2 | 4) {
            self.read_common(offset - COMMON, data);
        } else if inside(ISR, 1) {
            // Reading clears it (§4.1.4.5).
            data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst) as u8;
        } else if inside(DEVICE, DEVICE_LEN) {
            self.core
                .with_device(|d| d.read_config(offset - DEVICE, data));
        } else if inside(MSIX_TABLE, self.interrupt.msix().table_size()) {
            self.interrupt.msix().read_table(offset - MSIX_TABLE, data);
        } else if inside(MSIX_PBA, self.interrupt.msix().pba_size()) {
            self.interrupt.msix().read_pba(offset - MSIX_PBA, data);
        } else {
            data.fill(0);
        }
    }
}

impl BusDevice for PciTransport {
    /// BAR 0, at its offset.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.read_bar(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let inside = |base: u64, size: u64| {
            offset >= base
                && offset
                    .checked_add(len)
                    .is_some_and(|end| end <= base + size)
        };
        let notify_len = self.core.queues.len() as u64 * u64::from(NOTIFY_MULTIPLIER);
        if inside(COMMON, COMMON_LEN) && matches!(len, 1 | 2 | 4) {
            self.write_common(offset - COMMON, data);
        } else if inside(NOTIFY, notify_len) {
            // The queue is the address (the ioeventfd's path does the same).
            self.core
                .notify(((offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as u32);
        } else if inside(DEVICE, DEVICE_LEN) {
            if self.core.status & status::DRIVER != 0 {
                self.core
                    .with_device(|d| d.write_config(offset - DEVICE, data));
            }
        } else if inside(MSIX_TABLE, self.interrupt.msix().table_size()) {
            let changes = self.interrupt.msix().write_table(offset - MSIX_TABLE, data);
            self.interrupt.apply(changes);
        }
    }
}

impl PciFunction for PciTransport {
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
        // The access window's data field reads BAR 0 through it.
        let data_at = (self.pci_cfg_cap + 16) as u64;
        if offset == data_at && data.len() == 4 {
            if let Some((bar_off, len)) = self.window() {
                let mut tmp = [0u8; 4];
                self.read_bar(bar_off, &mut tmp[..len]);
                data.copy_from_slice(&tmp);
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config.write(offset, data);
        let data_at = (self.pci_cfg_cap + 16) as u64;
        if offset == data_at && data.len() == 4 {
            if let Some((bar_off, len)) = self.window() {
                BusDevice::write(self, bar_off, &data[..len]);
            }
        }
        // Message control (enable, function mask) is the MSI-X state's.
        let control_at = (self.msix_cap + 2) as u64;
        if offset <= control_at + 1 && offset + data.len() as u64 > control_at {
            let control = u16::from_le_bytes([
                self.config.byte(self.msix_cap + 2),
                self.config.byte(self.msix_cap + 3),
            ]);
            let changes = self.interrupt.msix().set_control(control);
            self.interrupt.apply(changes);
        }
    }
}

/// What a snapshot keeps of a PCI transport: the core's registers and
/// queues, the configuration space, the MSI-X state and the vectors the
/// driver assigned.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciTransportState {
    /// The transport-neutral registers and queues.
    pub core: CoreState,
    /// Configuration space, by dword.
    pub config: Vec<u32>,
    /// The MSI-X table, pending bits and control.
    pub msix: Msix,
    /// The configuration change vector.
    pub config_vector: u16,
    /// Each queue's vector.
    pub queue_vectors: Vec<u16>,
    /// The ISR status.
    pub isr: u32,
}

impl Persist for PciTransport {
    type State = PciTransportState;
    type Resources = (Box<dyn VirtioDevice>, GuestMemoryMmap, Arc<dyn MsiVectors>);
    type Error = RestoreError;

    fn save(&self) -> PciTransportState {
        PciTransportState {
            core: self.core.save(),
            config: self.config.save(),
            msix: self.interrupt.msix().clone(),
            config_vector: self.interrupt.config_vector.load(Ordering::SeqCst),
            queue_vectors: self
                .interrupt
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            isr: self.interrupt.isr.load(Ordering::SeqCst),
        }
    }

    /// A transport in `state` for `device` (itself restored): the
    /// configuration space and MSI-X state cut to what a guest could have
    /// written, vectors the function has, then the core (see
    /// [`VirtioCore::restore`]).
    fn restore(
        (device, mem, vectors): Self::Resources,
        state: &PciTransportState,
    ) -> Result<Self, RestoreError> {
        let (mut config, interrupt, msix_cap, pci_cfg_cap) =
            Self::function(device.as_ref(), vectors)?;
        let bad = |why| Err(RestoreError::Inconsistent(why));
        if !config.restore(&state.config) {
            return bad("the PCI configuration space is not 256 bytes");
        }
        if !interrupt.msix().restore(&state.msix) {
            return bad("the MSI-X table is not the function's size");
        }
        if state.queue_vectors.len() != interrupt.queue_vectors.len() {
            return bad("the queue vectors are not one per queue");
        }
        let count = interrupt.msix().vectors();
        let valid = |v: u16| if v < count { v } else { NO_VECTOR };
        interrupt
            .config_vector
            .store(valid(state.config_vector), Ordering::SeqCst);
        for (slot, &v) in interrupt.queue_vectors.iter().zip(&state.queue_vectors) {
            slot.store(valid(v), Ordering::SeqCst);
        }
        interrupt.isr.store(
            state.isr & (INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE),
            Ordering::SeqCst,
        );
        let core = VirtioCore::restore(device, mem, interrupt.clone(), &state.core)?;
        let t = PciTransport {
            core,
            config,
            interrupt,
            msix_cap,
            pci_cfg_cap,
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests;
