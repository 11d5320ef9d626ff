//! A minimal i8042 keyboard controller: enough for the Linux reboot path
//! (`reboot=k` pulses the CPU reset line with command 0xFE), for drivers that
//! probe the controller, and for a keyboard whose only keys are the ones the
//! VMM presses: Ctrl-Alt-Del ([`I8042::send_ctrl_alt_del`]), which a Linux
//! guest with a VT keyboard turns into a reboot.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitRequester, GuestExitRequest, InterruptLine};

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

/// Configuration byte: keyboard interrupt enabled.
const CONFIG_KBD_INTERRUPT: u8 = 0x01;
/// Configuration byte: scancodes translated to set 1.
const CONFIG_TRANSLATE: u8 = 0x40;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_GET_ID: u8 = 0xf2;

/// Ctrl, Alt and Delete pressed, then released, in scancode set 1 (translated).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The same in scancode set 2 (untranslated).
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
/// Most bytes the output buffer holds; more keyboard input is dropped.
const MAX_OUTPUT: usize = 64;

/// The controller at ports 0x60..=0x64.
pub struct I8042 {
    exit: Arc<dyn ExitRequester>,
    kbd_irq: Arc<dyn InterruptLine>,
    status: u8,
    config: u8,
    output: VecDeque<u8>,
    /// The command whose parameter byte the next data-port write carries.
    awaiting_data_for: Option<u8>,
}

impl I8042 {
    /// A controller whose reset line ends the VM through `exit` and whose
    /// keyboard raises `kbd_irq` (IRQ 1).
    pub fn new(exit: Arc<dyn ExitRequester>, kbd_irq: Arc<dyn InterruptLine>) -> Self {
        I8042 {
            exit,
            kbd_irq,
            status: STATUS_SYSTEM_FLAG,
            // Keyboard interrupt on, translation on, as firmware leaves it.
            config: 0x45,
            output: VecDeque::new(),
            awaiting_data_for: None,
        }
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard.
    pub fn send_ctrl_alt_del(&mut self) {
        if self.config & CONFIG_TRANSLATE != 0 {
            self.push_keyboard(&CTRL_ALT_DEL_SET1);
        } else {
            self.push_keyboard(&CTRL_ALT_DEL_SET2);
        }
    }

    /// A controller answer: no interrupt (drivers poll for it).
    fn push_output(&mut self, byte: u8) {
        self.output.push_back(byte);
    }

    /// Keyboard bytes: raise IRQ 1 when they become readable.
    fn push_keyboard(&mut self, bytes: &[u8]) {
        let was_empty = self.output.is_empty();
        for &b in bytes {
            if self.output.len() < MAX_OUTPUT {
                self.output.push_back(b);
            }
        }
        if was_empty {
            self.raise_kbd_irq();
        }
    }

    fn raise_kbd_irq(&self) {
        if self.config & CONFIG_KBD_INTERRUPT != 0 && !self.output.is_empty() {
            if let Err(e) = self.kbd_irq.trigger() {
                log::warn!("i8042: cannot raise the keyboard interrupt: {e}");
            }
        }
    }

    fn status_byte(&self) -> u8 {
        let full = if !self.output.is_empty() {
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
            // A command (or its parameter) for the keyboard: acknowledged.
            None => match byte {
                KBD_RESET => self.push_keyboard(&[KBD_ACK, KBD_SELF_TEST_PASSED]),
                KBD_GET_ID if self.config & CONFIG_TRANSLATE != 0 => {
                    self.push_keyboard(&[KBD_ACK, 0xab, 0x41])
                }
                KBD_GET_ID => self.push_keyboard(&[KBD_ACK, 0xab, 0x83]),
                _ => self.push_keyboard(&[KBD_ACK]),
            },
        }
    }
}

/// The i8042's saved state: its registers and the bytes waiting to be read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Status register (without the output-full bit, which `output` implies).
    pub status: u8,
    /// Controller configuration byte.
    pub config: u8,
    /// Bytes in the output buffer, oldest first.
    pub output: Vec<u8>,
    /// The command whose parameter byte is expected next.
    pub awaiting_data_for: Option<u8>,
}

