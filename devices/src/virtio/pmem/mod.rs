//! virtio-pmem (virtio 1.2 §5.19), Firecracker's `pmem` device: a host file
//! mapped into guest-physical memory, which Linux shows as /dev/pmemN and
//! can mount with DAX (loads and stores go straight to the host's page
//! cache, with no request per access). The region's address and size are in
//! the configuration space; its one queue carries FLUSH requests, answered
//! after an msync of the whole file.
//!
//! The mapping is 2 MiB aligned in length, as the specification requires:
//! past the end of a file of another size the guest finds private anonymous
//! memory, never written back. A read-only device maps the file privately
//! and the VMM gives it a read-only memory slot, so nothing the guest does
//! reaches the file. Flushes cost the rate limiter one operation and the
//! file's size in bytes; those a notification brings together are served by
//! one msync. Every request is checked: a malformed one is answered with an
//! error status where it can be answered, and the device keeps serving.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::one_queue::OneQueue;
use super::{
    ring, ActivateError, DeviceMemory, Interrupt, VirtioDevice, DEVICE_MEMORY_ALIGNMENT,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::BucketConfig;

/// Virtio device ID of a persistent memory device.
pub const VIRTIO_ID_PMEM: u32 = 27;
/// Descriptors in the queue.
pub const QUEUE_SIZE: u16 = 256;
/// The one request type: write the region back to its medium.
const REQ_FLUSH: u32 = 0;
/// Response: done.
const RESP_OK: u32 = 0;
/// Response: failed (an unknown request, or the host's msync failed).
const RESP_EIO: u32 = 1;
/// Size of the request (its type) and of the response (its result).
const WORD: u32 = 4;
/// Configuration space: the region's start and size, two little-endian u64.
const CONFIG_SIZE: usize = 16;

/// Errors opening a backing file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be opened.
    #[error("Cannot open pmem backing file '{path}': {err}. Check the path and its permissions.")]
    Open { path: PathBuf, err: std::io::Error },
    /// The file is not a regular file.
    #[error("Pmem backing file '{0}' is not a regular file; give a file.")]
    NotAFile(PathBuf),
    /// Another process holds the file.
    #[error("Pmem backing file '{0}' is in use by another process (it holds a lock on it); stop that VM or give another file.")]
    InUse(PathBuf),
    /// The file is empty (Firecracker's message).
    #[error("Error backing file size is 0: '{0}'; give a non-empty file.")]
    Empty(PathBuf),
    /// The file cannot be mapped.
    #[error("Cannot map pmem backing file '{path}': {err}.")]
    Map { path: PathBuf, err: std::io::Error },
    /// A restored file's mapping differs from the snapshot's.
    #[error("Restored pmem size {saved} does not match backing file mapping size {now} ('{path}' changed since the snapshot); give the file as it was.")]
    SizeChanged { path: PathBuf, saved: u64, now: u64 },
}

/// Counters under Firecracker's `pmem` metric names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PmemCounters {
    /// Activations that failed.
    pub activate_fails: u64,
    /// Configuration-space writes (the space is read-only).
    pub cfg_fails: u64,
    /// Requests that could not be served as asked.
    pub event_fails: u64,
    /// Queue notifications served.
    pub queue_event_count: u64,
    /// Times the rate limiter's timer woke the device.
    pub rate_limiter_event_count: u64,
    /// Flushes done (msync calls).
    pub flush_count: u64,
}

/// The file's mapping: `len` bytes (the file's size rounded up to 2 MiB),
/// the file first, anonymous memory after it.
struct Mapping {
    addr: *mut libc::c_void,
    len: u64,
}

