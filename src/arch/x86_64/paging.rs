//! Identity-mapped page tables for the boot CPU: 0..4 GiB with 2 MiB pages, so
//! the kernel, its boot data and the local APIC/IOAPIC are all reachable.

use devices::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{PDE_START, PDPTE_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;
/// Number of page directories (one per GiB).
const PD_COUNT: u64 = 4;

/// Errors writing the page tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory does not hold the table area.
    #[error("Guest memory is too small to hold the boot page tables.")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Writes PML4 → PDPT → 4 page directories and returns the CR3 value.
pub fn setup_identity_map(mem: &GuestMemoryMmap) -> Result<u64, Error> {
    let w = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(Error::Write)
    };
    w(PDPTE_START | PRESENT_RW, PML4_START)?;
    for gib in 0..PD_COUNT {
        w(
            (PDE_START + gib * 0x1000) | PRESENT_RW,
            PDPTE_START + gib * 8,
        )?;
    }
    let mut pd = vec![0u8; (PD_COUNT * 4096) as usize];
    for (i, entry) in pd.chunks_exact_mut(8).enumerate() {
        let value = ((i as u64) << 21) | PAGE_SIZE_2M | PRESENT_RW;
        entry.copy_from_slice(&value.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START))
        .map_err(Error::Write)?;
    Ok(PML4_START)
}

/// Walks the tables written by [`setup_identity_map`] for `addr` (used by tests).
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, addr: u64) -> Option<u64> {
    let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).ok();
    let pml4e = read(cr3 + ((addr >> 39) & 0x1ff) * 8)?;
    let pdpte = read((pml4e & !0xfff) + ((addr >> 30) & 0x1ff) * 8)?;
    let pde = read((pdpte & !0xfff) + ((addr >> 21) & 0x1ff) * 8)?;
    let present = pml4e & pdpte & pde & 1 == 1 && pde & PAGE_SIZE_2M != 0;
    present.then_some((pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (addr & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        devices::memory::anonymous(&[(GuestAddress(0), 1 << 20)], false).unwrap()
    }

    #[test]
    fn identity_maps_the_first_four_gib() {
        let m = mem();
        let cr3 = setup_identity_map(&m).unwrap();
        for addr in [
            0u64,
            0x7000,
            0x100000,
            0x1234_5678,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&m, cr3, addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(translate(&m, cr3, 0x1_0000_0000), None);
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let m = devices::memory::anonymous(&[(GuestAddress(0), 0x9000)], false).unwrap();
        assert!(setup_identity_map(&m).is_err());
    }
}
