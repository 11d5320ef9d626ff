//! Diff snapshots: memory files holding only the pages written since the
//! previous snapshot, at their offsets in a sparse file of the guest's size
//! (Firecracker's layout), and the merge of such a file onto its base.
//!
//! Which pages: with dirty-page tracking on (`track_dirty_pages`), the union
//! of KVM's dirty log (the guest's writes) and the guest memory's bitmaps
//! (the VMM's writes, [`devices::memory`]); both are cleared as they are read,
//! so each Diff holds what changed since the one before. Without tracking, as
//! Firecracker does, the pages the host has in core for the guest
//! (`mincore(2)`): every page the guest has touched since it booted or was
//! restored — more than changed, never less (with swap off).

use std::os::unix::fs::FileExt;
use std::path::Path;

use devices::memory::{GuestMemoryMmap, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{Error, MemoryRegionState};
use crate::vstate::vm::Vm;

/// One bit per page of each guest RAM region, 64 pages per word, in region
/// order.
pub type PageSets = Vec<Vec<u64>>;

/// The pages written since the last call: KVM's log OR the VMM's bitmap,
/// for memory that tracks dirty pages. Both sources are reset.
pub fn take_dirty(vm: &Vm, mem: &GuestMemoryMmap) -> Result<PageSets, Error> {
    let mut sets = vm
        .dirty_log(mem)
        .map_err(|e| Error::State(format!("{e}")))?;
    for (set, region) in sets.iter_mut().zip(mem.iter()) {
        if let Some(bitmap) = devices::memory::region_bitmap(region) {
            bitmap.or_into(set);
            bitmap.clear();
        }
    }
    Ok(sets)
}

/// Puts `sets` back into the guest memory's bitmaps, so that a snapshot
/// that failed after [`take_dirty`] loses no page for the next one.
pub fn give_back(mem: &GuestMemoryMmap, sets: &PageSets) {
    for (set, region) in sets.iter().zip(mem.iter()) {
        let Some(bitmap) = devices::memory::region_bitmap(region) else {
            continue;
        };
        for page in pages(set) {
            bitmap.set_page(page);
        }
    }
}

/// The pages the host holds for each guest RAM region (`mincore(2)`).
/// Refused on a host with swap on: a page swapped out is not in core, and
/// the Diff would miss it.
pub fn resident(mem: &GuestMemoryMmap) -> Result<PageSets, Error> {
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    if swaps.lines().count() > 1 {
        return Err(Error::State(
            "A Diff snapshot without dirty-page tracking takes the pages in memory (mincore), which misses pages swapped out, and this host has swap on (/proc/swaps); set track_dirty_pages on the machine configuration or the snapshot load, or take a Full snapshot.".into(),
        ));
    }
    let mut sets = Vec::new();
    for region in mem.iter() {
        let len = region.len() as usize;
        let npages = len.div_ceil(PAGE_SIZE);
        let mut vec = vec![0u8; npages];
        // SAFETY: the region's mapping is `len` bytes from its page-aligned
        // start and stays mapped while `mem` lives; mincore writes one byte
        // per page into `vec`, which has `npages` of them.
        let r = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(Error::State(format!(
                "Cannot tell which guest pages are in memory (mincore): {}.",
                std::io::Error::last_os_error()
            )));
        }
        let mut set = vec![0u64; npages.div_ceil(64)];
        for (i, b) in vec.iter().enumerate() {
            if b & 1 != 0 {
                set[i / 64] |= 1 << (i % 64);
            }
        }
        sets.push(set);
    }
    Ok(sets)
}

/// The page indices set in `set`, in order.
fn pages(set: &[u64]) -> impl Iterator<Item = usize> + '_ {
    set.iter().enumerate().flat_map(|(w, &word)| {
        (0..64)
            .filter(move |b| word & (1 << b) != 0)
            .map(move |b| w * 64 + b)
    })
}

