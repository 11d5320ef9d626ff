//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability in configuration space
//! and the vector table and pending-bit array a function exposes in a BAR.
//! The guest programs each vector's message (address, data) and mask; the
//! device fires vectors by index. A fired vector that is masked becomes
//! pending and is delivered when unmasked. Table accesses are checked: only
//! aligned 4- or 8-byte accesses inside the table do anything.

use serde::{Deserialize, Serialize};

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors a function can have.
pub const MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
const ENABLE: u16 = 1 << 15;
/// Message control: all vectors masked.
const FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: this vector masked.
const VECTOR_MASKED: u32 = 1;

/// An MSI message: what the device writes to raise a vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Message address, low and high dwords.
    pub addr_lo: u32,
    /// Message address, high dword.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for Entry {
    /// Masked, as after reset.
    fn default() -> Self {
        Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

/// What a guest access changed, for the VMM to act on (interrupt routes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Vectors whose message or mask changed.
    pub vectors: Vec<u16>,
    /// Vectors that were pending and are now deliverable: deliver them.
    pub deliver: Vec<(u16, MsiMessage)>,
}

/// A function's MSI-X state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msix {
    /// The table.
    pub entries: Vec<Entry>,
    /// Pending bits, one per vector.
    pub pending: Vec<bool>,
    /// Message control's enable and function-mask bits.
    pub control: u16,
}

impl Msix {
    /// `vectors` masked vectors (at least 1, at most [`MAX_VECTORS`]).
    pub fn new(vectors: u16) -> Self {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        Msix {
            entries: vec![Entry::default(); n],
            pending: vec![false; n],
            control: 0,
        }
    }

