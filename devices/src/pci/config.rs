//! A PCI function's configuration space (PCI Local Bus 3.0 §6.1, type 0
//! header): identification, command, BARs with the sizing protocol,
//! interrupt line, and a capability list. Every register has a mask of the
//! bits a guest may write; all other bits keep their value, so no guest
//! write can change what the function is.

/// Configuration space size of a conventional function (bytes).
pub const CONFIG_SIZE: usize = 256;
const REGS: usize = CONFIG_SIZE / 4;

/// Register (dword) indices of the type 0 header.
const REG_ID: usize = 0;
const REG_COMMAND_STATUS: usize = 1;
const REG_CLASS: usize = 2;
const REG_HEADER: usize = 3;
const REG_BAR0: usize = 4;
const REG_SUBSYSTEM: usize = 11;
const REG_CAP_POINTER: usize = 13;
const REG_INTERRUPT: usize = 15;

/// Command register bits a guest may set: I/O space, memory space, bus
/// master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;
/// Command bit: memory space decoding on.
pub const COMMAND_MEMORY: u16 = 0x2;
/// Status bit: the function has a capability list.
const STATUS_CAPABILITIES: u32 = 0x10 << 16;
/// First byte where capabilities may go (after the header).
const CAPS_START: usize = 0x40;

/// Number of base address registers of a type 0 header.
pub const BARS: usize = 6;

/// Errors in laying out a function (the VMM's mistakes, not the guest's).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A BAR index is out of range or taken.
    #[error("BAR {0} is out of range or already in use.")]
    Bar(usize),
    /// A BAR size is not a power of two of at least 16 bytes.
    #[error("A BAR of {0:#x} bytes is not a power of two of at least 16.")]
    BarSize(u64),
    /// The capabilities do not fit in the configuration space.
    #[error("The capability of {0} bytes does not fit in the configuration space.")]
    CapabilityFull(usize),
}

/// What a function is: IDs and class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code, subclass and programming interface.
    pub class: (u8, u8, u8),
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A BAR as laid out by the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bar {
    size: u64,
    /// Occupies this register and the next (a 64-bit memory BAR).
    is_64: bool,
}

