//! PCI segment 0, bus 0: the host bridge at 00:00.0 and the functions
//! plugged in, reached through configuration mechanism #1 (the address
//! register at port 0xcf8, data at 0xcfc) and through ECAM (a memory window
//! with each function's 4 KiB of configuration space). Functions are placed
//! by device/function number (devfn, `device << 3 | function`): function 0
//! of devices 1-31 first, then function 1 of each, and so on, so up to 248
//! functions fit on the bus (a function that is not there reads as all
//! ones).

use std::sync::{Arc, Mutex};

use super::config::{Identity, PciConfig};
use crate::bus::BusDevice;

/// Devices on the bus (device numbers 0-31; 0 is the host bridge).
pub const SLOTS: usize = 32;
/// Functions of one device.
pub const FUNCTIONS: usize = 8;
/// Functions the bus can take besides the host bridge (devices 1-31).
pub const MAX_FUNCTIONS: usize = (SLOTS - 1) * FUNCTIONS;
/// Bytes of ECAM configuration space per function.
pub const ECAM_FUNCTION_SIZE: u64 = 4096;
/// Bytes of ECAM space for bus 0 (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// A function on the bus: its configuration space as the guest reads and
/// writes it.
pub trait PciFunction: Send {
    /// Reads configuration space at `offset` (0-4095).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes configuration space at `offset` (0-4095).
    fn write_config(&mut self, offset: u64, data: &[u8]);
}

/// A function on the bus, shared with the VMM.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// A function that is only its configuration space (the host bridge).
impl PciFunction for PciConfig {
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.read(offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.write(offset, data);
    }
}

/// Errors plugging functions in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Every function of every device is taken.
    #[error("All {MAX_FUNCTIONS} PCI functions of bus 0 are taken.")]
    Full,
    /// The function (devfn) is taken or does not exist.
    #[error("PCI function 00:{:02x}.{} is taken or cannot be used.", .0 >> 3, .0 & 7)]
    Slot(usize),
}

