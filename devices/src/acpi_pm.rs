//! The ACPI hardware-reduced sleep registers (ACPI 6.x §4.8.3.7): a one-byte sleep
//! control register and a one-byte sleep status register, on port I/O. Writing
//! SLP_EN with the soft-off sleep type announced in the DSDT's `\_S5` powers the VM off.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitRequester, GuestExitRequest};

/// Offset of the sleep control register; the status register follows it.
const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
/// SLP_EN: bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP: bits 2..=4.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// The sleep control/status register pair.
pub struct AcpiSleep {
    exit: Arc<dyn ExitRequester>,
    soft_off_type: u8,
}

impl AcpiSleep {
    /// Registers that power off through `exit` when the guest enters sleep type
    /// `soft_off_type` (the value the DSDT gives `\_S5`).
    pub fn new(exit: Arc<dyn ExitRequester>, soft_off_type: u8) -> Self {
        AcpiSleep {
            exit,
            soft_off_type,
        }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Never asleep, no wake event pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == self.soft_off_type {
                    self.exit.request_exit(GuestExitRequest::PowerOff);
                } else {
                    crate::guest_warn!("acpi: guest asked for unsupported sleep type {sleep_type}");
                }
            }
            SLEEP_CONTROL | SLEEP_STATUS => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::RecordingExit;

    fn device() -> (AcpiSleep, Arc<RecordingExit>) {
        let exit = Arc::new(RecordingExit::default());
        (AcpiSleep::new(exit.clone(), 5), exit)
    }

    #[test]
    fn slp_en_with_s5_type_powers_off() {
        let (mut dev, exit) = device();
        dev.write(SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        assert_eq!(*exit.0.lock().unwrap(), vec![GuestExitRequest::PowerOff]);
    }

    #[test]
    fn other_sleep_types_or_missing_slp_en_do_nothing() {
        let (mut dev, exit) = device();
        dev.write(SLEEP_CONTROL, &[5 << 2]);
        dev.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        dev.write(SLEEP_STATUS, &[0xff]);
        dev.write(SLEEP_CONTROL, &[]);
        assert!(exit.0.lock().unwrap().is_empty());
        let mut b = [0xffu8; 1];
        dev.read(SLEEP_STATUS, &mut b);
        assert_eq!(b, [0]);
    }
}