impl crate::persist::Persist for I8042 {
    type State = I8042State;
    type Error = std::convert::Infallible;
    type Resources = (Arc<dyn ExitRequester>, Arc<dyn InterruptLine>);

    fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            config: self.config,
            output: self.output.iter().copied().collect(),
            awaiting_data_for: self.awaiting_data_for,
        }
    }

    fn restore((exit, kbd_irq): Self::Resources, state: &I8042State) -> Result<Self, Self::Error> {
        let mut dev = I8042::new(exit, kbd_irq);
        dev.status = state.status & !STATUS_OUTPUT_FULL;
        dev.config = state.config;
        // A hostile snapshot cannot make the buffer larger than the device's.
        dev.output = state.output.iter().copied().take(MAX_OUTPUT).collect();
        dev.awaiting_data_for = state.awaiting_data_for;
        Ok(dev)
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = match offset {
            DATA => {
                let byte = self.output.pop_front().unwrap_or(0);
                // The next byte, if any, interrupts again.
                self.raise_kbd_irq();
                byte
            }
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
    use crate::test_util::{CountingIrq, RecordingExit};

    fn device() -> (I8042, Arc<RecordingExit>) {
        let exit = Arc::new(RecordingExit::default());
        (
            I8042::new(exit.clone(), Arc::new(CountingIrq::default())),
            exit,
        )
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

    #[test]
    fn ctrl_alt_del_is_eight_translated_scancodes_with_interrupts() {
        let exit = Arc::new(RecordingExit::default());
        let irq = Arc::new(CountingIrq::default());
        let mut dev = I8042::new(exit, irq.clone());
        dev.send_ctrl_alt_del();
        assert_eq!(irq.count(), 1);
        let mut got = Vec::new();
        while read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL != 0 {
            got.push(read(&mut dev, DATA));
        }
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        // One interrupt per byte: the first on arrival, one after each read but the last.
        assert_eq!(irq.count(), CTRL_ALT_DEL_SET1.len());
    }

    #[test]
    fn keyboard_commands_are_acknowledged_and_untranslated_mode_gets_set_2() {
        let (mut dev, _) = device();
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!(read(&mut dev, DATA), KBD_ACK);
        assert_eq!(read(&mut dev, DATA), KBD_SELF_TEST_PASSED);
        dev.write(COMMAND, &[CMD_WRITE_CONFIG]);
        dev.write(DATA, &[CONFIG_KBD_INTERRUPT]);
        dev.send_ctrl_alt_del();
        let got: Vec<u8> = (0..CTRL_ALT_DEL_SET2.len())
            .map(|_| read(&mut dev, DATA))
            .collect();
        assert_eq!(got, CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn state_round_trips_with_pending_keys_and_a_half_sent_command() {
        use crate::persist::Persist;
        let (mut dev, exit) = device();
        dev.send_ctrl_alt_del();
        let _ = read(&mut dev, DATA);
        dev.write(COMMAND, &[CMD_WRITE_CONFIG]);
        let saved = dev.save();
        let Ok(mut restored) = I8042::restore((exit, Arc::new(CountingIrq::default())), &saved);
        assert_eq!(restored.save(), saved);
        // The restored controller continues where the saved one was.
        restored.write(DATA, &[0x41]);
        assert_eq!(restored.config, 0x41);
        let rest: Vec<u8> = (0..7).map(|_| read(&mut restored, DATA)).collect();
        assert_eq!(rest, CTRL_ALT_DEL_SET1[1..]);
        assert_eq!(read(&mut restored, COMMAND) & STATUS_OUTPUT_FULL, 0);
    }
}
