//! An address bus (port I/O or MMIO) that routes accesses to devices by range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device that answers register accesses. `offset` is relative to the start of the
/// range the device was inserted at; `data.len()` is the access width (1, 2, 4 or 8).
pub trait BusDevice: Send {
    /// Fills `data` with the value read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The range is empty or wraps around the address space.
    #[error("The bus range at {base:#x} with length {len:#x} is empty or overflows.")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps one that is already taken.
    #[error("The bus range at {base:#x} with length {len:#x} overlaps another device.")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Maps non-overlapping address ranges to devices. Cloning is cheap and
/// every vCPU thread holds its own clone; all clones share one map, so a
/// device inserted or removed while the vCPUs run (hotplug) is seen by every
/// one of them from its next access.
#[derive(Clone, Default)]
pub struct Bus {
    devices: Arc<RwLock<BTreeMap<Range, SharedDevice>>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Range, SharedDevice>> {
        // The map is only changed whole (one insert or remove under the
        // lock): a poisoned lock still holds a consistent map.
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Places `device` at `base..base+len`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(Error::InvalidRange { base, len });
        }
        let last = base + (len - 1);
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let overlaps = devices
            .keys()
            .any(|r| base <= r.base + (r.len - 1) && r.base <= last);
        if overlaps {
            return Err(Error::Overlap { base, len });
        }
        devices.insert(Range { base, len }, device);
        Ok(())
    }

    /// Takes the device placed at exactly `base` off the bus.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let range = *devices.keys().find(|r| r.base == base)?;
        devices.remove(&range)
    }

    /// The device covering `addr..addr+size` and the offset of `addr` in it.
    /// The bus lock is released before the device is used.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let map = self.map();
        let (range, dev) = map
            .range(
                ..=Range {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        let offset = addr - range.base;
        // The whole access must fall inside the device's range.
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then(|| (offset, dev.clone()))
    }

    /// Routes a read to the device at `addr`. Returns false, leaving `data` as it was,
    /// when no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                // A device whose lock was poisoned by a panicking thread still answers:
                // its state is plain register data.
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write to the device at `addr`. Returns false when no device covers it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Echo {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_inside_range() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![7])));
    }

    #[test]
    fn access_outside_or_straddling_range_is_unhandled() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo::default())), 0x100, 4)
            .unwrap();
        let mut b = [0xaau8; 2];
        assert!(!bus.read(0xff, &mut b));
        assert!(!bus.read(0x104, &mut b));
        assert!(!bus.read(0x103, &mut b), "access straddles the end");
        assert_eq!(b, [0xaa, 0xaa]);
        assert!(!bus.write(u64::MAX, &[1]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo::default())), 0x100, 0x10)
            .unwrap();
        let d = || Arc::new(Mutex::new(Echo::default()));
        assert!(matches!(
            bus.insert(d(), 0x10f, 1),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0xf0, 0x11),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x0, 0),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(Error::InvalidRange { .. })
        ));
        bus.insert(d(), 0x110, 1).unwrap();
        bus.insert(d(), u64::MAX, 1).unwrap();
    }

    #[test]
    fn every_clone_sees_a_device_inserted_or_removed_later() {
        let bus = Bus::new();
        // A vCPU's clone, taken before the device exists (hotplug).
        let vcpu = bus.clone();
        let mut b = [0u8; 1];
        assert!(!vcpu.read(0x1003, &mut b));
        let dev = Arc::new(Mutex::new(Echo::default()));
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        assert!(vcpu.read(0x1003, &mut b));
        assert_eq!(b[0], 3);
        assert!(vcpu.write(0x1001, &[9]));
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![9])));
        assert!(bus.remove(0x1001).is_none(), "only the exact base removes");
        assert!(bus.remove(0x1000).is_some());
        assert!(!vcpu.read(0x1003, &mut b), "gone for every clone");
        assert!(bus.remove(0x1000).is_none());
    }
}
