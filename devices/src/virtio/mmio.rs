//! The virtio-mmio transport (virtio 1.2 §4.2, modern interface only): the register
//! block the guest driver programs, the status state machine, feature negotiation
//! and queue set-up with validation of every guest-given value.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    status, ActivateError, Interrupt, LineInterrupt, QueueSnapshot, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;
use crate::persist::Persist;
use crate::InterruptLine;

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

/// The device behind a transport, under a lock of its own: the event loop
/// holds it for a queue pass, a vCPU never needs it for a register access
/// (except device-specific configuration space).
pub type SharedDevice = Arc<Mutex<Box<dyn VirtioDevice>>>;

/// The register block of one virtio device.
///
/// Lock order: the transport before its device, never the other way round.
pub struct MmioTransport {
    device: SharedDevice,
    device_type: u32,
    device_features: u64,
    /// Set while the device is activated and not broken; read by the event
    /// loop without the transport lock.
    running: Arc<AtomicBool>,
    /// Queues checked at DRIVER_OK, waiting for the event loop to activate the
    /// device with them (`activate_evt` tells it).
    pending: Option<Vec<Queue>>,
    activate_evt: EventFd,
    mem: GuestMemoryMmap,
    /// The device's interrupt line and the status register behind
    /// InterruptStatus and InterruptACK.
    interrupt: Arc<LineInterrupt>,
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
    /// A transport for `device`, raising `line`, with access to guest memory.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        line: Arc<dyn InterruptLine>,
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
            device_type: device.device_type(),
            device_features: device.features(),
            device: Arc::new(Mutex::new(device)),
            running: Arc::new(AtomicBool::new(false)),
            pending: None,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            mem,
            interrupt: Arc::new(LineInterrupt::new(line)),
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
        self.with_device(|d| d.report())
    }

    /// Runs `f` on the device, under its lock (see [`Self::config_changed`]
    /// after a change the driver must learn of).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut dyn VirtioDevice) -> R) -> R {
        let mut d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        f(d.as_mut())
    }

    /// Signalled when a device is ready for the event loop to activate it.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Activates the device with the queues the driver set up, if DRIVER_OK
    /// left any waiting (called on the event loop). Returns whether the device
    /// was activated now.
    pub fn complete_activation(&mut self) -> bool {
        let Some(queues) = self.pending.take() else {
            return false;
        };
        let result =
            self.with_device(|d| d.activate(self.mem.clone(), queues, self.device_interrupt()));
        match result {
            Ok(()) => {
                self.activated = true;
                self.running.store(true, Ordering::SeqCst);
                true
            }
            Err(e) => {
                crate::guest_warn!("virtio: device activation failed: {e}");
                self.mark_needs_reset();
                false
            }
        }
    }

    /// Tells the driver that the device configuration changed (e.g. a disk's
    /// capacity): a new configuration generation and, once the driver runs the
    /// device, a configuration-change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.device_interrupt().signal_config();
        }
    }

    /// The handle a device raises this transport's interrupt with.
    fn device_interrupt(&self) -> Interrupt {
        Interrupt::new(self.interrupt.clone())
    }

    /// Whether the device runs: activated and not broken. A device that needs
    /// a reset is not called again until the driver resets it.
    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Processes queue `index` after a notification. Returns true if the
    /// queue has work left after a pass that stopped at its budget. (The event
    /// loop does the same through [`QueueEvents`] without the transport lock.)
    pub fn notify_queue(&mut self, index: usize) -> bool {
        if index >= self.queues.len() {
            return false;
        }
        match serve_queue(&self.device, &self.running, index) {
            Served::Broken => {
                self.mark_needs_reset();
                false
            }
            Served::Done { pending } => pending,
        }
    }

    /// The device's backend descriptor, if it has one.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.with_device(|d| d.backend_fd())
    }

    /// Handles backend readiness.
    pub fn process_backend(&mut self) {
        if let Served::Broken = serve_device(&self.device, &self.running, |d| d.process_backend()) {
            self.mark_needs_reset();
        }
    }

    /// Whether the backend descriptor should be watched now (never while the
    /// device is broken: a readable backend would wake the loop for nothing).
    pub fn wants_backend_events(&self) -> bool {
        self.running() && self.with_device(|d| d.wants_backend_events())
    }

    /// Marks the device broken: it is not called again until the driver
    /// resets it, and the driver learns of it through a configuration interrupt.
    pub fn mark_needs_reset(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            if self.status & status::DRIVER_OK != 0 {
                self.device_interrupt().signal_config();
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue set-up is only allowed before DRIVER_OK (§4.2.3.2).
        if self.activated || self.pending.is_some() {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        self.pending = None;
        if self.activated {
            self.with_device(|d| d.reset());
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
            let offered = self.device_features;
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
            let acked = self.driver_features;
            self.with_device(|d| d.ack_features(acked));
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
        // Activation itself runs on the event loop, not on this vCPU thread.
        self.pending = Some(ready);
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("virtio: cannot ask for device activation: {e}");
            self.pending = None;
            self.mark_needs_reset();
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => match self.queues.get(self.queue_sel as usize) {
                Some(_) if self.activated || self.pending.is_some() => 1,
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
            self.with_device(|d| d.read_config(offset - CONFIG_SPACE, data));
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
                self.with_device(|d| d.write_config(offset - CONFIG_SPACE, data));
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

/// What a snapshot keeps of a transport: every register the driver
/// programmed, the interrupt status, and each queue (the device's live queues
/// once it is started).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    /// Virtio device ID of the device behind it.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus: bits raised and not yet acknowledged.
    pub interrupt_status: u32,
    /// The device was started (DRIVER_OK accepted).
    pub activated: bool,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
    /// Queues the driver misconfigured during set-up.
    pub bad_config: Vec<bool>,
}

/// Why a saved transport cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The transport's descriptors cannot be created.
    #[error("Cannot set up the device's transport: {0}.")]
    Io(#[from] std::io::Error),
    /// The state is for another kind of device.
    #[error("The saved transport is for a virtio device of type {saved}, not {device}.")]
    DeviceType { saved: u32, device: u32 },
    /// The state does not have the device's queues.
    #[error("The saved transport has {saved} queues (and {flags} queue flags); the device has {device}.")]
    QueueCount {
        saved: usize,
        flags: usize,
        device: usize,
    },
    /// A saved queue is not one a driver could have set up.
    #[error("Saved queue {index} is not one a driver can set up ({why}).")]
    Queue { index: usize, why: String },
    /// The saved driver features are more than the device offers.
    #[error("The saved driver features {0:#x} include features the device does not offer.")]
    Features(u64),
    /// The saved registers are in a state no driver can bring a device to.
    #[error("The saved transport is in a state no driver can bring it to: {0}.")]
    Inconsistent(&'static str),
    /// The device refused its saved queues.
    #[error("The device cannot start with its saved queues: {0}")]
    Activate(#[from] ActivateError),
}

impl MmioTransport {
    /// After a restore, once the vCPUs can take it: raises the interrupt
    /// again if the driver had not acknowledged it, and looks at every queue
    /// once (requests made available before the snapshot are served).
    pub fn kick_after_restore(&self) {
        self.interrupt.retrigger();
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio: cannot signal a restored queue: {e}");
            }
        }
    }
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type Resources = (
        Box<dyn VirtioDevice>,
        GuestMemoryMmap,
        Arc<dyn InterruptLine>,
    );
    type Error = RestoreError;

    fn save(&self) -> MmioTransportState {
        let activated = self.activated || self.pending.is_some();
        let live = match &self.pending {
            Some(queues) => Some(queues.iter().map(|q| q.state()).collect()),
            None if self.activated => self.with_device(|d| d.queue_states()),
            None => None,
        };
        let queues = live
            .unwrap_or_else(|| self.queues.iter().map(|q| q.state()).collect())
            .into_iter()
            .map(QueueSnapshot::from)
            .collect();
        MmioTransportState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated,
            queues,
            bad_config: self.bad_config.clone(),
        }
    }

    /// A transport in `state` for `device` (itself restored): a started
    /// device is started again with its saved queues, here, before any vCPU
    /// runs; a device that needed a reset still needs one.
    fn restore(
        (device, mem, line): Self::Resources,
        state: &MmioTransportState,
    ) -> Result<Self, RestoreError> {
        let mut t = MmioTransport::new(device, mem, line)?;
        if state.device_type != t.device_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                device: t.device_type,
            });
        }
        let count = t.queues.len();
        if state.queues.len() != count || state.bad_config.len() != count {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                flags: state.bad_config.len(),
                device: count,
            });
        }
        if state.driver_features & !t.device_features != 0 {
            return Err(RestoreError::Features(state.driver_features));
        }
        check_saved_status(state)?;
        let mut queues = Vec::with_capacity(count);
        for (index, (saved, fresh)) in state.queues.iter().zip(&t.queues).enumerate() {
            let queue_err = |why: String| RestoreError::Queue { index, why };
            if saved.max_size != fresh.max_size() {
                return Err(queue_err(format!(
                    "maximum size {} where the device has {}",
                    saved.max_size,
                    fresh.max_size()
                )));
            }
            queues.push(
                saved
                    .to_queue()
                    .map_err(|e| queue_err(queue_error_text(&e).into()))?,
            );
        }
        t.status = state.status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        t.bad_config.clone_from(&state.bad_config);
        t.interrupt.restore_status(state.interrupt_status);
        if state.status & status::FEATURES_OK != 0 {
            let acked = state.driver_features;
            t.with_device(|d| d.ack_features(acked));
        }
        if !state.activated {
            t.queues = queues;
            return Ok(t);
        }
        t.activated = true;
        if state.status & status::DEVICE_NEEDS_RESET != 0 {
            // Broken when saved: the driver must reset it, as before.
            return Ok(t);
        }
        if let Some(index) = queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&t.mem) || q.avail_ring() == 0)
        {
            return Err(RestoreError::Queue {
                index,
                why: "not ready, or outside guest memory".into(),
            });
        }
        let (mem, interrupt) = (t.mem.clone(), t.device_interrupt());
        t.with_device(|d| d.activate(mem, queues, interrupt))?;
        t.running.store(true, Ordering::SeqCst);
        Ok(t)
    }
}

