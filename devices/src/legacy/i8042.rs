//! A minimal i8042 keyboard controller: enough for the Linux reboot path
//! (`reboot=k` pulses the CPU reset line with command 0xFE) and for drivers that
//! probe the controller. No keyboard is attached.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitRequester, GuestExitRequest};

/// Offset of the data port (0x60) and of the status/command port (0x64) from the
/// device's base at 0x60.
const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;

/// The controller at ports 0x60..=0x64.
pub struct I8042 {
    exit: Arc<dyn ExitRequester>,
    status: u8,
    config: u8,
    output: Option<u8>,
    /// The command whose parameter byte the next data-port write carries.
    awaiting_data_for: Option<u8>,
}

impl I8042 {
    /// A controller whose reset line ends the VM through `exit`.
    pub fn new(exit: Arc<dyn ExitRequester>) -> Self {
        I8042 {
            exit,
            status: STATUS_SYSTEM_FLAG,
            // Keyboard interrupt on, translation on, as firmware leaves it.
            config: 0x45,
            output: None,
            awaiting_data_for: None,
        }
    }

    fn push_output(&mut self, byte: u8) {
        self.output = Some(byte);
    }

    fn status_byte(&self) -> u8 {
        let full = if self.output.is_some() {
            STATUS_OUTPUT_FULL
        } else {
            0
        };
        self.status | full
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CONFIG => self.push_output(self.config),
            CMD_WRITE_CONFIG | CMD_WRITE_OUTPUT_PORT => self.awaiting_data_for = Some(cmd),
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push_output(0),
            CMD_READ_OUTPUT_PORT => self.push_output(0x01),
            CMD_DISABLE_KBD | CMD_ENABLE_KBD | CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_PULSE_RESET => self.exit.request_exit(GuestExitRequest::Reset),
            other => log::debug!("i8042: ignoring command {other:#04x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.awaiting_data_for.take() {
            Some(CMD_WRITE_CONFIG) => self.config = byte,
            // Bit 0 of the output port is the CPU reset line, active low.
            Some(CMD_WRITE_OUTPUT_PORT) if byte & 1 == 0 => {
                self.exit.request_exit(GuestExitRequest::Reset)
            }
            Some(_) => {}
            // A byte for the (absent) keyboard: answer "resend" so drivers give up.
            None => self.push_output(0xfe),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = match offset {
            DATA => self.output.take().unwrap_or(0),
            COMMAND => self.status_byte(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA => self.data(byte),
            COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::RecordingExit;

    fn device() -> (I8042, Arc<RecordingExit>) {
        let exit = Arc::new(RecordingExit::default());
        (I8042::new(exit.clone()), exit)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_command_requests_a_reset() {
        let (mut dev, exit) = device();
        // Linux's kb_wait() polls for an empty input buffer first.
        assert_eq!(read(&mut dev, COMMAND) & 0x02, 0);
        dev.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(*exit.0.lock().unwrap(), vec![GuestExitRequest::Reset]);
    }

    #[test]
    fn output_port_write_with_reset_bit_low_requests_a_reset() {
        let (mut dev, exit) = device();
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA, &[0xfe]);
        assert_eq!(*exit.0.lock().unwrap(), vec![GuestExitRequest::Reset]);
    }

    #[test]
    fn self_test_and_config_round_trip() {
        let (mut dev, exit) = device();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_OK);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND, &[CMD_WRITE_CONFIG]);
        dev.write(DATA, &[0x12]);
        dev.write(COMMAND, &[CMD_READ_CONFIG]);
        assert_eq!(read(&mut dev, DATA), 0x12);
        assert!(exit.0.lock().unwrap().is_empty());
    }

    #[test]
    fn unknown_commands_and_offsets_do_nothing() {
        let (mut dev, exit) = device();
        dev.write(COMMAND, &[0x00]);
        dev.write(2, &[CMD_PULSE_RESET]);
        dev.write(COMMAND, &[]);
        assert_eq!(read(&mut dev, 2), 0xff);
        assert!(exit.0.lock().unwrap().is_empty());
    }
}
