//! Guest RAM: anonymous private mappings, populated lazily by the host kernel on
//! first touch (untouched guest pages cost nothing), on base pages, transparent
//! huge pages or 2 MiB hugetlbfs pages, with or without dirty-page tracking.

use devices::memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::bootparams::ram_regions;
use crate::config::HugePages;

/// Where the host says whether transparent huge pages may be used.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
/// The host's pool of 2 MiB hugetlbfs pages.
const HUGETLB_2M_FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const HUGE_2M: u64 = 2 << 20;

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
    /// The hugetlbfs pool cannot hold the guest.
    #[error("huge_pages \"2M\": the host has {free} free 2 MiB huge pages and the guest needs {want}; reserve them (echo {want} > /proc/sys/vm/nr_hugepages, as root) or set huge_pages \"None\".")]
    HugetlbPool { free: u64, want: u64 },
    /// Transparent huge pages are off on this host.
    #[error("huge_pages \"Transparent\": this host's transparent huge pages are {0} ({THP_ENABLED}); enable them (echo madvise > {THP_ENABLED}) or set huge_pages \"None\".")]
    ThpOff(String),
    /// madvise refused the advice.
    #[error("huge_pages \"Transparent\": the host refused MADV_HUGEPAGE on guest memory: {0}; set huge_pages \"None\".")]
    Madvise(std::io::Error),
}

/// How guest memory is backed and watched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backing {
    /// Dirty-page tracking (the VMM's bitmaps; KVM's log is the slot's flag).
    pub track_dirty_pages: bool,
    /// Base pages, transparent huge pages or hugetlbfs.
    pub huge_pages: HugePages,
}

/// Maps `size` bytes of guest RAM laid out around the 32-bit MMIO hole.
pub fn create_guest_memory(size: u64, backing: Backing) -> Result<GuestMemoryMmap, Error> {
    from_ranges(&ram_regions(size), backing)
}

/// Anonymous guest memory laid out as `ranges`, backed as `backing` says.
pub fn from_ranges(
    ranges: &[(GuestAddress, usize)],
    backing: Backing,
) -> Result<GuestMemoryMmap, Error> {
    let size = ranges.iter().map(|r| r.1 as u64).sum();
    let mem = match backing.huge_pages {
        HugePages::Hugetlbfs2M => hugetlb(ranges, backing.track_dirty_pages)?,
        _ => devices::memory::anonymous(ranges, backing.track_dirty_pages)
            .map_err(|source| Error::Map { size, source })?,
    };
    if backing.huge_pages == HugePages::Transparent {
        advise_transparent(&mem)?;
    }
    Ok(mem)
}

/// Checks that this host can give transparent huge pages and advises them
/// for every region of `mem`.
pub fn advise_transparent(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let setting = std::fs::read_to_string(THP_ENABLED).unwrap_or_default();
    // The selected value is in brackets: "always [madvise] never".
    let selected = setting
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string());
    match selected.as_deref() {
        Some("always") | Some("madvise") => {}
        Some(other) => return Err(Error::ThpOff(format!("set to '{other}'"))),
        None => return Err(Error::ThpOff("not available".into())),
    }
    for region in mem.iter() {
        // SAFETY: the range is one region's live mapping, `len` bytes from
        // its start; MADV_HUGEPAGE only changes how the host backs it.
        let r = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if r != 0 {
            return Err(Error::Madvise(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Guest memory on 2 MiB hugetlbfs pages, reserved when mapped (no
/// MAP_NORESERVE): a pool too small fails here, not with a SIGBUS later.
fn hugetlb(ranges: &[(GuestAddress, usize)], track: bool) -> Result<GuestMemoryMmap, Error> {
    let size: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let want = size.div_ceil(HUGE_2M);
    let free = std::fs::read_to_string(HUGETLB_2M_FREE)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if free < want {
        return Err(Error::HugetlbPool { free, want });
    }
    devices::memory::anonymous_with(ranges, track, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB, true)
        .map_err(|source| Error::Map { size, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_memory_has_two_regions_and_no_ram_in_the_hole() {
        let mem = create_guest_memory(5 << 30, Backing::default()).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(0xbfff_ffff)));
        assert!(!mem.address_in_range(GuestAddress(0xc000_0000)));
        assert!(mem.address_in_range(GuestAddress(0x1_0000_0000)));
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        assert_eq!(total, 5 << 30);
        assert!(!devices::memory::is_tracked(&mem));
        let tracked = Backing {
            track_dirty_pages: true,
            ..Default::default()
        };
        assert!(devices::memory::is_tracked(
            &create_guest_memory(64 << 20, tracked).unwrap()
        ));
    }
}