/// Refuses saved registers no driver can produce: a started device whose
/// status lacks FEATURES_OK or DRIVER_OK, DRIVER_OK on a device that was not
/// started (unless it was marked broken), FEATURES_OK without VERSION_1, or a
/// started queue whose event suppression disagrees with the features.
fn check_saved_status(state: &MmioTransportState) -> Result<(), RestoreError> {
    use status::*;
    let bad = |why| Err(RestoreError::Inconsistent(why));
    let s = state.status;
    let started = FEATURES_OK | DRIVER_OK;
    if state.activated && s & started != started {
        return bad("started without FEATURES_OK and DRIVER_OK");
    }
    if !state.activated && s & DRIVER_OK != 0 && s & DEVICE_NEEDS_RESET == 0 {
        return bad("DRIVER_OK on a device that was not started");
    }
    if s & FEATURES_OK != 0 && state.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
        return bad("FEATURES_OK without VERSION_1");
    }
    let event_idx = state.driver_features & (1 << super::VIRTIO_RING_F_EVENT_IDX) != 0;
    if state.activated && state.queues.iter().any(|q| q.event_idx != event_idx) {
        return bad("a queue's event suppression differs from the features");
    }
    Ok(())
}

/// A queue library refusal as words.
fn queue_error_text(e: &virtio_queue::Error) -> &'static str {
    use virtio_queue::Error as E;
    match e {
        E::InvalidSize => "its size is zero, above the maximum or not a power of two",
        E::InvalidDescTableAlign => "its descriptor table is not 16-byte aligned",
        E::InvalidAvailRingAlign => "its available ring is not 2-byte aligned",
        E::InvalidUsedRingAlign => "its used ring is not 4-byte aligned",
        _ => "the queue library refused it",
    }
}