    /// Takes a saved state for a function with the same number of vectors;
    /// values are cut to what a guest could have written. False (nothing
    /// taken) if the vector count differs.
    pub fn restore(&mut self, saved: &Msix) -> bool {
        if saved.entries.len() != self.entries.len() || saved.pending.len() != self.pending.len() {
            return false;
        }
        for (e, s) in self.entries.iter_mut().zip(&saved.entries) {
            *e = Entry {
                addr_lo: s.addr_lo & !3,
                addr_hi: s.addr_hi,
                data: s.data,
                control: s.control & VECTOR_MASKED,
            };
        }
        self.pending.clone_from(&saved.pending);
        self.control = saved.control & (ENABLE | FUNCTION_MASK);
        true
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Size of the pending-bit array in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// The capability body (after ID and next pointer) for a table at
    /// `table` and a PBA at `pba` (both offsets in BAR `bir`, 8-aligned),
    /// and the bits the guest may write: enable and function mask.
    pub fn capability(&self, bir: u8, table: u32, pba: u32) -> ([u8; 10], [u8; 2]) {
        let mut body = [0u8; 10];
        let control = (self.vectors() - 1) & 0x7ff;
        body[0..2].copy_from_slice(&control.to_le_bytes());
        body[2..6].copy_from_slice(&(table & !7 | u32::from(bir & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba & !7 | u32::from(bir & 7)).to_le_bytes());
        (body, [0x00, 0xc0])
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.control & ENABLE != 0
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled()
            && self.control & FUNCTION_MASK == 0
            && self.entries[v].control & VECTOR_MASKED == 0
    }

    /// The message of vector `v`.
    pub fn message(&self, v: u16) -> Option<MsiMessage> {
        let e = self.entries.get(usize::from(v))?;
        Some(MsiMessage {
            address: u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo),
            data: e.data,
        })
    }

    /// The device raises vector `v`: its message if it can be delivered
    /// now; otherwise it is left pending (and None). A vector the function
    /// does not have does nothing.
    pub fn fire(&mut self, v: u16) -> Option<MsiMessage> {
        let i = usize::from(v);
        if i >= self.entries.len() || !self.enabled() {
            return None;
        }
        if self.deliverable(i) {
            self.message(v)
        } else {
            self.pending[i] = true;
            None
        }
    }

    /// Pending vectors that became deliverable: cleared and returned.
    fn take_deliverable(&mut self, changes: &mut Changes) {
        for i in 0..self.entries.len() {
            if self.pending[i] && self.deliverable(i) {
                self.pending[i] = false;
                if let Some(m) = self.message(i as u16) {
                    changes.deliver.push((i as u16, m));
                }
            }
        }
    }

    /// The guest wrote message control (from the capability's bytes).
    pub fn set_control(&mut self, control: u16) -> Changes {
        let mut changes = Changes::default();
        let new = control & (ENABLE | FUNCTION_MASK);
        if new != self.control {
            self.control = new;
            changes.vectors = (0..self.vectors()).collect();
            self.take_deliverable(&mut changes);
        }
        changes
    }

    /// Reads the table at `offset` (from the table's start); anything but an
    /// aligned 4- or 8-byte access inside it reads as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((i, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.entries[i];
        let dwords = [e.addr_lo, e.addr_hi, e.data, e.control];
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&dwords[field + k].to_le_bytes());
        }
    }

    /// Writes the table at `offset`; anything but an aligned 4- or 8-byte
    /// access inside it is ignored.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Changes {
        let mut changes = Changes::default();
        let Some((i, field)) = self.locate(offset, data.len()) else {
            return changes;
        };
        let before = self.entries[i];
        for (k, chunk) in data.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            let v = u32::from_le_bytes(b);
            let e = &mut self.entries[i];
            match field + k {
                0 => e.addr_lo = v & !3,
                1 => e.addr_hi = v,
                2 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
        }
        if self.entries[i] != before {
            changes.vectors.push(i as u16);
            self.take_deliverable(&mut changes);
        }
        changes
    }

    /// Reads the pending-bit array at `offset`; writes to it are ignored.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            let byte = offset.saturating_add(k as u64);
            *b = (0..8)
                .filter(|bit| {
                    byte.checked_mul(8)
                        .and_then(|x| x.checked_add(*bit))
                        .and_then(|x| usize::try_from(x).ok())
                        .and_then(|v| self.pending.get(v))
                        .copied()
                        .unwrap_or(false)
                })
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    /// The entry and dword an access at `offset` of `len` bytes addresses,
    /// if it is an aligned 4- or 8-byte access inside the table (an 8-byte
    /// access only on the address pair or data and control).
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        if offset.checked_add(len as u64)? > self.table_size() {
            return None;
        }
        let i = usize::try_from(offset / ENTRY_SIZE).ok()?;
        let field = ((offset % ENTRY_SIZE) / 4) as usize;
        Some((i, field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(m: &mut Msix, v: u16, addr: u64, data: u32) -> Changes {
        let base = u64::from(v) * ENTRY_SIZE;
        m.write_table(base, &addr.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &0u32.to_le_bytes())
    }

    #[test]
    fn the_capability_says_the_size_and_where_table_and_pba_are() {
        let m = Msix::new(3);
        let (body, writable) = m.capability(1, 0x2000, 0x3000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2, "N-1");
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x2001);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x3001);
        assert_eq!(writable, [0, 0xc0], "only enable and function mask");
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
        assert_eq!(Msix::new(0).vectors(), 1);
        assert_eq!(Msix::new(u16::MAX).vectors(), MAX_VECTORS);
    }

    #[test]
    fn vectors_deliver_once_enabled_and_unmasked_and_pending_ones_follow() {
        let mut m = Msix::new(2);
        assert_eq!(m.fire(0), None, "not enabled: nothing, not even pending");
        assert!(!m.pending[0]);
        m.set_control(ENABLE);
        assert_eq!(m.fire(0), None, "masked at reset: pending");
        assert!(m.pending[0]);
        let c = program(&mut m, 0, 0xfee0_0000, 0x4041);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        assert_eq!(
            c.deliver,
            vec![(0, msg)],
            "unmasking delivers the pending one"
        );
        assert!(!m.pending[0]);
        assert_eq!(m.fire(0), Some(msg));
        // The function mask holds every vector back, and lets them go.
        m.set_control(ENABLE | FUNCTION_MASK);
        assert_eq!(m.fire(0), None);
        let c = m.set_control(ENABLE);
        assert_eq!(c.deliver, vec![(0, msg)]);
        assert_eq!(m.fire(7), None, "a vector it does not have");
    }

    #[test]
    fn the_table_reads_back_and_refuses_odd_accesses() {
        let mut m = Msix::new(2);
        program(&mut m, 1, 0x1_fee0_1003, 0x55);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(
            u64::from_le_bytes(q),
            0x1_fee0_1000,
            "low address bits are 0"
        );
        let mut d = [0u8; 4];
        m.read_table(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "unmasked");
        for (off, len) in [
            (2u64, 4usize),
            (4, 8),
            (0, 2),
            (0, 1),
            (32, 4),
            (u64::MAX - 3, 4),
        ] {
            let mut b = vec![0xaau8; len];
            m.read_table(off, &mut b);
            assert!(b.iter().all(|&x| x == 0), "{off} {len}");
            assert_eq!(m.write_table(off, &vec![0xff; len]), Changes::default());
        }
        m.write_table(28, &0xffff_ffffu32.to_le_bytes());
        m.read_table(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "only the mask bit is kept");
    }

    #[test]
    fn the_pba_shows_pending_vectors() {
        let mut m = Msix::new(70);
        m.set_control(ENABLE);
        m.fire(1);
        m.fire(65);
        let mut b = [0u8; 16];
        m.read_pba(0, &mut b);
        assert_eq!(b[0], 0b10);
        assert_eq!(b[8], 0b10);
        let mut far = [0xffu8; 4];
        m.read_pba(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
    }
}
