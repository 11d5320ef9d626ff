//! The boot timer: a guest that has finished booting writes 123 to it, and the
//! VMM logs how long that took since the VMM started, in wall-clock and CPU
//! time (`--boot-timer`, as in Firecracker).

use std::time::Instant;

use crate::bus::BusDevice;

/// The value a guest writes when it has booted.
pub const BOOT_COMPLETE: u8 = 123;

/// Logs the boot time on the guest's signal.
pub struct BootTimer {
    started: Instant,
}

impl BootTimer {
    /// A timer counting from `started`.
    pub fn new(started: Instant) -> Self {
        BootTimer { started }
    }
}

/// CPU time this process has used, in microseconds.
fn process_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_COMPLETE) {
            let us = self.started.elapsed().as_micros() as u64;
            let cpu = process_cpu_us();
            log::info!(
                "Guest-boot-time = {us:>6} us {} ms, {cpu:>6} CPU us {} CPU ms",
                us / 1000,
                cpu / 1000
            );
        }
    }
}
