//! Virtio devices (virtio 1.2), what their transports share, and the MMIO transport.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod one_queue;
pub mod pci;
pub mod pmem;
pub mod ring;
pub mod rng;
pub mod tap;
pub mod transport;
pub mod vsock;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;
use crate::InterruptLine;

/// Feature bit: the device conforms to virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/available event index suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a used buffer was added to a queue.
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// Interrupt status bit: the configuration (or the device status) changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// Interrupts raised for virtio devices since the process started
/// (Firecracker's `interrupts.triggers`).
static TRIGGERS: AtomicU64 = AtomicU64::new(0);

/// How many times a virtio device's interrupt was raised so far, by any
/// device of this process (Firecracker's `interrupts.triggers` metric).
pub fn interrupt_triggers() -> u64 {
    TRIGGERS.load(Ordering::Relaxed)
}

/// What an interrupt tells the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptCause {
    /// Queue `n` has new used buffers.
    Queue(usize),
    /// The device's configuration (or its status) changed.
    Config,
}

/// How a transport delivers a device's interrupts to the guest: one line
/// with a status register the driver reads (virtio-mmio, PCI INTx, see
/// [`LineInterrupt`]), or a vector per queue and one for configuration
/// changes (PCI MSI-X). Devices say which queue they used; the transport
/// decides what the guest sees.
pub trait VirtioInterrupt: Send + Sync {
    /// Interrupts the driver for `cause`.
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()>;
    /// An eventfd that interrupts the driver for `cause` when written, with
    /// nothing else to do (an MSI-X vector's irqfd), for a backend in
    /// another process (vhost-user) to raise it directly. None where the
    /// transport must do more than raise a line (virtio-mmio's status
    /// register): the VMM relays for such a backend.
    fn notifier(&self, _cause: InterruptCause) -> Option<std::io::Result<EventFd>> {
        None
    }
}

/// A device's handle on its interrupt, given at activation (cheap to clone).
#[derive(Clone)]
pub struct Interrupt(Arc<dyn VirtioInterrupt>);

impl Interrupt {
    /// A handle on `transport`'s interrupt.
    pub fn new(transport: Arc<dyn VirtioInterrupt>) -> Self {
        Interrupt(transport)
    }

    /// Tells the driver that queue `index` has new used buffers.
    pub fn signal_used(&self, index: usize) {
        self.signal(InterruptCause::Queue(index));
    }

    /// Tells the driver that the device configuration changed.
    pub fn signal_config(&self) {
        self.signal(InterruptCause::Config);
    }

    /// See [`VirtioInterrupt::notifier`].
    pub fn notifier(&self, cause: InterruptCause) -> Option<std::io::Result<EventFd>> {
        self.0.notifier(cause)
    }

    fn signal(&self, cause: InterruptCause) {
        TRIGGERS.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.0.trigger(cause) {
            log::warn!("virtio: cannot raise the device interrupt ({cause:?}): {e}");
        }
    }
}

/// One interrupt line and the interrupt status register the driver reads
/// and acknowledges: the virtio-mmio transport's interrupt.
pub struct LineInterrupt {
    status: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

impl LineInterrupt {
    /// An interrupt raising `line`, with nothing pending.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        LineInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Current interrupt status.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets `bits` in the interrupt status without raising the line (a
    /// restored device's status; the VMM raises the line once its vCPUs can
    /// take it).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Raises the line again if the status has bits the driver has not
    /// acknowledged.
    pub fn retrigger(&self) {
        if self.status() != 0 {
            TRIGGERS.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.line.trigger() {
                log::warn!("virtio: cannot raise the device interrupt: {e}");
            }
        }
    }

    /// Clears the acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

impl VirtioInterrupt for LineInterrupt {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
        let bit = match cause {
            InterruptCause::Queue(_) => INTERRUPT_USED_BUFFER,
            InterruptCause::Config => INTERRUPT_CONFIG_CHANGE,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()
    }
}

/// A queue's saved state: what the driver programmed (size, ring addresses,
/// ready) and where the device is in the rings (next available and used
/// index). Restoring checks it as the transport checks a driver's writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// The queue, if the state is one a queue can be in (size a power of two
    /// within the maximum, rings aligned).
    pub fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Copies the device configuration bytes at `offset` into `data`; bytes past
/// the end of `config` (or an offset that overflows) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// What activation failed on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("The driver set up {got} queues, the device needs {want}.")]
    QueueCount { got: usize, want: usize },
}

impl ActivateError {
    /// Ok if the driver set up exactly `want` queues.
    pub fn check_count(queues: &[Queue], want: usize) -> Result<(), ActivateError> {
        if queues.len() == want {
            Ok(())
        } else {
            Err(ActivateError::QueueCount {
                got: queues.len(),
                want,
            })
        }
    }
}

/// What a device is given when its driver starts it.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues the driver set up, checked by the transport.
    pub queues: Vec<Queue>,
    /// Per queue, the eventfd the driver's notifications signal (a KVM
    /// ioeventfd, or the transport itself): what a backend in another
    /// process (vhost-user) waits on.
    pub queue_evts: Vec<Arc<EventFd>>,
    /// The device's interrupt.
    pub interrupt: Interrupt,
}

