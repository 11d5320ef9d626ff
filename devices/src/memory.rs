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

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryResult, VolatileSlice};

/// The dirty bitmap of one region: `None` when the VM does not track.
pub type DirtyBitmap = Option<PageBitmap>;
/// Guest memory: mmap'ed regions, each with its optional dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;
/// A slice of guest memory as [`writable`] gives it.
pub type GuestSlice<'a> =
    VolatileSlice<'a, <DirtyBitmap as vm_memory::bitmap::WithBitmapSlice<'a>>::S>;

/// Size of the pages the bitmaps count (the host's base page).
pub const PAGE_SIZE: usize = 4096;

/// One bit per page of a region, 64 pages per word, in an anonymous mapping
/// of its own: the host backs only the words something marked (a 16 GiB
/// guest's 512 KiB of bitmap cost nothing until the guest's devices write),
/// and clearing it hands the memory back. vm-memory's own writes mark it
/// through [`Bitmap::mark_dirty`].
pub struct PageBitmap {
    words: NonNull<AtomicU64>,
    nwords: usize,
    pages: usize,
    map_len: usize,
}

// SAFETY: the words are atomics in a mapping this value owns; sharing them
// between threads is what they are for.
unsafe impl Send for PageBitmap {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for PageBitmap {}

impl PageBitmap {
    /// A clear bitmap for `len` bytes; None if the host has no memory for it.
    pub fn new(len: usize) -> Option<Self> {
        let pages = len.div_ceil(PAGE_SIZE);
        let nwords = pages.div_ceil(64).max(1);
        let map_len = (nwords * 8).next_multiple_of(PAGE_SIZE);
        // SAFETY: a new private anonymous mapping; nothing else is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(PageBitmap {
            words: NonNull::new(p.cast())?,
            nwords,
            pages,
            map_len,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds `nwords` zero-initialized u64s, suitably
        // aligned (page-aligned start), and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.nwords) }
    }

    /// Marks page `page` (ignored past the end).
    pub fn set_page(&self, page: usize) {
        if page < self.pages {
            self.words()[page / 64].fetch_or(1 << (page % 64), Ordering::SeqCst);
        }
    }

    /// Whether page `page` is marked.
    pub fn is_page_set(&self, page: usize) -> bool {
        page < self.pages
            && self.words()[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// ORs the marks into `dst` (one bit per page, 64 per word), reading in
    /// place: words nothing marked read the shared zero page.
    pub fn or_into(&self, dst: &mut [u64]) {
        for (d, w) in dst.iter_mut().zip(self.words()) {
            *d |= w.load(Ordering::Acquire);
        }
    }

    /// Clears every mark and gives the bitmap's memory back to the host. A
    /// page marked while this runs may be lost: call it with the guest and
    /// its devices paused.
    pub fn clear(&self) {
        // SAFETY: the range is this bitmap's own mapping; MADV_DONTNEED on
        // private anonymous memory makes it read as zero again.
        let r = unsafe {
            libc::madvise(
                self.words.as_ptr().cast(),
                self.map_len,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            for w in self.words() {
                w.store(0, Ordering::Release);
            }
        }
    }
}

impl Drop for PageBitmap {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and is not
        // used after this.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.map_len) };
    }
}

impl std::fmt::Debug for PageBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBitmap({} pages)", self.pages)
    }
}

impl<'a> WithBitmapSlice<'a> for PageBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for PageBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = offset.saturating_add(len - 1) / PAGE_SIZE;
        for page in first..=last.min(self.pages.saturating_sub(1)) {
            self.set_page(page);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_page_set(offset / PAGE_SIZE)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

/// A dirty bitmap for `len` bytes when `track`, else none; an error if the
/// host cannot map one (tracking without it would miss the VMM's writes).
pub fn bitmap(len: usize, track: bool) -> std::io::Result<DirtyBitmap> {
    if !track {
        return Ok(None);
    }
    PageBitmap::new(len)
        .map(Some)
        .ok_or_else(std::io::Error::last_os_error)
}

/// Anonymous private guest memory laid out as `ranges`, tracked when `track`.
pub fn anonymous(
    ranges: &[(GuestAddress, usize)],
    track: bool,
) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    anonymous_with(ranges, track, libc::MAP_NORESERVE, false)
}

/// Anonymous private guest memory laid out as `ranges`, tracked when
/// `track`, mapped with `flags` besides MAP_PRIVATE | MAP_ANONYMOUS (and on
/// hugetlbfs pages, which vm-memory must know of, when `hugetlbfs`).
pub fn anonymous_with(
    ranges: &[(GuestAddress, usize)],
    track: bool,
    flags: i32,
    hugetlbfs: bool,
) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    use vm_memory::mmap::{FromRangesError, MmapRegionError};
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let bitmap = bitmap(len, track)
            .map_err(|e| FromRangesError::MmapRegion(MmapRegionError::Mmap(e)))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags)
            .with_hugetlbfs(hugetlbfs)
            .build()
            .map_err(FromRangesError::MmapRegion)?;
        let region =
            GuestRegionMmap::new(mapping, start).ok_or(FromRangesError::InvalidGuestRegion)?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(FromRangesError::Collection)
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
pub fn region_bitmap(region: &GuestRegionMmap) -> Option<&PageBitmap> {
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
            (0..16).filter(|&p| bm.is_page_set(p)).collect()
        };
        assert_eq!(dirty(0), vec![1, 2]);
        assert_eq!(dirty(1), vec![5, 6]);
        // Outside guest RAM: refused, nothing marked.
        assert!(writable(&mem, GuestAddress(0x10000), 1).is_err());

        // Clearing forgets every mark.
        let region = mem.iter().next().unwrap();
        region_bitmap(region).unwrap().clear();
        assert_eq!(dirty(0), Vec::<usize>::new());
        let mut words = [0u64; 1];
        region_bitmap(region).unwrap().set_page(3);
        region_bitmap(region).unwrap().or_into(&mut words);
        assert_eq!(words, [1 << 3]);

        let plain = anonymous(&ranges, false).unwrap();
        assert!(!is_tracked(&plain));
        plain.write_slice(&[1; 8], GuestAddress(0x1ffc)).unwrap();
        assert!(writable(&plain, GuestAddress(0x100), 8).is_ok());
    }
}
