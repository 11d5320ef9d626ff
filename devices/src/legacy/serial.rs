//! The COM1 8250 UART, built on vm-superio's register model.
//!
//! Output goes to any writer (the VMM's stdout). Input from the host is queued here
//! and fed into the UART's 64-byte receive FIFO as the guest drains it, so a paste
//! larger than the FIFO is not lost.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::InterruptLine;

/// Host input held back while the guest's FIFO is full; beyond this, input is dropped
/// and counted.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Adapts an [`InterruptLine`] to vm-superio's trigger.
#[derive(Clone)]
pub struct IrqTrigger(pub Arc<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// An 8250 UART on the port-I/O bus (eight registers).
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
    dropped_input: u64,
    output_failed: bool,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
            pending: VecDeque::new(),
            dropped_input: 0,
            output_failed: false,
        }
    }

    /// Queues host input for the guest.
    pub fn queue_input(&mut self, input: &[u8]) {
        self.pending.extend(input);
        self.feed_fifo();
        if self.pending.len() > MAX_PENDING_INPUT {
            self.dropped_input += (self.pending.len() - MAX_PENDING_INPUT) as u64;
            self.pending.truncate(MAX_PENDING_INPUT);
            crate::guest_warn!(
                "serial: guest is not reading its console; {} input bytes dropped so far",
                self.dropped_input
            );
        }
    }

    /// Input bytes dropped because the guest did not read them.
    pub fn dropped_input(&self) -> u64 {
        self.dropped_input
    }

    fn feed_fifo(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (front, _) = self.pending.as_slices();
            let n = front.len().min(self.uart.fifo_capacity());
            match self.uart.enqueue_raw_bytes(&front[..n]) {
                Ok(done) => {
                    self.pending.drain(..done);
                }
                Err(e) => {
                    log::warn!("serial: cannot deliver input to the guest: {e:?}");
                    break;
                }
            }
        }
    }
}

/// The UART's saved state: its registers, its receive FIFO, and the host
/// input still waiting to enter it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// The receive FIFO.
    pub in_buffer: Vec<u8>,
    /// Host input not yet in the FIFO.
    pub pending: Vec<u8>,
}

impl crate::persist::Persist for SerialDevice {
    type State = SerialDeviceState;
    type Error = std::convert::Infallible;
    type Resources = (Arc<dyn InterruptLine>, Box<dyn Write + Send>);

    fn save(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            pending: self.pending.iter().copied().collect(),
        }
    }

    fn restore(
        (irq, out): Self::Resources,
        state: &SerialDeviceState,
    ) -> Result<Self, Self::Error> {
        let uart_state = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            // The UART's FIFO holds 64 bytes; a state with more is not one
            // this device saved.
            in_buffer: state.in_buffer.iter().copied().take(64).collect(),
        };
        let trigger = IrqTrigger(irq.clone());
        // Cannot fail with the FIFO bounded above; should vm-superio still
        // refuse the state, the UART starts from its reset state.
        let uart = Serial::from_state(&uart_state, trigger, NoEvents, out).unwrap_or_else(|e| {
            log::warn!("serial: saved state refused ({e:?}); the UART starts reset");
            Serial::new(IrqTrigger(irq), Box::new(std::io::sink()))
        });
        let mut pending: VecDeque<u8> = state.pending.iter().copied().collect();
        pending.truncate(MAX_PENDING_INPUT);
        Ok(SerialDevice {
            uart,
            pending,
            dropped_input: 0,
            output_failed: false,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The UART has byte-wide registers; wider accesses read the first one.
        if offset < 8 {
            data[0] = self.uart.read(offset as u8);
            self.feed_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 8 && !data.is_empty() {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                // A closed console (e.g. `vmm | head`) fails every byte: say it once.
                if !self.output_failed {
                    log::warn!("serial: console output failed, further output is lost: {e:?}");
                    self.output_failed = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::CountingIrq;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn device() -> (SerialDevice, SharedBuf, Arc<CountingIrq>) {
        let out = SharedBuf::default();
        let irq = Arc::new(CountingIrq::default());
        (
            SerialDevice::new(irq.clone(), Box::new(out.clone())),
            out,
            irq,
        )
    }

    #[test]
    fn guest_writes_reach_the_host_writer() {
        let (mut dev, out, _) = device();
        for b in b"hi\n" {
            dev.write(THR, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_larger_than_fifo_is_delivered_in_order() {
        let (mut dev, _, irq) = device();
        dev.write(IER, &[1]); // receive-data interrupt on
        let input: Vec<u8> = (0..200u8).collect();
        dev.queue_input(&input);
        assert!(irq.count() > 0);
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            dev.read(LSR, &mut b);
            if b[0] & LSR_DATA_READY == 0 {
                break;
            }
            dev.read(THR, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(dev.dropped_input(), 0);
    }

    #[test]
    fn input_beyond_the_limit_is_counted_as_dropped() {
        let (mut dev, _, _) = device();
        dev.queue_input(&vec![b'x'; MAX_PENDING_INPUT + 100]);
        // The FIFO took 64 bytes, the pending queue is full, the rest is dropped.
        assert_eq!(dev.dropped_input(), 100 - 64);
    }

    struct BrokenPipe;
    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn closed_output_does_not_stop_the_device() {
        let irq = Arc::new(CountingIrq::default());
        let mut dev = SerialDevice::new(irq, Box::new(BrokenPipe));
        for _ in 0..10 {
            dev.write(THR, b"x");
        }
        assert!(dev.output_failed);
        let mut b = [0u8];
        dev.read(LSR, &mut b);
        assert_ne!(b[0] & 0x20, 0, "transmitter still reports empty");
    }

    #[test]
    fn out_of_range_offsets_are_ignored() {
        let (mut dev, out, _) = device();
        dev.write(8, b"x");
        let mut b = [0xffu8; 2];
        dev.read(9, &mut b);
        assert_eq!(b, [0, 0]);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn state_round_trips_with_registers_fifo_and_pending_input() {
        use crate::persist::Persist;
        let (mut dev, _out, _) = device();
        dev.write(IER, &[0x01]);
        dev.write(7, &[0x5a]); // scratch
        let big: Vec<u8> = (0..100u8).collect();
        dev.queue_input(&big);
        let saved = dev.save();
        assert_eq!(saved.pending.len() + saved.in_buffer.len(), 100);
        let out = SharedBuf::default();
        let Ok(mut restored) = SerialDevice::restore(
            (Arc::new(CountingIrq::default()), Box::new(out.clone())),
            &saved,
        );
        assert_eq!(restored.save(), saved);
        // Every queued byte still arrives, in order, then output goes to the new writer.
        let mut got = Vec::new();
        for _ in 0..200 {
            let mut lsr = [0u8];
            restored.read(LSR, &mut lsr);
            if lsr[0] & LSR_DATA_READY == 0 {
                break;
            }
            let mut b = [0u8];
            restored.read(THR, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, big);
        restored.write(THR, b"k");
        assert_eq!(*out.0.lock().unwrap(), b"k");
    }
}