/// Host memory a device puts in guest-physical address space (virtio-pmem's
/// file): the VMM gives it a memory slot of its own, outside guest RAM, at
/// an address it chooses (or, for a restored device, the one it had).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Host virtual address of the mapping, which the device keeps mapped
    /// for as long as it lives.
    pub host_addr: u64,
    /// Length in bytes, a multiple of [`DEVICE_MEMORY_ALIGNMENT`].
    pub len: u64,
    /// The guest may read it only.
    pub read_only: bool,
    /// Its guest-physical address once placed.
    pub guest_addr: Option<u64>,
}

/// Alignment of device memory, in guest-physical space and in length: 2 MiB,
/// as virtio-pmem requires.
pub const DEVICE_MEMORY_ALIGNMENT: u64 = 2 << 20;

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 1 = net).
    fn device_type(&self) -> u32;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; writes to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;
    /// What the transport calls at the start: devices served in this
    /// process take their queues through [`VirtioDevice::activate`] (their
    /// notifications come through [`VirtioDevice::process_queue`]); a device
    /// served by another process overrides this to hand it the eventfds.
    fn activate_with(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.activate(a.mem, a.queues, a.interrupt)
    }
    /// Processes the requests the driver made available on queue `index`.
    /// Returns false if the device found the queue unusable and needs a reset.
    fn process_queue(&mut self, index: usize) -> bool;
    /// Whether queue `index` still has work after its last pass stopped at the
    /// per-pass budget (the transport then signals the queue again).
    fn queue_pending(&self, _index: usize) -> bool {
        false
    }
    /// Stops the device and drops its queues.
    fn reset(&mut self);
    /// The state of the queues of a started device, for a snapshot: as the
    /// driver sees them, so buffers the device took but has not used yet are
    /// given back (taken again after a restore, neither lost nor used twice).
    /// None while the device is not started.
    fn queue_states(&self) -> Option<Vec<QueueState>>;
    /// A descriptor the event loop watches for the device (e.g. a TAP), if any.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Handles readiness of [`VirtioDevice::backend_fd`]. False if the device
    /// needs a reset.
    fn process_backend(&mut self) -> bool {
        true
    }
    /// Whether the backend descriptor should be watched now: false while the
    /// device cannot take input (not started, or no guest buffers), so that a
    /// readable backend does not spin the event loop.
    fn wants_backend_events(&self) -> bool {
        false
    }
    /// How long until an operation the device's rate limiter refused may go
    /// ahead, if one is waiting: the transport arms a timer for it and calls
    /// [`VirtioDevice::process_timer`] when it expires.
    fn throttled_for(&self) -> Option<std::time::Duration> {
        None
    }
    /// Retries what the rate limiter held back. False if the device needs a reset.
    fn process_timer(&mut self) -> bool {
        true
    }
    /// One line of statistics for the log at exit, if the device keeps any.
    fn report(&self) -> Option<String> {
        None
    }
    /// Cumulative counters under Firecracker's metric names (e.g. `read_count`).
    fn metrics(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Host memory the device maps into guest-physical space, if any.
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Where the VMM placed [`VirtioDevice::device_memory`] (before the
    /// driver can read the device's configuration).
    fn set_device_memory_address(&mut self, _guest_addr: u64) {}
    /// The device as `Any`, for the VMM's device-specific calls (e.g. a new
    /// disk image).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

#[cfg(test)]
mod interrupt_tests {
    use super::*;
    use crate::test_util::CountingIrq;

    #[test]
    fn every_raise_and_retrigger_counts_in_the_process_wide_triggers() {
        let irq = Arc::new(CountingIrq::default());
        let line = Arc::new(LineInterrupt::new(irq.clone()));
        let interrupt = Interrupt::new(line.clone());
        // Other tests raise interrupts too, at the same time: at least ours.
        let before = interrupt_triggers();
        interrupt.signal_used(1);
        assert_eq!(line.status(), INTERRUPT_USED_BUFFER);
        line.retrigger();
        line.ack(INTERRUPT_USED_BUFFER);
        // Nothing pending: no retrigger, nothing counted by it.
        line.retrigger();
        assert_eq!(irq.count(), 2);
        assert!(interrupt_triggers() - before >= 2);
        interrupt.signal_config();
        assert_eq!(line.status(), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(irq.count(), 3);
    }
}
