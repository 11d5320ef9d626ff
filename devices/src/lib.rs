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
pub mod mmds;
pub mod persist;
pub mod rate_limiter;
pub mod virtio;

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

    /// An interrupt line that counts how often it was raised.
    #[derive(Default)]
    pub struct CountingIrq(std::sync::atomic::AtomicUsize);

    impl CountingIrq {
        /// Times the line was raised so far.
        pub fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl InterruptLine for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }
}
