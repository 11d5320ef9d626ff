//! What every virtio transport shares (virtio 1.2 §2, §3): the device
//! status state machine, feature negotiation, queue set-up with validation
//! of every guest-given value, activation on the event loop, reset, and the
//! saved state of all of it; and [`QueueEvents`], which runs a device's
//! queues, backend and rate-limit timer in the VMM's event loop. A
//! transport (virtio-mmio in mmio.rs) decodes its own registers into these
//! calls and delivers interrupts its own way ([`VirtioInterrupt`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    status, ActivateError, Interrupt, QueueSnapshot, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// The device behind a transport, under a lock of its own: the event loop
/// holds it for a queue pass, a vCPU never needs it for a register access
/// (except device-specific configuration space).
pub type SharedDevice = Arc<Mutex<Box<dyn VirtioDevice>>>;

/// A transport: its registers are its own, its core is [`VirtioCore`].
pub trait VirtioTransport: Send {
    /// The transport-neutral state.
    fn core(&self) -> &VirtioCore;
    /// The transport-neutral state, to change.
    fn core_mut(&mut self) -> &mut VirtioCore;
    /// After a restore, once the vCPUs can take interrupts: delivers what
    /// the driver had not acknowledged and looks at every queue once.
    fn kick_after_restore(&self);
}

/// The state every transport keeps for one device.
///
/// Lock order: the transport before its device, never the other way round.
pub struct VirtioCore {
    pub(crate) device: SharedDevice,
    pub(crate) device_type: u32,
    pub(crate) device_features: u64,
    /// Set while the device is activated and not broken; read by the event
    /// loop without the transport lock.
    pub(crate) running: Arc<AtomicBool>,
    /// Queues checked at DRIVER_OK, waiting for the event loop to activate the
    /// device with them (`activate_evt` tells it).
    pub(crate) pending: Option<Vec<Queue>>,
    pub(crate) activate_evt: Arc<EventFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    /// Signalled when the guest notifies a queue without an ioeventfd in
    /// between (the VMM registers ioeventfds for the same effect).
    pub(crate) queue_evts: Vec<Arc<EventFd>>,
    pub(crate) queues: Vec<Queue>,
    /// Queues given a size (zero, too big, not a power of two) or a ring address
    /// (misaligned) that the Queue rejected: it keeps the old value, so the
    /// transport remembers and refuses to start the device.
    pub(crate) bad_config: Vec<bool>,
    pub(crate) status: u32,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) config_generation: u32,
    pub(crate) activated: bool,
}

impl VirtioCore {
    /// The core for `device`, raising `interrupt`, with access to guest memory.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<std::io::Result<Vec<_>>>()?;
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(VirtioCore {
            device_type: device.device_type(),
            device_features: device.features(),
            device: Arc::new(Mutex::new(device)),
            running: Arc::new(AtomicBool::new(false)),
            pending: None,
            activate_evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
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
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
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
        let activation = self.activation(queues);
        let result = self.with_device(|d| d.activate_with(activation));
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

    /// What the device is started with: `queues`, guest memory, a copy of
    /// each queue's notification eventfd, the interrupt.
    fn activation(&self, queues: Vec<Queue>) -> super::Activation {
        super::Activation {
            mem: self.mem.clone(),
            queues,
            // Shared, not duplicated: activation runs under the seccomp
            // filter, which allows no new descriptors.
            queue_evts: self.queue_evts.clone(),
            interrupt: self.device_interrupt(),
        }
    }

    /// The handle a device raises this transport's interrupt with.
    pub fn device_interrupt(&self) -> Interrupt {
        Interrupt::new(self.interrupt.clone())
    }

    /// Whether the device runs: activated and not broken. A device that needs
    /// a reset is not called again until the driver resets it.
    pub fn running(&self) -> bool {
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

    pub(crate) fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue set-up is only allowed before DRIVER_OK (§4.2.3.2).
        if self.activated || self.pending.is_some() {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Resets the device and every register (status 0 written); the
    /// transport clears its own interrupt state.
    pub fn reset(&mut self) {
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
    }

    /// Applies a status write, enforcing the order of §3.1.1.
    pub fn set_status(&mut self, value: u32) {
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
        // The device takes copies of the configured queues; the transport
        // keeps the configuration for the driver to read back (PCI's
        // common configuration), and resets it with the device.
        let mut ready = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match Queue::try_from(q.state()) {
                Ok(mut live) => {
                    live.set_event_idx(event_idx);
                    ready.push(live);
                }
                Err(e) => {
                    log::error!("virtio: cannot copy a queue: {e:?}");
                    self.mark_needs_reset();
                    return;
                }
            }
        }
        // Activation itself runs on the event loop, not on this vCPU thread.
        self.pending = Some(ready);
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("virtio: cannot ask for device activation: {e}");
            self.pending = None;
            self.mark_needs_reset();
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

/// A queue's ring a driver gives the address of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table (16-byte aligned).
    Descriptors,
    /// The driver (available) ring (2-byte aligned).
    Driver,
    /// The device (used) ring (4-byte aligned).
    Device,
}

/// Register-level operations every transport decodes its registers into.
impl VirtioCore {
    /// The device feature word `device_features_sel` selects (0 past word 1).
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver feature word `driver_features_sel` selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// A driver feature word write: only between DRIVER and FEATURES_OK
    /// (or FAILED), as §3.1.1 orders it; ignored otherwise.
    pub fn write_driver_features_word(&mut self, value: u32) {
        let allowed = self.status & status::DRIVER != 0
            && self.status & (status::FEATURES_OK | status::FAILED) == 0;
        if !allowed {
            return;
        }
        let f = &mut self.driver_features;
        match self.driver_features_sel {
            0 => *f = (*f & !0xffff_ffff) | u64::from(value),
            1 => *f = (*f & 0xffff_ffff) | u64::from(value) << 32,
            _ => {}
        }
    }

    /// The driver sets the selected queue's size: a power of two up to the
    /// maximum, or the queue is marked misconfigured.
    pub fn set_queue_size(&mut self, value: u32) {
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

    /// The driver marks the selected queue ready (1) or not.
    pub fn set_queue_ready(&mut self, value: u32) {
        if let Some(q) = self.selected_queue() {
            q.set_ready(value == 1);
        }
    }

    /// The driver writes the low or high half of the selected queue's
    /// `ring` address; a low half not aligned as §2.7 says marks the queue
    /// misconfigured.
    pub fn set_ring_address(&mut self, ring: Ring, high: bool, value: u32) {
        let (low, align) = match (high, ring) {
            (true, _) => (0, 1),
            (false, Ring::Descriptors) => (value, 16),
            (false, Ring::Driver) => (value, 2),
            (false, Ring::Device) => (value, 4),
        };
        let (lo, hi) = if high {
            (None, Some(value))
        } else {
            (Some(value), None)
        };
        self.with_queue(low, align, |q| match ring {
            Ring::Descriptors => q.set_desc_table_address(lo, hi),
            Ring::Driver => q.set_avail_ring_address(lo, hi),
            Ring::Device => q.set_used_ring_address(lo, hi),
        });
    }
}

/// The transport-neutral part of a saved transport.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoreState {
    /// Virtio device ID of the device behind it.
    pub device_type: u32,
    /// Device status.
    pub status: u32,
    /// The device feature word selected.
    pub device_features_sel: u32,
    /// The driver feature word selected.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// The queue selected.
    pub queue_sel: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// The device was started (DRIVER_OK accepted).
    pub activated: bool,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
    /// Queues the driver misconfigured during set-up.
    pub bad_config: Vec<bool>,
}

impl VirtioCore {
    /// Wakes every queue once (after a restore, once the vCPUs can take an
    /// interrupt: requests made available before the snapshot are served).
    pub fn kick_queues(&self) {
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio: cannot signal a restored queue: {e}");
            }
        }
    }

    /// Signals queue `index` as a notification would (an index the device
    /// does not have is ignored).
    pub fn notify(&self, index: u32) {
        if let Some(evt) = self.queue_evts.get(index as usize) {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio: cannot signal queue {index}: {e}");
            }
        }
    }

    /// The device's state for a snapshot: a started device's live queues as
    /// the driver sees them.
    pub fn save(&self) -> CoreState {
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
        CoreState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            activated,
            queues,
            bad_config: self.bad_config.clone(),
        }
    }