/// What a pass over a queue or the backend found.
enum Served {
    /// The device did its work; `pending` if the pass stopped at its budget.
    Done { pending: bool },
    /// The device found its queue unusable: it needs a reset.
    Broken,
}

/// One pass over queue `index` under the device lock only (skipped while the
/// device is not running).
fn serve_queue(device: &SharedDevice, running: &AtomicBool, index: usize) -> Served {
    if !running.load(Ordering::SeqCst) {
        return Served::Done { pending: false };
    }
    let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
    if !d.process_queue(index) {
        return Served::Broken;
    }
    Served::Done {
        pending: d.queue_pending(index),
    }
}

/// A pass of the device's own (backend readiness, the rate-limit timer),
/// under the device lock only; `pass` returns false if the device needs a reset.
fn serve_device(
    device: &SharedDevice,
    running: &AtomicBool,
    pass: impl FnOnce(&mut dyn VirtioDevice) -> bool,
) -> Served {
    if !running.load(Ordering::SeqCst) {
        return Served::Done { pending: false };
    }
    let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
    if pass(d.as_mut()) {
        Served::Done { pending: false }
    } else {
        Served::Broken
    }
}

/// Runs a transport's device in the VMM's event loop: its activation (asked
/// for at DRIVER_OK by a vCPU), one eventfd per queue (signalled by a KVM
/// ioeventfd or by the transport itself), and the device's backend descriptor
/// (a TAP), watched only while the device can take input. Queue passes take
/// the device lock only, so vCPU register accesses never wait behind them.
pub struct QueueEvents {
    transport: Arc<Mutex<MmioTransport>>,
    device: SharedDevice,
    running: Arc<AtomicBool>,
    /// Set while the VM is paused: notifications are consumed but not served
    /// (the VMM signals every queue again on resume), the backend is not watched.
    paused: Arc<AtomicBool>,
    evts: Vec<EventFd>,
    activate_evt: EventFd,
    backend: Option<std::os::fd::RawFd>,
    backend_watched: bool,
    /// Wakes a device whose rate limiter held work back (non-blocking).
    timer: TimerFd,
    timer_armed: bool,
}