// SAFETY: the mapping is plain memory owned by this value; nothing in it is
// tied to the thread that made it.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `file` (`file_len` bytes, not 0) rounded up to 2 MiB: shared
    /// with the file when `shared`, private otherwise.
    fn new(file: &File, file_len: u64, shared: bool) -> std::io::Result<Self> {
        let len = file_len
            .checked_next_multiple_of(DEVICE_MEMORY_ALIGNMENT)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        let size =
            usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        let file_size = file_len as usize;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a new anonymous mapping at an address the kernel picks;
        // nothing else is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mapping = Mapping { addr, len };
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: replaces the first `file_size` bytes of the anonymous
        // mapping made above (which this function owns, and which is at
        // least that long) with the file; MAP_FIXED only ever replaces
        // pages of that mapping.
        let file_map = unsafe {
            libc::mmap(
                addr,
                file_size,
                prot,
                flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if file_map == libc::MAP_FAILED {
            // `mapping` unmaps the whole range on drop.
            return Err(std::io::Error::last_os_error());
        }
        Ok(mapping)
    }

    /// Writes the file's part back to it.
    fn sync(&self, file_len: u64) -> std::io::Result<()> {
        // SAFETY: msync on the start of this mapping, for at most its
        // length; it reads nothing of ours.
        let r = unsafe { libc::msync(self.addr, file_len as usize, libc::MS_SYNC) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is exactly the one this value mapped, and nothing
        // refers to it any more (the VMM removes the guest's memory slot
        // before it drops the device).
        unsafe { libc::munmap(self.addr, self.len as usize) };
    }
}

/// The saved state: the file and where the guest found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemState {
    /// The backing file.
    pub path: PathBuf,
    /// Mapped read-only.
    pub read_only: bool,
    /// Guest-physical address of the region.
    pub guest_addr: u64,
    /// Size of the region the driver saw (the file's size rounded up to 2 MiB).
    pub size: u64,
}

/// The persistent memory device.
pub struct Pmem {
    path: PathBuf,
    /// Kept open for the lock on it.
    _file: File,
    file_len: u64,
    read_only: bool,
    mapping: Mapping,
    guest_addr: Option<u64>,
    acked_features: u64,
    queue: OneQueue,
    counters: PmemCounters,
}

impl Pmem {
    /// Opens, locks (as disk images are: `block::lock_image`) and maps `path`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let open_err = |err| Error::Open {
            path: path.to_path_buf(),
            err,
        };
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(Error::NotAFile(path.to_path_buf()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(Error::NotAFile(path.to_path_buf()));
        }
        match super::block::lock_image(&file, read_only) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Error::InUse(path.to_path_buf()))
            }
            Err(e) => return Err(open_err(e)),
        }
        let file_len = meta.len();
        if file_len == 0 {
            return Err(Error::Empty(path.to_path_buf()));
        }
        let mapping = Mapping::new(&file, file_len, !read_only).map_err(|err| Error::Map {
            path: path.to_path_buf(),
            err,
        })?;
        Ok(Pmem {
            path: path.to_path_buf(),
            _file: file,
            file_len,
            read_only,
            mapping,
            guest_addr: None,
            acked_features: 0,
            queue: OneQueue::default(),
            counters: PmemCounters::default(),
        })
    }

    /// Limits flushes: each costs one operation and the file's size in bytes
    /// (Firecracker's `rate_limiter` of `/pmem`). A bucket given replaces
    /// the one there, a bucket not given stays (Firecracker's PATCH).
    pub fn update_rate_limiter(
        &mut self,
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) {
        self.queue.limiter.update(bandwidth, ops, Instant::now());
    }

    /// The counters so far.
    pub fn counters(&self) -> PmemCounters {
        self.counters
    }

    /// The size of the region the guest sees.
    pub fn size(&self) -> u64 {
        self.mapping.len
    }

    /// The backing file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[..8].copy_from_slice(&self.guest_addr.unwrap_or(0).to_le_bytes());
        c[8..].copy_from_slice(&self.mapping.len.to_le_bytes());
        c
    }

    /// Where a request's result goes: its last descriptor, if the device may
    /// write it and it holds a response.
    fn response_slot(descs: &[Descriptor]) -> Option<&Descriptor> {
        descs
            .last()
            .filter(|d| d.is_write_only() && d.len() >= WORD && descs.len() >= 2)
    }

    /// The request's type, if it is well formed: a device-readable first
    /// descriptor of one word.
    fn request_type(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<u32> {
        let head = descs
            .first()
            .filter(|d| !d.is_write_only() && d.len() == WORD)?;
        mem.read_obj::<u32>(head.addr()).ok().map(u32::from_le)
    }

    fn drain(&mut self) -> bool {
        let OneQueue {
            active,
            limiter,
            throttled,
            more,
        } = &mut self.queue;
        let Some((mem, q, interrupt)) = active.as_mut() else {
            return true;
        };
        *more = false;
        *throttled = false;
        if !ring::avail_index_sane(q, mem) {
            return false;
        }
        // Take what is there (one rate-limiter charge for the lot), then
        // flush once and answer every request.
        let mut taken: Vec<(u16, Vec<Descriptor>)> = Vec::new();
        while taken.len() < ring::BUDGET {
            match ring::pop_descriptors(q, mem) {
                Ok(Some(r)) => {
                    if taken.is_empty() && !limiter.consume(1, self.file_len) {
                        ring::unpop(q);
                        *throttled = true;
                        break;
                    }
                    taken.push(r);
                }
                Ok(None) => break,
                Err(_) => return false,
            }
        }
        if taken.len() >= ring::BUDGET {
            *more = true;
        }
        if taken.is_empty() {
            return true;
        }
        let flushes = taken
            .iter()
            .filter(|(_, d)| Self::request_type(mem, d) == Some(REQ_FLUSH))
            .count();
        let synced = if flushes == 0 || self.read_only {
            true
        } else {
            self.counters.flush_count += 1;
            match self.mapping.sync(self.file_len) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!(
                        "virtio-pmem: msync of '{}' failed: {e}",
                        self.path.display()
                    );
                    false
                }
            }
        };
        let mut healthy = true;
        for (head, descs) in &taken {
            let kind = Self::request_type(mem, descs);
            let status = match kind {
                Some(REQ_FLUSH) if synced => RESP_OK,
                Some(REQ_FLUSH) => RESP_EIO,
                Some(other) => {
                    crate::guest_warn!("virtio-pmem: unknown request type {other}");
                    self.counters.event_fails += 1;
                    RESP_EIO
                }
                None => {
                    crate::guest_warn!("virtio-pmem: a request without a one-word header");
                    self.counters.event_fails += 1;
                    RESP_EIO
                }
            };
            let written = match Self::response_slot(descs) {
                Some(d) if mem.write_obj(status.to_le(), d.addr()).is_ok() => WORD,
                _ => {
                    crate::guest_warn!("virtio-pmem: a request with no room for its response");
                    self.counters.event_fails += 1;
                    0
                }
            };
            if q.add_used(mem, *head, written).is_err() {
                healthy = false;
                break;
            }
        }
        interrupt.signal_used(0);
        healthy
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        self.counters.cfg_fails += 1;
        crate::guest_warn!("virtio-pmem: a write to read-only configuration space at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let started = self.queue.activate(mem, queues, interrupt);
        if started.is_err() {
            self.counters.activate_fails += 1;
        }
        started
    }

    fn process_queue(&mut self, index: usize) -> bool {
        self.counters.queue_event_count += 1;
        index != 0 || self.drain()
    }

    fn queue_pending(&self, index: usize) -> bool {
        self.queue.pending(index)
    }

    fn throttled_for(&self) -> Option<std::time::Duration> {
        self.queue.throttled_for()
    }

    fn process_timer(&mut self) -> bool {
        if !self.queue.throttled {
            return true;
        }
        self.counters.rate_limiter_event_count += 1;
        self.drain()
    }

    fn reset(&mut self) {
        self.queue.reset();
        self.acked_features = 0;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.queue.queue_states()
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("activate_fails", c.activate_fails),
            ("cfg_fails", c.cfg_fails),
            ("event_fails", c.event_fails),
            ("queue_event_count", c.queue_event_count),
            (
                "rate_limiter_throttled_events",
                self.queue.limiter.throttled_events(),
            ),
            ("rate_limiter_event_count", c.rate_limiter_event_count),
        ]
    }

    fn report(&self) -> Option<String> {
        Some(format!(
            "{} flushes in {} notifications",
            self.counters.flush_count, self.counters.queue_event_count
        ))
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        Some(DeviceMemory {
            host_addr: self.mapping.addr as u64,
            len: self.mapping.len,
            read_only: self.read_only,
            guest_addr: self.guest_addr,
        })
    }

    fn set_device_memory_address(&mut self, guest_addr: u64) {
        self.guest_addr = Some(guest_addr);
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl crate::persist::Persist for Pmem {
    type State = PmemState;
    type Resources = ();
    type Error = Error;

    fn save(&self) -> PmemState {
        PmemState {
            path: self.path.clone(),
            read_only: self.read_only,
            guest_addr: self.guest_addr.unwrap_or(0),
            size: self.mapping.len,
        }
    }

    /// Reopens and maps the file, at the address the snapshot had; its
    /// rounded size must be the one the driver saw. The features the driver
    /// accepted are the transport's to restore.
    fn restore((): (), state: &PmemState) -> Result<Self, Error> {
        let mut pmem = Pmem::open(&state.path, state.read_only)?;
        if pmem.size() != state.size {
            return Err(Error::SizeChanged {
                path: state.path.clone(),
                saved: state.size,
                now: pmem.size(),
            });
        }
        pmem.guest_addr = Some(state.guest_addr);
        Ok(pmem)
    }
}

#[cfg(test)]
mod tests;