/// One function's configuration space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciConfig {
    regs: [u32; REGS],
    writable: [u32; REGS],
    bars: [Option<Bar>; BARS],
    /// Where the next capability goes, and the last one's offset (to chain).
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfig {
    /// A function with `id`, no BARs and no capabilities; interrupt pin
    /// INTA# when `intx`.
    pub fn new(id: Identity, intx: bool) -> Self {
        let mut regs = [0u32; REGS];
        let mut writable = [0u32; REGS];
        regs[REG_ID] = u32::from(id.vendor) | u32::from(id.device) << 16;
        regs[REG_CLASS] = u32::from(id.revision)
            | u32::from(id.class.2) << 8
            | u32::from(id.class.1) << 16
            | u32::from(id.class.0) << 24;
        // Header type 0, single function.
        regs[REG_HEADER] = 0;
        regs[REG_SUBSYSTEM] = u32::from(id.subsystem_vendor) | u32::from(id.subsystem) << 16;
        regs[REG_INTERRUPT] = if intx { 1 << 8 } else { 0 };
        writable[REG_COMMAND_STATUS] = COMMAND_WRITABLE;
        // Cache line size and latency timer are plain storage.
        writable[REG_HEADER] = 0x0000_ffff;
        writable[REG_INTERRUPT] = 0xff;
        PciConfig {
            regs,
            writable,
            bars: [None; BARS],
            next_cap: CAPS_START,
            last_cap: None,
        }
    }

    /// Declares memory BAR `index` of `size` bytes (64-bit: it also takes
    /// `index + 1`). The guest programs its address; sizing works as the
    /// specification says (write all ones, read back the size mask).
    pub fn add_memory_bar(&mut self, index: usize, size: u64, is_64: bool) -> Result<(), Error> {
        let last = index + usize::from(is_64);
        if last >= BARS || self.bars[index].is_some() || self.taken_as_upper(index) {
            return Err(Error::Bar(index));
        }
        if is_64 && self.bars[last].is_some() {
            return Err(Error::Bar(last));
        }
        if size < 16 || !size.is_power_of_two() || (!is_64 && size > 1 << 31) {
            return Err(Error::BarSize(size));
        }
        let mask = !(size - 1);
        // Bits 0-3 are flags: memory space, type (bit 2: 64-bit), not prefetchable.
        self.regs[REG_BAR0 + index] = if is_64 { 0b100 } else { 0 };
        self.writable[REG_BAR0 + index] = (mask as u32) & !0xf;
        if is_64 {
            self.writable[REG_BAR0 + last] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(Bar { size, is_64 });
        Ok(())
    }

    fn taken_as_upper(&self, index: usize) -> bool {
        index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64)
    }

    /// The guest-physical address BAR `index` is programmed at (0 until the
    /// guest programs it), and its size; None for a BAR that is not there.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bars.get(index).copied().flatten()?;
        let low = u64::from(self.regs[REG_BAR0 + index] & !0xf);
        let high = if bar.is_64 {
            u64::from(self.regs[REG_BAR0 + index + 1]) << 32
        } else {
            0
        };
        Some((high | low, bar.size))
    }

    /// Sets the header type's multi-function bit: the guest then looks for
    /// functions 1-7 of this function's device too.
    pub fn set_multifunction(&mut self) {
        self.regs[REG_HEADER] |= 0x80 << 16;
    }

    /// Places BAR `index` at `addr`, as firmware does before the guest
    /// runs: only the address bits change (an address not aligned to the
    /// BAR's size, or above 4 GiB for a 32-bit BAR, is refused).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), Error> {
        let bar = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .ok_or(Error::Bar(index))?;
        if !addr.is_multiple_of(bar.size) || (!bar.is_64 && addr > u64::from(u32::MAX)) {
            return Err(Error::Bar(index));
        }
        let reg = REG_BAR0 + index;
        self.regs[reg] = (self.regs[reg] & 0xf) | (addr as u32 & !0xf);
        if bar.is_64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// Whether the guest turned memory decoding on.
    pub fn memory_enabled(&self) -> bool {
        self.regs[REG_COMMAND_STATUS] as u16 & COMMAND_MEMORY != 0
    }

    /// Appends a capability: `body` after its ID and next pointer, with
    /// `writable` the bits of each body byte the guest may write. Returns
    /// the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<usize, Error> {
        let len = (2 + body.len()).next_multiple_of(4);
        let at = self.next_cap;
        if at + len > CONFIG_SIZE || writable.len() > body.len() {
            return Err(Error::CapabilityFull(len));
        }
        self.set_byte(at, id, 0);
        self.set_byte(at + 1, 0, 0);
        for (i, &b) in body.iter().enumerate() {
            self.set_byte(at + 2 + i, b, writable.get(i).copied().unwrap_or(0));
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, at as u8, 0),
            None => {
                self.regs[REG_CAP_POINTER] = at as u32;
                self.regs[REG_COMMAND_STATUS] |= STATUS_CAPABILITIES;
            }
        }
        self.last_cap = Some(at);
        self.next_cap = at + len;
        Ok(at)
    }

    fn set_byte(&mut self, offset: usize, value: u8, writable: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | u32::from(value) << shift;
        self.writable[reg] = (self.writable[reg] & !(0xff << shift)) | u32::from(writable) << shift;
    }

    /// The registers, for a snapshot (what the guest wrote is in them).
    pub fn save(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Takes back what the guest wrote from `saved` registers: only bits a
    /// guest may write are taken, so a snapshot cannot change what the
    /// function is. Returns false if `saved` is not a whole space.
    pub fn restore(&mut self, saved: &[u32]) -> bool {
        if saved.len() != REGS {
            return false;
        }
        for ((reg, mask), value) in self.regs.iter_mut().zip(&self.writable).zip(saved) {
            *reg = (*reg & !mask) | (value & mask);
        }
        true
    }

    /// The byte at `offset` (0 past the end).
    pub fn byte(&self, offset: usize) -> u8 {
        self.regs
            .get(offset / 4)
            .map_or(0, |r| (r >> ((offset % 4) * 8)) as u8)
    }

    /// Dword register `reg` as the guest reads it (0 past the end).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes at `offset` (any width, any offset: bytes past
    /// the end read as zero).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .map_or(0, |o| self.byte(o));
        }
    }

    /// A guest write of `data` at `offset`: only writable bits change.
    /// Returns the BARs whose programmed address changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<usize> {
        let before: Vec<Option<(u64, u64)>> = (0..BARS).map(|i| self.bar(i)).collect();
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                break;
            };
            if o >= CONFIG_SIZE {
                break;
            }
            let (reg, shift) = (o / 4, (o % 4) * 8);
            let mask = (self.writable[reg] >> shift) & 0xff;
            let old = (self.regs[reg] >> shift) & 0xff;
            let new = (old & !mask) | (u32::from(b) & mask);
            self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | new << shift;
        }
        (0..BARS).filter(|&i| self.bar(i) != before[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn virtio_block() -> PciConfig {
        PciConfig::new(
            Identity {
                vendor: 0x1af4,
                device: 0x1042,
                revision: 1,
                class: (0x01, 0x00, 0x00),
                subsystem_vendor: 0x1af4,
                subsystem: 0x40,
            },
            true,
        )
    }

    fn r32(c: &PciConfig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identification_reads_as_laid_out_and_cannot_be_written() {
        let mut c = virtio_block();
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8), 0x0100_0001, "class 01 00 00, revision 1");
        assert_eq!(r32(&c, 0x2c), 0x0040_1af4);
        assert_eq!(r32(&c, 0x3c) >> 8 & 0xff, 1, "INTA#");
        c.write(0, &[0xff; 4]);
        c.write(8, &[0xff; 4]);
        c.write(0x3d, &[7]);
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8), 0x0100_0001);
        assert_eq!(c.byte(0x3d), 1);
        // The interrupt line is the driver's to write.
        c.write(0x3c, &[11]);
        assert_eq!(c.byte(0x3c), 11);
    }

    #[test]
    fn only_the_command_bits_a_function_has_are_writable() {
        let mut c = virtio_block();
        assert!(!c.memory_enabled());
        c.write(4, &[0xff, 0xff]);
        assert_eq!(r32(&c, 4) & 0xffff, 0x0407);
        assert!(c.memory_enabled());
        c.write(4, &[0, 0]);
        assert!(!c.memory_enabled());
    }

    #[test]
    fn bars_size_and_program_as_the_specification_says() {
        let mut c = virtio_block();
        c.add_memory_bar(0, 0x4000, true).unwrap();
        c.add_memory_bar(2, 0x1000, false).unwrap();
        // Sizing: all ones in, the size mask and the flags out.
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(r32(&c, 0x10), 0xffff_c004, "64-bit, 16 KiB");
        assert_eq!(r32(&c, 0x14), 0xffff_ffff);
        c.write(0x18, &[0xff; 4]);
        assert_eq!(r32(&c, 0x18), 0xffff_f000, "32-bit, 4 KiB");
        // Programming: the low bits stay the flags; the change is reported.
        assert_eq!(c.write(0x10, &0xe000_1234u32.to_le_bytes()), vec![0]);
        assert_eq!(c.write(0x14, &1u32.to_le_bytes()), vec![0]);
        assert_eq!(c.bar(0), Some((0x1_e000_0000, 0x4000)));
        assert_eq!(c.write(0x18, &0xd000_0000u32.to_le_bytes()), vec![2]);
        assert_eq!(c.bar(2), Some((0xd000_0000, 0x1000)));
        assert!(c.write(0x18, &0xd000_0000u32.to_le_bytes()).is_empty());
        // No BAR there: reads 0, writes change nothing.
        c.write(0x1c, &[0xff; 4]);
        assert_eq!(r32(&c, 0x1c), 0);
        assert_eq!(c.bar(3), None);
        assert_eq!(c.bar(1), None, "the upper half of BAR 0 is not a BAR");
    }

    #[test]
    fn bad_bar_layouts_are_refused() {
        let mut c = virtio_block();
        assert_eq!(c.add_memory_bar(5, 0x1000, true), Err(Error::Bar(5)));
        assert_eq!(c.add_memory_bar(6, 0x1000, false), Err(Error::Bar(6)));
        assert_eq!(
            c.add_memory_bar(0, 0x1800, false),
            Err(Error::BarSize(0x1800))
        );
        assert_eq!(c.add_memory_bar(0, 8, false), Err(Error::BarSize(8)));
        c.add_memory_bar(0, 0x1000, true).unwrap();
        assert_eq!(c.add_memory_bar(1, 0x1000, false), Err(Error::Bar(1)));
        assert_eq!(c.add_memory_bar(0, 0x1000, false), Err(Error::Bar(0)));
    }

    #[test]
    fn capabilities_chain_and_only_their_writable_bits_change() {
        let mut c = virtio_block();
        assert_eq!(r32(&c, 4) >> 16 & 0x10, 0, "no list yet");
        let a = c.add_capability(0x09, &[14, 1, 2, 3], &[]).unwrap();
        let b = c
            .add_capability(0x11, &[0x3f, 0x00], &[0x00, 0xc0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_ne!(r32(&c, 4) >> 16 & 0x10, 0, "status says there is a list");
        assert_eq!(c.byte(0x34), 0x40);
        assert_eq!((c.byte(0x40), c.byte(0x41)), (0x09, 0x48));
        assert_eq!((c.byte(0x48), c.byte(0x49)), (0x11, 0));
        c.write(0x4a, &[0xff, 0xff]);
        assert_eq!((c.byte(0x4a), c.byte(0x4b)), (0x3f, 0xc0));
        c.write(0x41, &[0]);
        assert_eq!(c.byte(0x41), 0x48, "the chain is read-only");
        let big = [0u8; 200];
        assert!(matches!(
            c.add_capability(0x09, &big, &[]),
            Err(Error::CapabilityFull(_))
        ));
    }

    #[test]
    fn a_restore_takes_only_what_a_guest_could_have_written() {
        let mut c = virtio_block();
        c.add_memory_bar(0, 0x1000, false).unwrap();
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        c.write(4, &[0x06, 0]);
        c.write(0x3c, &[10]);
        let mut saved = c.save();
        saved[0] = 0xdead_beef; // IDs a guest cannot write
        let mut back = virtio_block();
        back.add_memory_bar(0, 0x1000, false).unwrap();
        assert!(back.restore(&saved));
        assert_eq!(r32(&back, 0), 0x1042_1af4, "the identity stays");
        assert_eq!(back.bar(0), Some((0xd000_0000, 0x1000)));
        assert!(back.memory_enabled());
        assert_eq!(back.byte(0x3c), 10);
        assert!(!back.restore(&saved[..10]));
    }

    #[test]
    fn hostile_offsets_and_widths_are_contained() {
        let mut c = virtio_block();
        let mut b = [0xaau8; 8];
        c.read(u64::MAX - 2, &mut b);
        assert_eq!(b, [0; 8]);
        c.read(254, &mut b);
        assert_eq!(&b[2..], &[0; 6]);
        assert!(c.write(u64::MAX - 1, &[0xff; 8]).is_empty());
        assert!(c.write(4095, &[0xff; 3]).is_empty());
        assert_eq!(r32(&c, 0), 0x1042_1af4);
    }
}