/// Runs of consecutive set pages: (first page, count).
fn runs(set: &[u64]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for p in pages(set) {
        match out.last_mut() {
            Some((start, n)) if *start + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Writes the pages of `sets` into the memory file at `path`, at their
/// offsets, and returns the layout. A new file is created sparse, of the
/// guest's size; an existing file of that size is written over in place
/// (Firecracker's merge by writing a Diff onto a copy of its base); a file of
/// another size is refused. Pages are written whatever they hold (a page
/// that became zero must reach the base).
pub fn save(
    mem: &GuestMemoryMmap,
    path: &Path,
    sets: &PageSets,
) -> Result<(Vec<MemoryRegionState>, u64), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |err| Error::MemoryFile {
        what: "write",
        path: path.display().to_string(),
        err,
    };
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    if meta.len() != 0 && meta.len() != total {
        return Err(Error::DiffBase {
            path: path.display().to_string(),
            found: meta.len(),
            want: total,
        });
    }
    let mut written = 0u64;
    let regions = super::write_regions(mem, &file, |i, bytes, offset| {
        let Some(set) = sets.get(i) else {
            return Ok(());
        };
        for (first, n) in runs(set) {
            let start = first * PAGE_SIZE;
            let end = ((first + n) * PAGE_SIZE).min(bytes.len());
            if start >= end {
                continue;
            }
            file.write_all_at(&bytes[start..end], offset + start as u64)?;
            written += (end - start) as u64;
        }
        Ok(())
    })
    .map_err(io)?;
    // Not synced, as Firecracker's: the pages are in the page cache, where a
    // restore on this host reads them (a Full is synced before it is renamed
    // over an older file; a Diff has no older file to keep).
    Ok((regions, written))
}

/// Saves guest memory for a snapshot of `kind` to `path`: a Full through
/// [`super::save_memory`] (its file, still to be committed, is returned),
/// which with tracking on also starts the next Diff afresh; a Diff through
/// [`save`], in place. A Diff that fails gives its pages back.
pub fn save_memory_of_kind(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    path: &Path,
    kind: super::Kind,
) -> Result<(Vec<MemoryRegionState>, Option<super::format::PendingFile>), Error> {
    let tracked = devices::memory::is_tracked(mem);
    match kind {
        super::Kind::Full => {
            let (regions, pending) = super::save_memory(mem, path)?;
            if tracked {
                take_dirty(vm, mem)?;
            }
            Ok((regions, Some(pending)))
        }
        super::Kind::Diff => {
            let sets = if tracked {
                take_dirty(vm, mem)?
            } else {
                resident(mem)?
            };
            match save(mem, path, &sets) {
                Ok((regions, written)) => {
                    log::info!(
                        "Diff snapshot: {written} bytes of guest memory written to '{}'",
                        path.display()
                    );
                    Ok((regions, None))
                }
                Err(e) => {
                    if tracked {
                        give_back(mem, &sets);
                    }
                    Err(e)
                }
            }
        }
    }
}

/// Errors merging a Diff memory file onto its base.
#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    /// A file cannot be opened, read or written.
    #[error("Cannot {what} '{path}': {err}.")]
    Io {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
    /// The two files are not of one guest.
    #[error("The diff '{diff}' has {diff_len} bytes and the base '{base}' {base_len}: a Diff applies only to the memory file of the same VM; give the base it was taken after.")]
    Mismatch {
        base: String,
        base_len: u64,
        diff: String,
        diff_len: u64,
    },
    /// The diff and the base are one file.
    #[error("'{0}' is both the base and the diff; give the Diff's memory file as --diff-mem.")]
    SameFile(String),
}

/// Copies every page the Diff memory file at `diff` holds (its data, not its
/// holes) over the base memory file at `base`, at the same offsets. The base
/// then restores with the Diff's state file. Returns the bytes copied.
pub fn rebase(base: &Path, diff: &Path) -> Result<u64, RebaseError> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let io = |what: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |err| RebaseError::Io { what, path, err }
    };
    let d = super::format::open_regular(diff).map_err(io("read", diff))?;
    let b = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(io("write", base))?;
    let (dm, bm) = (
        d.metadata().map_err(io("read", diff))?,
        b.metadata().map_err(io("read", base))?,
    );
    if !bm.is_file() {
        return Err(io("write", base)(std::io::Error::other(
            "not a regular file",
        )));
    }
    if dm.dev() == bm.dev() && dm.ino() == bm.ino() {
        return Err(RebaseError::SameFile(base.display().to_string()));
    }
    if dm.len() != bm.len() || dm.len() == 0 {
        return Err(RebaseError::Mismatch {
            base: base.display().to_string(),
            base_len: bm.len(),
            diff: diff.display().to_string(),
            diff_len: dm.len(),
        });
    }
    let len = dm.len() as i64;
    let mut at: i64 = 0;
    let mut copied = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        // SAFETY: lseek on a descriptor this function owns; no memory access.
        let data = unsafe { libc::lseek(d.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // Only a hole is left.
            }
            return Err(io("read", diff)(err));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(d.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io("read", diff)(std::io::Error::last_os_error()));
        }
        let mut off = data as u64;
        while off < hole as u64 {
            let n = ((hole as u64 - off) as usize).min(buf.len());
            d.read_exact_at(&mut buf[..n], off)
                .map_err(io("read", diff))?;
            b.write_all_at(&buf[..n], off).map_err(io("write", base))?;
            off += n as u64;
            copied += n as u64;
        }
        at = hole;
    }
    b.sync_data().map_err(io("write", base))?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_pages_across_words() {
        let mut set = vec![0u64; 3];
        for p in [0, 1, 2, 63, 64, 65, 130] {
            set[p / 64] |= 1 << (p % 64);
        }
        assert_eq!(runs(&set), vec![(0, 3), (63, 3), (130, 1)]);
        assert!(runs(&[0, 0]).is_empty());
    }
}
