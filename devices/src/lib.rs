//! Emulated devices of the `vmm` microVM monitor.
//!
//! Everything here is plain Rust on top of byte-level register accesses: the crate
//! builds and unit-tests without KVM. The VMM places the devices on a [`bus::Bus`]
//! (port I/O or MMIO) and routes vCPU exits to them.

#![deny(clippy::undocumented_unsafe_blocks)]

/// Logs a warning the guest caused. Each call site logs its first 10
/// occurrences and then every 10 000th, so a hostile guest cannot flood the
/// host's log by repeating a bad access.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n < 10 || n % 10_000 == 0 {
            log::warn!("{} (guest-caused, occurrence {})", format_args!($($arg)*), n + 1);
        }
    }};
}

pub mod acpi_pm;
pub mod boot_timer;
pub mod bus;
pub mod legacy;
pub mod memory;
pub mod mmds;
pub mod pci;
pub mod persist;
pub mod rate_limiter;
pub mod virtio;
pub mod vmgenid;

/// What a device may ask of the VM as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExitRequest {
    /// The guest asked to be switched off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 pulse of the reset line).
    Reset,
}

/// Receives a device's request to end the VM. The VMM implements it by waking its
/// event loop; tests implement it by recording the request.
pub trait ExitRequester: Send + Sync {
    /// Asks for the VM to end for `reason`. Must not block.
    fn request_exit(&self, reason: GuestExitRequest);
}

/// Something that raises a guest interrupt line (edge), e.g. through a KVM irqfd.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> std::io::Result<()>;
}

impl InterruptLine for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use std::sync::Mutex;

    /// Records every exit request, in order.
    #[derive(Default)]
    pub struct RecordingExit(pub Mutex<Vec<GuestExitRequest>>);

    impl ExitRequester for RecordingExit {
        fn request_exit(&self, reason: GuestExitRequest) {
            self.0.lock().unwrap().push(reason);
        }
    }

    /// An interrupt line that counts how often it was raised; as a device's
    /// virtio interrupt it also keeps what each raise was for.
    #[derive(Default)]
    pub struct CountingIrq(
        std::sync::atomic::AtomicUsize,
        Mutex<Vec<crate::virtio::InterruptCause>>,
    );

    impl CountingIrq {
        /// Times the line was raised so far.
        pub fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }

        /// What the device raised its interrupt for so far, in order.
        pub fn causes(&self) -> Vec<crate::virtio::InterruptCause> {
            self.1.lock().unwrap().clone()
        }
    }

    impl InterruptLine for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    impl crate::virtio::VirtioInterrupt for CountingIrq {
        fn trigger(&self, cause: crate::virtio::InterruptCause) -> std::io::Result<()> {
            self.1.lock().unwrap().push(cause);
            InterruptLine::trigger(self)
        }
    }

    use crate::memory::GuestMemoryMmap;

    use vm_memory::{Bytes, GuestAddress};

    /// Guest memory of 1 MiB with split rings for `n` queues of 16
    /// descriptors (queue i's at 0x1000 + i * 0x4000), for device tests:
    /// the test plays the driver.
    pub struct Rings {
        pub mem: GuestMemoryMmap,
        next_desc: Vec<u16>,
        avail_idx: Vec<u16>,
    }

    /// Size of each test queue.
    pub const RING_SIZE: u16 = 16;
    /// Where test buffers may go (past every ring).
    pub const BUFFERS: u64 = 0x40000;
    /// Size of the test guest memory.
    pub const RING_MEM: usize = 0x100000;

    impl Rings {
        pub fn new(n: usize) -> Self {
            Rings {
                mem: crate::memory::anonymous(&[(GuestAddress(0), RING_MEM)], false).unwrap(),
                next_desc: vec![0; n],
                avail_idx: vec![0; n],
            }
        }

        fn base(q: usize) -> u64 {
            0x1000 + q as u64 * 0x4000
        }

        /// Activates `dev` with ready queues of `max_size`, as its driver would.
        pub fn activate(&self, dev: &mut dyn crate::virtio::VirtioDevice, max_size: u16) {
            let irq = std::sync::Arc::new(CountingIrq::default());
            dev.activate(
                self.mem.clone(),
                self.queues(max_size),
                crate::virtio::Interrupt::new(irq),
            )
            .unwrap();
        }

        /// Ready queues, as a driver sets them up, for `activate`.
        pub fn queues(&self, max_size: u16) -> Vec<virtio_queue::Queue> {
            use virtio_queue::QueueT;
            (0..self.next_desc.len())
                .map(|i| {
                    let b = Self::base(i);
                    let mut q = virtio_queue::Queue::new(max_size).unwrap();
                    q.set_size(RING_SIZE);
                    q.set_desc_table_address(Some(b as u32), Some(0));
                    q.set_avail_ring_address(Some((b + 0x1000) as u32), Some(0));
                    q.set_used_ring_address(Some((b + 0x2000) as u32), Some(0));
                    q.set_ready(true);
                    q
                })
                .collect()
        }

        /// Makes a chain of (addr, len, device-writable) buffers available on `q`.
        pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
            let b = Self::base(q);
            let head = self.next_desc[q];
            for (i, &(addr, len, writable)) in descs.iter().enumerate() {
                let index = self.next_desc[q] % RING_SIZE;
                let next = (index + 1) % RING_SIZE;
                let flags =
                    if writable { 2u16 } else { 0 } | if i + 1 < descs.len() { 1 } else { 0 };
                let at = b + u64::from(index) * 16;
                self.mem.write_obj(addr, GuestAddress(at)).unwrap();
                self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
                self.next_desc[q] = self.next_desc[q].wrapping_add(1);
            }
            let avail = b + 0x1000;
            let slot = avail + 4 + u64::from(self.avail_idx[q] % RING_SIZE) * 2;
            self.mem
                .write_obj(head % RING_SIZE, GuestAddress(slot))
                .unwrap();
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
                .unwrap();
        }

        /// The used ring of `q`: (head, length) in order.
        pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
            let used = Self::base(q) + 0x2000;
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            (0..idx)
                .map(|i| {
                    let at = used + 4 + u64::from(i % RING_SIZE) * 8;
                    (
                        self.mem.read_obj(GuestAddress(at)).unwrap(),
                        self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                    )
                })
                .collect()
        }
    }
}