/// Bus 0.
pub struct PciRoot {
    /// By devfn.
    slots: Vec<Option<SharedFunction>>,
    /// Configuration mechanism #1's address register.
    address: u32,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with only the host bridge (vendor 0x8086 device 0x0d57, class
    /// 06 00 00: host bridge).
    pub fn new() -> Self {
        let bridge = PciConfig::new(
            Identity {
                vendor: 0x8086,
                device: 0x0d57,
                revision: 0,
                class: (0x06, 0x00, 0x00),
                subsystem_vendor: 0,
                subsystem: 0,
            },
            false,
        );
        let mut slots: Vec<Option<SharedFunction>> = vec![None; SLOTS * FUNCTIONS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        PciRoot { slots, address: 0 }
    }

    /// Plugs `f` into the first free function (function 0 of each device
    /// first); returns its devfn.
    pub fn add(&mut self, f: SharedFunction) -> Result<usize, Error> {
        let devfn = (0..FUNCTIONS)
            .flat_map(|func| (1..SLOTS).map(move |dev| dev * FUNCTIONS + func))
            .find(|&devfn| self.slots[devfn].is_none())
            .ok_or(Error::Full)?;
        self.slots[devfn] = Some(f);
        Ok(devfn)
    }

    /// Plugs `f` in at `devfn` (a restored device's).
    pub fn add_at(&mut self, devfn: usize, f: SharedFunction) -> Result<(), Error> {
        match self.slots.get_mut(devfn) {
            Some(s @ None) if devfn >= FUNCTIONS => {
                *s = Some(f);
                Ok(())
            }
            _ => Err(Error::Slot(devfn)),
        }
    }

    /// Unplugs the function at `devfn` (never the host bridge's device).
    pub fn remove(&mut self, devfn: usize) -> Option<SharedFunction> {
        if devfn < FUNCTIONS {
            return None;
        }
        self.slots.get_mut(devfn)?.take()
    }

    fn function(&self, device: usize, function: usize) -> Option<&SharedFunction> {
        if function >= FUNCTIONS {
            return None;
        }
        self.slots.get(device * FUNCTIONS + function)?.as_ref()
    }

    /// Reads function `(device, function)`'s configuration space; an empty
    /// slot reads as all ones.
    pub fn read(&self, device: usize, function: usize, offset: u64, data: &mut [u8]) {
        match self.function(device, function) {
            Some(f) => f
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Writes function `(device, function)`'s configuration space; writes to
    /// an empty slot go nowhere.
    pub fn write(&self, device: usize, function: usize, offset: u64, data: &[u8]) {
        if let Some(f) = self.function(device, function) {
            f.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_config(offset, data);
        }
    }

    /// Mechanism #1: the function and dword the address register selects,
    /// if enabled and on bus 0.
    fn selected(&self) -> Option<(usize, usize, u64)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        if !enabled || bus != 0 {
            return None;
        }
        let device = ((a >> 11) & 0x1f) as usize;
        let function = ((a >> 8) & 0x7) as usize;
        // Bits 8-11 above: extended registers (AMD's extension) are not offered.
        let reg = u64::from(a & 0xfc);
        Some((device, function, reg))
    }
}

/// Configuration mechanism #1 on the port bus: 8 ports from 0xcf8 (the
/// address register at 0-3, data at 4-7).
pub struct PciConfigIo(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let root = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&root.address.to_le_bytes()),
            4..=7 if offset - 4 + data.len() as u64 <= 4 => match root.selected() {
                Some((dev, func, reg)) => root.read(dev, func, reg + (offset - 4), data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut root = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                root.address = u32::from_le_bytes(b);
            }
            4..=7 if offset - 4 + data.len() as u64 <= 4 => {
                if let Some((dev, func, reg)) = root.selected() {
                    root.write(dev, func, reg + (offset - 4), data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM for bus 0 on the MMIO bus: [`ECAM_BUS_SIZE`] bytes, function
/// `(d, f)`'s space at `d << 15 | f << 12`.
pub struct PciEcam(pub Arc<Mutex<PciRoot>>);

impl PciEcam {
    fn decode(offset: u64, len: usize) -> Option<(usize, usize, u64)> {
        let reg = offset & (ECAM_FUNCTION_SIZE - 1);
        // An access must stay inside one function's space.
        if reg + len as u64 > ECAM_FUNCTION_SIZE || offset >= ECAM_BUS_SIZE {
            return None;
        }
        Some((
            ((offset >> 15) & 0x1f) as usize,
            ((offset >> 12) & 0x7) as usize,
            reg,
        ))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let root = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match Self::decode(offset, data.len()) {
            Some((dev, func, reg)) => root.read(dev, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let root = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((dev, func, reg)) = Self::decode(offset, data.len()) {
            root.write(dev, func, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function with a 4 KiB BAR.
    fn plain() -> SharedFunction {
        let mut c = PciConfig::new(
            Identity {
                vendor: 0x1af4,
                device: 0x1041,
                revision: 1,
                class: (0x02, 0x00, 0x00),
                subsystem_vendor: 0x1af4,
                subsystem: 0x40,
            },
            true,
        );
        c.add_memory_bar(0, 0x1000, false).unwrap();
        Arc::new(Mutex::new(c))
    }

    fn cf8(dev: u32, func: u32, reg: u32) -> [u8; 4] {
        (0x8000_0000 | dev << 11 | func << 8 | reg).to_le_bytes()
    }

    #[test]
    fn mechanism_one_reads_the_bridge_and_a_plugged_function() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let devfn = root.lock().unwrap().add(plain()).unwrap();
        assert_eq!(devfn, 1 << 3, "function 0 of device 1");
        let mut io = PciConfigIo(root.clone());
        let mut d = [0u8; 4];
        io.write(0, &cf8(0, 0, 0));
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086, "host bridge");
        io.write(0, &cf8(1, 0, 0));
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
        // A byte read at an offset in the data window.
        let mut b = [0u8; 1];
        io.write(0, &cf8(1, 0, 8));
        io.read(7, &mut b);
        assert_eq!(b[0], 0x02, "class byte");
        // BAR sizing through the ports.
        io.write(0, &cf8(1, 0, 0x10));
        io.write(4, &[0xff; 4]);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_f000);
        // The address register reads back; empty slots, other functions,
        // other buses and a disabled address read all ones.
        io.read(0, &mut d);
        assert_eq!(d, cf8(1, 0, 0x10));
        for addr in [
            cf8(2, 0, 0),
            cf8(1, 1, 0),
            0x0000_0800u32.to_le_bytes(),
            (0x8001_0000u32).to_le_bytes(),
        ] {
            io.write(0, &addr);
            io.read(4, &mut d);
            assert_eq!(d, [0xff; 4], "{addr:?}");
        }
    }

    #[test]
    fn ecam_reaches_the_same_spaces_and_contains_odd_accesses() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        root.lock().unwrap().add(plain()).unwrap();
        let mut ecam = PciEcam(root.clone());
        let mut d = [0u8; 4];
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
        ecam.write((1 << 15) + 0x3c, &[9]);
        let mut b = [0u8; 1];
        ecam.read((1 << 15) + 0x3c, &mut b);
        assert_eq!(b[0], 9);
        // Extended space of a conventional function reads zero (no extended capabilities).
        ecam.read((1 << 15) + 0x100, &mut d);
        assert_eq!(d, [0; 4]);
        // Across a function boundary or past the bus: all ones, writes dropped.
        let mut q = [0u8; 8];
        ecam.read((1 << 15) + 4092, &mut q);
        assert_eq!(q, [0xff; 8]);
        ecam.read(ECAM_BUS_SIZE, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.write(u64::MAX - 1, &[0; 4]);
    }

    #[test]
    fn functions_fill_device_by_device_then_function_by_function() {
        let mut root = PciRoot::new();
        for func in 0..FUNCTIONS {
            for dev in 1..SLOTS {
                assert_eq!(root.add(plain()), Ok(dev << 3 | func));
            }
        }
        assert_eq!(root.add(plain()), Err(Error::Full));
        assert!(root.remove(0).is_none(), "the host bridge cannot go");
        assert!(root.remove(3).is_none(), "nor its device's other functions");
        assert!(root.remove(5 << 3).is_some());
        assert!(root.remove(5 << 3).is_none());
        assert_eq!(root.add_at(0, plain()), Err(Error::Slot(0)));
        assert_eq!(root.add_at(7, plain()), Err(Error::Slot(7)));
        assert_eq!(root.add_at(256, plain()), Err(Error::Slot(256)));
        root.add_at(5 << 3, plain()).unwrap();
        assert_eq!(root.add_at(5 << 3, plain()), Err(Error::Slot(5 << 3)));
        // Function 2 of device 9 answers on both mechanisms.
        let root = Arc::new(Mutex::new(PciRoot::new()));
        root.lock().unwrap().add_at(9 << 3 | 2, plain()).unwrap();
        let mut io = PciConfigIo(root.clone());
        let mut d = [0u8; 4];
        io.write(0, &cf8(9, 2, 0));
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
        let mut ecam = PciEcam(root);
        ecam.read(9 << 15 | 2 << 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
    }
}