impl QueueEvents {
    /// Watches the activation, the queue eventfds and the backend of `transport`.
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
        let activate_evt = t.activate_evt.try_clone()?;
        let backend = t.backend_fd();
        let (device, running) = (t.device.clone(), t.running.clone());
        drop(t);
        let timer = TimerFd::new()?;
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no memory
        // is passed.
        let nonblocking = unsafe {
            let flags = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
            flags >= 0
                && libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !nonblocking {
            return Err(std::io::Error::last_os_error());
        }
        Ok(QueueEvents {
            transport,
            device,
            running,
            paused,
            evts,
            activate_evt,
            backend,
            backend_watched: false,
            timer,
            timer_armed: false,
        })
    }

    fn timer_token(&self) -> u32 {
        self.evts.len() as u32 + 2
    }

    fn backend_token(&self) -> u32 {
        self.evts.len() as u32
    }

    fn activate_token(&self) -> u32 {
        self.evts.len() as u32 + 1
    }

    /// Adds or removes the backend from the watch list as the device wants,
    /// and arms the rate-limit timer for what the device holds back (never
    /// while paused: resuming serves every queue again, which re-arms it).
    fn update_backend_interest(&mut self, ops: &mut EventOps) {
        let live = !self.paused.load(Ordering::SeqCst) && self.running.load(Ordering::SeqCst);
        let (wants, wait) = if live {
            let d = self.device.lock().unwrap_or_else(|e| e.into_inner());
            (d.wants_backend_events(), d.throttled_for())
        } else {
            (false, None)
        };
        self.arm_timer(wait);
        let Some(fd) = self.backend else { return };
        if wants != self.backend_watched {
            let ev = Events::with_data_raw(fd, self.backend_token(), EventSet::IN);
            let r = if wants { ops.add(ev) } else { ops.remove(ev) };
            match r {
                Ok(()) => self.backend_watched = wants,
                Err(e) => log::error!("virtio: cannot change the backend watch: {e:?}"),
            }
        }
    }