    /// A core in `state` for `device` (itself restored), after every saved
    /// value is checked as the driver's writes are: a started device is
    /// started again with its saved queues, here, before any vCPU runs; a
    /// device that needed a reset still needs one. (A transport restores
    /// its interrupt state before this, so a started device finds it.)
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        state: &CoreState,
    ) -> Result<Self, RestoreError> {
        let mut t = VirtioCore::new(device, mem, interrupt)?;
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
        if state.status & status::FEATURES_OK != 0 {
            let acked = state.driver_features;
            t.with_device(|d| d.ack_features(acked));
        }
        if !state.activated {
            t.queues = queues;
            return Ok(t);
        }
        t.activated = true;
        // The transport keeps the configuration for the driver to read back.
        for (index, (saved, kept)) in state.queues.iter().zip(&mut t.queues).enumerate() {
            *kept = saved.to_queue().map_err(|e| RestoreError::Queue {
                index,
                why: queue_error_text(&e).into(),
            })?;
        }
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
        let activation = t.activation(queues);
        t.with_device(|d| d.activate_with(activation))?;
        t.running.store(true, Ordering::SeqCst);
        Ok(t)
    }
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

/// Refuses saved registers no driver can produce: a started device whose
/// status lacks FEATURES_OK or DRIVER_OK, DRIVER_OK on a device that was not
/// started (unless it was marked broken), FEATURES_OK without VERSION_1, or a
/// started queue whose event suppression disagrees with the features.
fn check_saved_status(state: &CoreState) -> Result<(), RestoreError> {
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
    transport: Arc<Mutex<dyn VirtioTransport>>,
    device: SharedDevice,
    running: Arc<AtomicBool>,
    /// Set while the VM is paused: notifications are consumed but not served
    /// (the VMM signals every queue again on resume), the backend is not watched.
    paused: Arc<AtomicBool>,
    /// The transport's own eventfds, shared (not duplicated: a device
    /// costs no more descriptors for being watched).
    evts: Vec<Arc<EventFd>>,
    activate_evt: Arc<EventFd>,
    backend: Option<std::os::fd::RawFd>,
    backend_watched: bool,
    /// Wakes a device whose rate limiter held work back (non-blocking).
    timer: TimerFd,
    timer_armed: bool,
}

impl QueueEvents {
    /// Watches the activation, the queue eventfds and the backend of `transport`.
    pub fn new(
        transport: Arc<Mutex<dyn VirtioTransport>>,
        paused: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let guard = transport.lock().unwrap_or_else(|e| e.into_inner());
        let t = guard.core();
        let evts = t.queue_evts().to_vec();
        let activate_evt = t.activate_evt.clone();
        let backend = t.backend_fd();
        let (device, running) = (t.device.clone(), t.running.clone());
        drop(guard);
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
            .core_mut()
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
                .core_mut()
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
