//! The virtio-mmio transport (virtio 1.2 §4.2, modern interface only): the
//! register block the guest driver programs, decoded into the
//! transport-neutral [`VirtioCore`], and one interrupt line with its status
//! register ([`LineInterrupt`]).

use std::sync::Arc;

use virtio_queue::QueueT;

use super::transport::{CoreState, Ring, VirtioCore, VirtioTransport};
use super::{status, LineInterrupt, VirtioDevice};
use crate::bus::BusDevice;
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use crate::InterruptLine;

pub use super::transport::{QueueEvents, RestoreError, SharedDevice};

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
    pub(crate) core: VirtioCore,
    /// The device's interrupt line and the status register behind
    /// InterruptStatus and InterruptACK.
    interrupt: Arc<LineInterrupt>,
}

impl VirtioTransport for MmioTransport {
    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
    }

    /// Raises the interrupt again if the driver had not acknowledged it,
    /// and looks at every queue once (requests made available before the
    /// snapshot are served).
    fn kick_after_restore(&self) {
        self.interrupt.retrigger();
        self.core.kick_queues();
    }
}

impl MmioTransport {
    /// A transport for `device`, raising `line`, with access to guest memory.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        line: Arc<dyn InterruptLine>,
    ) -> std::io::Result<Self> {
        let interrupt = Arc::new(LineInterrupt::new(line));
        Ok(MmioTransport {
            core: VirtioCore::new(device, mem, interrupt.clone())?,
            interrupt,
        })
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.core.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => self.core.device_features_word(),
            REG_QUEUE_NUM_MAX => self
                .core
                .queues
                .get(self.core.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => match self.core.queues.get(self.core.queue_sel as usize) {
                Some(_) if self.core.activated || self.core.pending.is_some() => 1,
                Some(q) => u32::from(q.ready()),
                None => 0,
            },
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.core.status,
            // No shared memory regions: length -1 (§4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.core.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.core.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.core.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.core.write_driver_features_word(value),
            REG_QUEUE_SEL => self.core.queue_sel = value,
            REG_QUEUE_NUM => self.core.set_queue_size(value),
            REG_QUEUE_READY => self.core.set_queue_ready(value),
            REG_QUEUE_DESC_LOW => self.core.set_ring_address(Ring::Descriptors, false, value),
            REG_QUEUE_DESC_HIGH => self.core.set_ring_address(Ring::Descriptors, true, value),
            REG_QUEUE_DRIVER_LOW => self.core.set_ring_address(Ring::Driver, false, value),
            REG_QUEUE_DRIVER_HIGH => self.core.set_ring_address(Ring::Driver, true, value),
            REG_QUEUE_DEVICE_LOW => self.core.set_ring_address(Ring::Device, false, value),
            REG_QUEUE_DEVICE_HIGH => self.core.set_ring_address(Ring::Device, true, value),
            REG_QUEUE_NOTIFY => self.core.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            REG_SHM_SEL => {}
            _ => log::debug!("virtio: ignored write {value:#x} at {offset:#x}"),
        }
    }

    /// A status write; writing 0 resets the device and the interrupt status.
    fn set_status(&mut self, value: u32) {
        self.core.set_status(value);
        if value == 0 {
            self.interrupt.ack(u32::MAX);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.core
                .with_device(|d| d.read_config(offset - CONFIG_SPACE, data));
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
            if self.core.status & status::DRIVER != 0 {
                self.core
                    .with_device(|d| d.write_config(offset - CONFIG_SPACE, data));
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
/// programmed and each queue (the device's live queues once it is started),
/// with the interrupt status (one flat JSON object, as before the core was
/// split out).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    /// The transport-neutral registers and queues.
    #[serde(flatten)]
    pub core: CoreState,
    /// InterruptStatus: bits raised and not yet acknowledged.
    pub interrupt_status: u32,
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
        MmioTransportState {
            core: self.core.save(),
            interrupt_status: self.interrupt.status(),
        }
    }

    /// A transport in `state` for `device` (itself restored): its interrupt
    /// status, then the core (see [`VirtioCore::restore`]).
    fn restore(
        (device, mem, line): Self::Resources,
        state: &MmioTransportState,
    ) -> Result<Self, RestoreError> {
        let interrupt = Arc::new(LineInterrupt::new(line));
        interrupt.restore_status(state.interrupt_status);
        let core = VirtioCore::restore(device, mem, interrupt.clone(), &state.core)?;
        Ok(MmioTransport { core, interrupt })
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::CountingIrq;
    use crate::virtio::block::Block;
    use crate::virtio::INTERRUPT_CONFIG_CHANGE;
    use crate::virtio::{Interrupt, InterruptCause};
    use std::io::Write;
    use std::sync::Mutex;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    fn transport(tag: &str) -> (MmioTransport, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("vmm-mmio-{}-{tag}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[0u8; 4096])
            .unwrap();
        let mem = crate::memory::anonymous(&[(GuestAddress(0), 0x100000)], false).unwrap();
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
        assert!(!t.core.activated);
        assert_eq!(t.core.activate_evt().read().unwrap(), 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        assert!(t.core.complete_activation());
        assert!(t.core.activated);
        assert!(!t.core.complete_activation(), "only once");
        // Queue registers are frozen once the device runs.
        w(&mut t, REG_QUEUE_NUM, 8);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        // Reset returns everything to the initial state.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert!(!t.core.activated);
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
            assert!(!t.core.activated, "{name}");
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
        assert!(!t.core.activated);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn notify_signals_only_existing_queues_and_odd_accesses_are_ignored() {
        let (mut t, p) = transport("notify");
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(t.core().queue_evts()[0].read().unwrap(), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 7);
        w(&mut t, REG_QUEUE_NOTIFY, u32::MAX);
        t.core.notify_queue(usize::MAX);
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
        assert!(!t.core.activated);
        assert_ne!(r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        let _ = std::fs::remove_file(p);
    }

    /// A device whose queue processing always fails, with a backend descriptor
    /// it always wants watched; counts the calls it gets, and keeps what its
    /// activation handed it (as a device served elsewhere, vhost-user, would).
    struct Failing {
        calls: Arc<std::sync::atomic::AtomicUsize>,
        backend: std::fs::File,
        activation: Arc<Mutex<Option<crate::virtio::Activation>>>,
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
            unreachable!("the transport starts a device through activate_with")
        }
        fn activate_with(
            &mut self,
            a: crate::virtio::Activation,
        ) -> Result<(), super::super::ActivateError> {
            *self.activation.lock().unwrap() = Some(a);
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

    /// A transport for `dev` whose driver started it with one queue.
    fn started(dev: Failing) -> MmioTransport {
        let mem = crate::memory::anonymous(&[(GuestAddress(0), 0x100000)], false).unwrap();
        let mut t =
            MmioTransport::new(Box::new(dev), mem, Arc::new(CountingIrq::default())).unwrap();
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        assert!(t.core.complete_activation());
        t
    }

    #[test]
    fn a_broken_device_is_not_called_again_and_its_backend_not_watched() {
        // Found in review: a device that failed kept its (readable) backend in
        // the level-triggered event loop, which then spun.
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dev = Failing {
            calls: calls.clone(),
            backend: std::fs::File::open("/dev/null").unwrap(),
            activation: Arc::default(),
        };
        let mut t = started(dev);
        assert!(t.core.wants_backend_events());
        assert!(!t.core.notify_queue(0));
        assert_ne!(r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(
            !t.core.wants_backend_events(),
            "a broken device's backend is not watched"
        );
        t.core.process_backend();
        assert!(!t.core.notify_queue(0));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // After the driver resets it, the device runs again.
        w(&mut t, REG_STATUS, 0);
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        assert!(
            !t.core.wants_backend_events(),
            "not before the event loop activates it"
        );
        assert!(t.core.complete_activation());
        assert!(t.core.wants_backend_events());
    }

    #[test]
    fn activation_hands_a_device_each_queue_s_notification_eventfd() {
        let got = Arc::new(Mutex::new(None));
        let mut t = started(Failing {
            calls: Arc::default(),
            backend: std::fs::File::open("/dev/null").unwrap(),
            activation: got.clone(),
        });
        let a = got.lock().unwrap().take().expect("activated");
        assert_eq!((a.queues.len(), a.queue_evts.len()), (1, 1));
        // The driver's notification of queue 0 is what the device waits on.
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(a.queue_evts[0].read().unwrap(), 1);
        // virtio-mmio has no interrupt eventfd a backend could write alone.
        assert!(a.interrupt.notifier(InterruptCause::Queue(0)).is_none());
    }

    #[test]
    fn a_reset_before_the_event_loop_activates_drops_the_activation() {
        let (mut t, p) = transport("reset-pending");
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        w(&mut t, REG_STATUS, 0);
        assert!(!t.core.complete_activation());
        assert!(!t.core.activated);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_config_change_bumps_the_generation_and_interrupts_a_running_driver() {
        let (mut t, p) = transport("config-change");
        t.core_mut().config_changed();
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0, "no driver yet");
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        t.core_mut().config_changed();
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 2);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        let _ = std::fs::remove_file(p);
    }

    fn restored(
        saved: &MmioTransportState,
        path: &std::path::Path,
    ) -> Result<MmioTransport, RestoreError> {
        let mem = crate::memory::anonymous(&[(GuestAddress(0), 0x100000)], false).unwrap();
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
        assert!(!saved.core.activated);
        assert_eq!(
            (saved.core.queues[0].size, saved.core.queues[0].desc_table),
            (32, 0x2000)
        );
        assert_eq!(saved.core.bad_config, [true]);
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
        assert!(t.core.complete_activation());
        t.core_mut().config_changed();
        let saved = t.save();
        assert_eq!(pending.core.queues, saved.core.queues);
        assert!(saved.core.activated);
        assert_eq!(saved.interrupt_status, INTERRUPT_CONFIG_CHANGE);
        assert_eq!(
            (
                saved.core.queues[0].size,
                saved.core.queues[0].avail_ring,
                saved.core.queues[0].ready
            ),
            (16, 0x3000, true)
        );
        drop(t);
        let mut back = restored(&saved, &p).unwrap();
        assert!(
            back.core.activated && back.core.running(),
            "started before any vCPU runs"
        );
        assert_eq!(back.save(), saved);
        assert_eq!(r(&mut back, REG_STATUS), RUNNING);
        assert_eq!(r(&mut back, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(r(&mut back, REG_CONFIG_GENERATION), 1);
        // A reset after the restore works as before it.
        w(&mut back, REG_STATUS, 0);
        assert!(!back.core.activated);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn saved_transports_a_driver_could_not_have_made_are_refused() {
        let (mut t, p) = transport("persist-bad");
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        w(&mut t, REG_STATUS, RUNNING);
        assert!(t.core.complete_activation());
        let good = t.save();
        drop(t);
        let mut cases: Vec<(&str, MmioTransportState)> = Vec::new();
        let mut s = good.clone();
        s.core.device_type = 1;
        cases.push(("device type", s));
        let mut s = good.clone();
        s.core.queues.push(s.core.queues[0]);
        cases.push(("queue count", s));
        let mut s = good.clone();
        s.core.queues[0].size = 12;
        cases.push(("queue size", s));
        let mut s = good.clone();
        s.core.queues[0].max_size = 1024;
        cases.push(("maximum size", s));
        let mut s = good.clone();
        s.core.queues[0].used_ring = 0x4002;
        cases.push(("misaligned ring", s));
        let mut s = good.clone();
        s.core.queues[0].desc_table = 0xfff0_0000;
        cases.push(("ring outside memory", s));
        let mut s = good.clone();
        s.core.driver_features |= 1 << 50;
        cases.push(("features", s));
        let mut s = good.clone();
        s.core.status &= !status::DRIVER_OK;
        cases.push(("started without DRIVER_OK", s));
        let mut s = good.clone();
        s.core.activated = false;
        cases.push(("DRIVER_OK, never started", s));
        let mut s = good.clone();
        s.core.driver_features = 0;
        cases.push(("FEATURES_OK without VERSION_1", s));
        let mut s = good.clone();
        s.core.queues[0].event_idx = true;
        cases.push(("event suppression not negotiated", s));
        for (what, state) in cases {
            assert!(restored(&state, &p).is_err(), "{what}");
        }
        assert!(restored(&good, &p).is_ok());
        let _ = std::fs::remove_file(p);
    }
}