    fn arm_timer(&mut self, wait: Option<std::time::Duration>) {
        let r = match wait {
            // A zero duration would disarm the timer: wake up right away instead.
            Some(d) => {
                self.timer_armed = true;
                self.timer
                    .reset(d.max(std::time::Duration::from_micros(1)), None)
            }
            None if self.timer_armed => {
                self.timer_armed = false;
                self.timer.clear()
            }
            None => Ok(()),
        };
        if let Err(e) = r {
            log::error!("virtio: cannot set the rate-limit timer: {e}");
        }
    }

    fn broken(&self) {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mark_needs_reset();
    }

    fn serve(&self, index: usize) {
        match serve_queue(&self.device, &self.running, index) {
            Served::Broken => self.broken(),
            Served::Done { pending: true } => {
                // Work left after a bounded pass: come back after the others.
                if let Err(e) = self.evts[index].write(1) {
                    log::error!("virtio: cannot signal queue {index} again: {e}");
                }
            }
            Served::Done { pending: false } => {}
        }
    }
}

impl MutEventSubscriber for QueueEvents {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        let index = token as usize;
        if let Some(evt) = self.evts.get(index) {
            // Coalesced notifications: one pass over the queue serves them all.
            let _ = evt.read();
            if !self.paused.load(Ordering::SeqCst) {
                self.serve(index);
            }
        } else if token == self.activate_token() {
            let _ = self.activate_evt.read();
            let activated = self
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .complete_activation();
            // Notifications that came before the activation were dropped.
            if activated && !self.paused.load(Ordering::SeqCst) {
                for i in 0..self.evts.len() {
                    self.serve(i);
                }
            }
        } else if token == self.backend_token() && !self.paused.load(Ordering::SeqCst) {
            if let Served::Broken =
                serve_device(&self.device, &self.running, |d| d.process_backend())
            {
                self.broken();
            }
        } else if token == self.timer_token() {
            // Non-blocking: nothing to read if the timer was set again since.
            let _ = self.timer.wait();
            self.timer_armed = false;
            if !self.paused.load(Ordering::SeqCst) {
                if let Served::Broken =
                    serve_device(&self.device, &self.running, |d| d.process_timer())
                {
                    self.broken();
                }
            }
        }
        self.update_backend_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {i}: {e:?}");
            }
        }
        let token = self.activate_token();
        if let Err(e) = ops.add(Events::with_data(&self.activate_evt, token, EventSet::IN)) {
            log::error!("virtio: cannot watch device activation: {e:?}");
        }
        let timer = Events::with_data(&self.timer, self.timer_token(), EventSet::IN);
        if let Err(e) = ops.add(timer) {
            log::error!("virtio: cannot watch the rate-limit timer: {e:?}");
        }
        self.update_backend_interest(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::CountingIrq;
    use crate::virtio::block::Block;
    use crate::virtio::INTERRUPT_CONFIG_CHANGE;
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
        let t = MmioTransport::new(Box::new(dev), mem, Arc::new(CountingIrq::default())).unwrap();
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
        // Activation waits for the event loop; the driver already sees the
        // queue as ready and cannot change it.
        assert!(!t.activated);
        assert_eq!(t.activate_evt().read().unwrap(), 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        assert!(t.complete_activation());
        assert!(t.activated);
        assert!(!t.complete_activation(), "only once");
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
        fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
            None
        }
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
        let mut t =
            MmioTransport::new(Box::new(dev), mem, Arc::new(CountingIrq::default())).unwrap();
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        assert!(t.complete_activation());
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
        assert!(
            !t.wants_backend_events(),
            "not before the event loop activates it"
        );
        assert!(t.complete_activation());
        assert!(t.wants_backend_events());
    }

    #[test]
    fn a_reset_before_the_event_loop_activates_drops_the_activation() {
        let (mut t, p) = transport("reset-pending");
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        w(&mut t, REG_STATUS, 0);
        assert!(!t.complete_activation());
        assert!(!t.activated);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_config_change_bumps_the_generation_and_interrupts_a_running_driver() {
        let (mut t, p) = transport("config-change");
        t.config_changed();
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0, "no driver yet");
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        t.config_changed();
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 2);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        let _ = std::fs::remove_file(p);
    }

    fn restored(
        saved: &MmioTransportState,
        path: &std::path::Path,
    ) -> Result<MmioTransport, RestoreError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let dev = Block::open(path, false, None).unwrap();
        MmioTransport::restore(
            (Box::new(dev), mem, Arc::new(CountingIrq::default())),
            saved,
        )
    }

    #[test]
    fn a_transport_in_set_up_round_trips() {
        let (mut t, p) = transport("persist-setup");
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 32);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x2000);
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0x3001); // misaligned: remembered as bad
        let saved = t.save();
        assert!(!saved.activated);
        assert_eq!(
            (saved.queues[0].size, saved.queues[0].desc_table),
            (32, 0x2000)
        );
        assert_eq!(saved.bad_config, [true]);
        drop(t); // releases the image lock
        let mut back = restored(&saved, &p).unwrap();
        assert_eq!(back.save(), saved);
        // The driver goes on where it was: the bad ring address still keeps
        // the device from starting.
        w(&mut back, REG_QUEUE_DRIVER_LOW, 0x3000);
        w(&mut back, REG_QUEUE_DEVICE_LOW, 0x4000);
        w(&mut back, REG_QUEUE_READY, 1);
        w(&mut back, REG_STATUS, RUNNING);
        assert_ne!(r(&mut back, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_started_transport_round_trips_and_runs_again() {
        let (mut t, p) = transport("persist-run");
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        // Saved between DRIVER_OK and the event loop's activation: started.
        let pending = t.save();
        assert!(t.complete_activation());
        t.config_changed();
        let saved = t.save();
        assert_eq!(pending.queues, saved.queues);
        assert!(saved.activated);
        assert_eq!(saved.interrupt_status, INTERRUPT_CONFIG_CHANGE);
        assert_eq!(
            (
                saved.queues[0].size,
                saved.queues[0].avail_ring,
                saved.queues[0].ready
            ),
            (16, 0x3000, true)
        );
        drop(t);
        let mut back = restored(&saved, &p).unwrap();
        assert!(
            back.activated && back.running(),
            "started before any vCPU runs"
        );
        assert_eq!(back.save(), saved);
        assert_eq!(r(&mut back, REG_STATUS), RUNNING);
        assert_eq!(r(&mut back, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(r(&mut back, REG_CONFIG_GENERATION), 1);
        // A reset after the restore works as before it.
        w(&mut back, REG_STATUS, 0);
        assert!(!back.activated);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn saved_transports_a_driver_could_not_have_made_are_refused() {
        let (mut t, p) = transport("persist-bad");
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        assert!(t.complete_activation());
        let good = t.save();
        drop(t);
        let mut cases: Vec<(&str, MmioTransportState)> = Vec::new();
        let mut s = good.clone();
        s.device_type = 1;
        cases.push(("device type", s));
        let mut s = good.clone();
        s.queues.push(s.queues[0]);
        cases.push(("queue count", s));
        let mut s = good.clone();
        s.queues[0].size = 12;
        cases.push(("queue size", s));
        let mut s = good.clone();
        s.queues[0].max_size = 1024;
        cases.push(("maximum size", s));
        let mut s = good.clone();
        s.queues[0].used_ring = 0x4002;
        cases.push(("misaligned ring", s));
        let mut s = good.clone();
        s.queues[0].desc_table = 0xfff0_0000;
        cases.push(("ring outside memory", s));
        let mut s = good.clone();
        s.driver_features |= 1 << 50;
        cases.push(("features", s));
        let mut s = good.clone();
        s.status &= !status::DRIVER_OK;
        cases.push(("started without DRIVER_OK", s));
        let mut s = good.clone();
        s.activated = false;
        cases.push(("DRIVER_OK, never started", s));
        let mut s = good.clone();
        s.driver_features = 0;
        cases.push(("FEATURES_OK without VERSION_1", s));
        let mut s = good.clone();
        s.queues[0].event_idx = true;
        cases.push(("event suppression not negotiated", s));
        for (what, state) in cases {
            assert!(restored(&state, &p).is_err(), "{what}");
        }
        assert!(restored(&good, &p).is_ok());
        let _ = std::fs::remove_file(p);
    }
}
