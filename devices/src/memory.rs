//! Guest memory as every device sees it, with optional dirty-page tracking.
//!
//! Each guest RAM region carries an optional bitmap (one bit per 4 KiB page).
//! When the VM tracks dirty pages (`track_dirty_pages`), every write the VMM
//! makes into guest memory marks its pages: writes through vm-memory
//! (`Bytes`, the rings' used entries) mark them by themselves, and the devices
//! that hand guest memory to the host kernel (a TAP's `readv`, a disk's
//! `pread`, the balloon's `madvise`) take it through [`writable`], the one
//! path that marks what the host is about to write. KVM logs the guest's own
//! writes; a Diff snapshot saves the union of both. Without tracking the
//! bitmap is `None` and marking costs one branch.

use std::num::NonZeroUsize;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryResult, VolatileSlice};

/// The dirty bitmap of one region: `None` when the VM does not track.
pub type DirtyBitmap = Option<AtomicBitmap>;
/// Guest memory: mmap'ed regions, each with its optional dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;
/// A slice of guest memory as [`writable`] gives it.
pub type GuestSlice<'a> =
    VolatileSlice<'a, <DirtyBitmap as vm_memory::bitmap::WithBitmapSlice<'a>>::S>;

/// Size of the pages the bitmaps count (the host's base page).
pub const PAGE_SIZE: usize = 4096;

/// A dirty bitmap for `len` bytes when `track`, else none.
pub fn bitmap(len: usize, track: bool) -> DirtyBitmap {
    track.then(|| {
        AtomicBitmap::new(
            len,
            NonZeroUsize::new(PAGE_SIZE).expect("the page size is not zero"),
        )
    })
}

/// Anonymous private guest memory laid out as `ranges`, tracked when `track`.
pub fn anonymous(
    ranges: &[(GuestAddress, usize)],
    track: bool,
) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap(len, track))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(vm_memory::mmap::FromRangesError::MmapRegion)?;
        let region = GuestRegionMmap::new(mapping, start)
            .ok_or(vm_memory::mmap::FromRangesError::InvalidGuestRegion)?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(vm_memory::mmap::FromRangesError::Collection)
}

/// `len` bytes of guest memory at `addr` that the host is about to write
/// behind vm-memory's back (a `readv`, `pread` or `madvise` into them):
/// their pages are marked dirty first. Fails if the range is not guest RAM.
pub fn writable(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
) -> GuestMemoryResult<GuestSlice<'_>> {
    let slice = mem.get_slice(addr, len)?;
    slice.bitmap().mark_dirty(0, len);
    Ok(slice)
}

/// The dirty bitmap of `region`, if its memory tracks dirty pages.
pub fn region_bitmap(region: &GuestRegionMmap) -> Option<&AtomicBitmap> {
    vm_memory::mmap::MmapRegion::bitmap(region).as_ref()
}

/// Whether this memory tracks dirty pages.
pub fn is_tracked(mem: &GuestMemoryMmap) -> bool {
    mem.iter().any(|r| region_bitmap(r).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn writes_mark_their_pages_when_tracked_and_nothing_otherwise() {
        let ranges = [
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 64 << 10),
        ];
        let mem = anonymous(&ranges, true).unwrap();
        assert!(is_tracked(&mem));
        // Through vm-memory: a write straddling two pages marks both.
        mem.write_slice(&[1; 8], GuestAddress(0x1ffc)).unwrap();
        // Through the raw path, in the second region.
        let s = writable(&mem, GuestAddress((1 << 20) + 0x5000), 0x1001).unwrap();
        assert_eq!(s.len(), 0x1001);
        let dirty = |i: usize| -> Vec<usize> {
            let region = mem.iter().nth(i).unwrap();
            let bm = region_bitmap(region).unwrap();
            (0..16).filter(|&p| bm.is_bit_set(p)).collect()
        };
        assert_eq!(dirty(0), vec![1, 2]);
        assert_eq!(dirty(1), vec![5, 6]);
        // Outside guest RAM: refused, nothing marked.
        assert!(writable(&mem, GuestAddress(0x10000), 1).is_err());

        let plain = anonymous(&ranges, false).unwrap();
        assert!(!is_tracked(&plain));
        plain.write_slice(&[1; 8], GuestAddress(0x1ffc)).unwrap();
        assert!(writable(&plain, GuestAddress(0x100), 8).is_ok());
    }
}
