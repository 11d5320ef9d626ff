//! Guest RAM: anonymous private mappings, populated lazily by the host kernel on
//! first touch (untouched guest pages cost nothing).

use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::bootparams::ram_regions;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// mmap failed.
    #[error(
        "Cannot map {size} bytes of guest memory; give less memory (--memory, or mem_size_mib)."
    )]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `size` bytes of guest RAM laid out around the 32-bit MMIO hole.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, Error> {
    GuestMemoryMmap::from_ranges(&ram_regions(size)).map_err(|source| Error::Map { size, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn large_memory_has_two_regions_and_no_ram_in_the_hole() {
        let mem = create_guest_memory(5 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(0xbfff_ffff)));
        assert!(!mem.address_in_range(GuestAddress(0xc000_0000)));
        assert!(mem.address_in_range(GuestAddress(0x1_0000_0000)));
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        assert_eq!(total, 5 << 30);
    }
}
