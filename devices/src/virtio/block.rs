//! virtio-blk (virtio 1.2 §5.2) on a raw image file: IN, OUT, FLUSH and GET_ID.
//!
//! Data moves between the file and guest memory with pread/pwrite straight into
//! the guest's pages: the VMM makes no copy. Every guest-given address, length,
//! direction and sector is checked; a bad request fails with IOERR, a chain the
//! device cannot even answer marks the device as needing a reset.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::rate_limiter::{BucketConfig, RateLimiter};

use super::{
    ring, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request announced in SEG_MAX (the chain also has the header
/// and the status descriptor).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Size of the request header (type, reserved, sector).
const HEADER_SIZE: u32 = 16;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image cannot be opened.
    #[error("Cannot open disk image '{path}': {err}. Check the path and its permissions.")]
    Open { path: PathBuf, err: std::io::Error },
    /// The image is a directory.
    #[error("Disk image '{0}' is a directory; give an image file.")]
    Directory(PathBuf),
    /// The image is neither a regular file nor a block device.
    #[error("Disk image '{0}' is not a regular file or block device; give an image file.")]
    NotAFile(PathBuf),
    /// Another process holds the image.
    #[error("Disk image '{0}' is in use by another process (it holds a lock on it); stop that VM or give another image.")]
    InUse(PathBuf),
    /// The image is smaller than a sector.
    #[error("Disk image '{0}' is smaller than one 512-byte sector; give a non-empty image.")]
    TooSmall(PathBuf),
    /// The serial is too long.
    #[error("Disk id '{0}' is longer than 20 bytes; give a shorter id.")]
    IdTooLong(String),
    /// A saved serial is not text.
    #[error("Disk serial '{0}' is not UTF-8 text; give a serial of letters and digits.")]
    IdNotText(String),
}

/// A virtio block device.
pub struct Block {
    path: PathBuf,
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    acked_features: u64,
    active: Option<Active>,
    /// The last pass stopped at its budget with requests left.
    more: bool,
    counters: BlockCounters,
    /// Requests and bytes per refill period (Firecracker's `rate_limiter`).
    limiter: RateLimiter,
    /// The limiter refused the request at the head of the queue: it stays in
    /// the ring until [`VirtioDevice::process_timer`].
    throttled: bool,
}

/// Request counters, reported under Firecracker's metric names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounters {
    /// Read requests completed.
    pub read_count: u64,
    /// Bytes read into guest memory.
    pub read_bytes: u64,
    /// Write requests completed.
    pub write_count: u64,
    /// Bytes written to the image.
    pub write_bytes: u64,
    /// Flush requests completed.
    pub flush_count: u64,
    /// Requests answered with an error status.
    pub invalid_reqs_count: u64,
    /// Queue notifications served.
    pub queue_event_count: u64,
    /// Image replacements (a new `path_on_host` on a running VM).
    pub update_count: u64,
    /// Times the rate limiter's timer woke the device.
    pub rate_limiter_event_count: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

/// Why a request could not be completed normally.
#[derive(Debug, PartialEq, Eq)]
enum RequestError {
    /// Answer with this status.
    Status(u8),
    /// The chain has no usable status descriptor: nothing can be answered.
    Unanswerable,
}

/// What a request costs the rate limiter: one operation, and for a read or
/// a write the bytes of its data buffers (Firecracker charges flushes and ID
/// requests one operation only). A header that cannot be read costs one
/// operation; the request then fails in [`Block::execute`].
fn request_cost(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> (u64, u64) {
    let kind = descs
        .first()
        .filter(|d| d.len() >= HEADER_SIZE)
        .and_then(|d| mem.read_obj::<u32>(d.addr()).ok())
        .map(u32::from_le);
    let bytes = match kind {
        Some(VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT) if descs.len() > 2 => descs[1..descs.len() - 1]
            .iter()
            .map(|d| u64::from(d.len()))
            .sum(),
        _ => 0,
    };
    (1, bytes)
}

/// Takes the advisory lock a VM holds on a file it serves (a disk image, a
/// pmem file) without waiting: shared when it only reads it, exclusive when
/// it writes, so that no two VMs write one file. An error of kind
/// `WouldBlock` means another process holds a lock that conflicts.
pub fn lock_image(file: &File, read_only: bool) -> std::io::Result<()> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor the caller owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens and locks a disk image (see [`Block::open`]); returns it with its
/// capacity in sectors. Opening never blocks (a FIFO is refused, not waited
/// on), so a bad path cannot stall the thread that opens it.
pub fn open_image(path: &Path, read_only: bool) -> Result<(File, u64), Error> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let open_err = |err| Error::Open {
        path: path.to_path_buf(),
        err,
    };
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(Error::Directory(path.to_path_buf()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let kind = meta.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(Error::NotAFile(path.to_path_buf()));
    }
    // Back to blocking I/O for the data path.
    // SAFETY: F_SETFL on a descriptor this function owns; no memory is involved.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } != 0 {
        return Err(open_err(std::io::Error::last_os_error()));
    }
    match lock_image(&file, read_only) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err(Error::InUse(path.to_path_buf()))
        }
        Err(e) => return Err(open_err(e)),
    }
    let len = if kind.is_block_device() {
        let mut f = &file;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(open_err)?
    } else {
        meta.len()
    };
    let capacity = len / SECTOR_SIZE;
    if capacity == 0 {
        return Err(Error::TooSmall(path.to_path_buf()));
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        log::warn!(
            "disk image '{}' is not a whole number of sectors; its last {} bytes are not visible",
            path.display(),
            len % SECTOR_SIZE
        );
    }
    Ok((file, capacity))
}

impl Block {
    /// Opens `path` (read-only if asked) and locks it against other VMMs: an
    /// exclusive lock for read-write, a shared one for read-only use.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, Error> {
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        if let Some(id) = id {
            if id.len() > id_bytes.len() {
                return Err(Error::IdTooLong(id.to_string()));
            }
            id_bytes[..id.len()].copy_from_slice(id.as_bytes());
        }
        let (file, capacity) = open_image(path, read_only)?;
        Ok(Block {
            path: path.to_path_buf(),
            file,
            read_only,
            capacity,
            id: id_bytes,
            acked_features: 0,
            active: None,
            more: false,
            counters: BlockCounters::default(),
            limiter: RateLimiter::default(),
            throttled: false,
        })
    }

    /// Limits the device's requests (one operation each) and the bytes they
    /// move: the buckets given replace the device's, the others stay (see
    /// [`RateLimiter::update`]).
    pub fn update_rate_limiter(
        &mut self,
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) {
        self.limiter.update(bandwidth, ops, Instant::now());
    }

    /// Whether the device is read-only (a replacement image is opened the same way).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Serves `file` (opened and locked with [`open_image`], outside any lock)
    /// from now on; the old image is closed and unlocked. The caller tells the
    /// driver that the capacity changed.
    pub fn swap_image(&mut self, path: &Path, file: File, capacity: u64) {
        self.path = path.to_path_buf();
        self.file = file;
        self.capacity = capacity;
        self.counters.update_count += 1;
    }

    /// When `path` is the image already served (which [`open_image`] refuses
    /// as in use), rereads its size and returns true.
    pub fn refresh_if_same(&mut self, path: &Path) -> Result<bool, Error> {
        use std::os::unix::fs::MetadataExt;
        let open_err = |err| Error::Open {
            path: path.to_path_buf(),
            err,
        };
        let current = self.file.metadata().map_err(open_err)?;
        let given = std::fs::metadata(path).map_err(open_err)?;
        if (given.dev(), given.ino()) != (current.dev(), current.ino()) {
            return Ok(false);
        }
        let capacity = current.len() / SECTOR_SIZE;
        if capacity == 0 {
            return Err(Error::TooSmall(path.to_path_buf()));
        }
        self.path = path.to_path_buf();
        self.capacity = capacity;
        self.counters.update_count += 1;
        Ok(true)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config_bytes(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12) unused: SIZE_MAX is not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16..20) unused.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// Executes one request chain; returns the number of bytes written to guest memory.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
    ) -> Result<u32, RequestError> {
        let status = match descs.last() {
            Some(d) if descs.len() >= 2 && d.is_write_only() && d.len() >= 1 => *d,
            _ => return Err(RequestError::Unanswerable),
        };
        // The status byte must be writable guest memory, or nothing can be answered.
        if mem.get_slice(status.addr(), 1).is_err() {
            return Err(RequestError::Unanswerable);
        }
        let ioerr = RequestError::Status(VIRTIO_BLK_S_IOERR as u8);
        let header = descs[0];
        if header.is_write_only() || header.len() < HEADER_SIZE {
            return Err(ioerr);
        }
        let mut raw = [0u8; HEADER_SIZE as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| RequestError::Status(VIRTIO_BLK_S_IOERR as u8))?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&raw[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let data = &descs[1..descs.len() - 1];
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = kind == VIRTIO_BLK_T_OUT;
                if write && self.read_only {
                    return Err(ioerr);
                }
                // Direction: the device writes into IN buffers and reads OUT buffers.
                if data.is_empty() || data.iter().any(|d| d.is_write_only() == write) {
                    return Err(ioerr);
                }
                let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
                if total == 0 || !total.is_multiple_of(SECTOR_SIZE) {
                    return Err(ioerr);
                }
                let in_range = sector
                    .checked_add(total / SECTOR_SIZE)
                    .is_some_and(|end| end <= self.capacity);
                if !in_range {
                    return Err(ioerr);
                }
                let mut offset = sector * SECTOR_SIZE;
                for d in data {
                    self.transfer(mem, d.addr(), d.len() as usize, offset, write)
                        .map_err(|_| RequestError::Status(VIRTIO_BLK_S_IOERR as u8))?;
                    offset += u64::from(d.len());
                }
                if write {
                    self.counters.write_count += 1;
                    self.counters.write_bytes += total;
                } else {
                    self.counters.read_count += 1;
                    self.counters.read_bytes += total;
                }
                Ok(if write { 0 } else { total as u32 })
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(|e| {
                        log::warn!("virtio-blk: flush failed: {e}");
                        RequestError::Status(VIRTIO_BLK_S_IOERR as u8)
                    })?;
                }
                self.counters.flush_count += 1;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let d = data
                    .first()
                    .filter(|d| d.is_write_only())
                    .ok_or(RequestError::Status(VIRTIO_BLK_S_IOERR as u8))?;
                let n = (d.len() as usize).min(self.id.len());
                mem.write_slice(&self.id[..n], d.addr())
                    .map_err(|_| RequestError::Status(VIRTIO_BLK_S_IOERR as u8))?;
                Ok(n as u32)
            }
            _ => Err(RequestError::Status(VIRTIO_BLK_S_UNSUPP as u8)),
        }
    }

    /// Moves `len` bytes between guest memory at `addr` and the file at `offset`.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
        write: bool,
    ) -> std::io::Result<()> {
        // A read from the file writes guest memory behind vm-memory's back:
        // its pages are marked dirty first (crate::memory::writable).
        let slice = if write {
            mem.get_slice(addr, len)
        } else {
            crate::memory::writable(mem, addr, len)
        }
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < len {
            let off = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            // SAFETY: `base..base+len` is a live mapping of guest memory returned by
            // get_slice for exactly `len` bytes; `done < len` keeps the pointer and
            // the count inside it. The guest may change the bytes concurrently,
            // which is fine for plain byte copies by the kernel.
            let n = unsafe {
                let p = base.add(done);
                if write {
                    libc::pwrite(
                        self.file.as_raw_fd(),
                        p as *const libc::c_void,
                        len - done,
                        off,
                    )
                } else {
                    libc::pread(
                        self.file.as_raw_fd(),
                        p as *mut libc::c_void,
                        len - done,
                        off,
                    )
                }
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Handles every available request; false if the queue is unusable.
    fn drain_queue(&mut self) -> bool {
        let Some(mut active) = self.active.take() else {
            return true;
        };
        let ok = self.drain(&mut active);
        self.active = Some(active);
        ok
    }

    fn drain(&mut self, a: &mut Active) -> bool {
        let mem = a.mem.clone();
        let mut done = 0;
        let mut healthy = true;
        self.more = false;
        self.throttled = false;
        loop {
            if a.queue.event_idx_enabled() && a.queue.disable_notification(&mem).is_err() {
                return false;
            }
            // An available index further ahead than the queue is long is a guest error.
            if !ring::avail_index_sane(&a.queue, &mem) {
                return false;
            }
            while done < ring::BUDGET {
                let chain = match ring::pop_chain(&mut a.queue, &mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(_) => return false,
                };
                let head = chain.head_index();
                let Some(descs) = ring::descriptors(chain, a.queue.size()) else {
                    // Not charged: it is not served, and it breaks the device.
                    // Longer than the queue: not a request a driver may make, and
                    // its status byte is out of reach.
                    crate::guest_warn!(
                        "virtio-blk: a chain longer than the queue size; device needs reset"
                    );
                    if a.queue.add_used(&mem, head, 0).is_err() {
                        return false;
                    }
                    done += 1;
                    healthy = false;
                    continue;
                };
                // The header is read for the cost only when a bucket limits.
                let allowed = !self.limiter.limits() || {
                    let (ops, bytes) = request_cost(&mem, &descs);
                    self.limiter.consume(ops, bytes)
                };
                if !allowed {
                    // Left in the ring: taken again when the limiter allows.
                    ring::unpop(&mut a.queue);
                    self.throttled = true;
                    break;
                }
                let (len, status) = match self.execute(&mem, &descs) {
                    Ok(n) => (n, Some(VIRTIO_BLK_S_OK as u8)),
                    Err(RequestError::Status(s)) => (0, Some(s)),
                    Err(RequestError::Unanswerable) => (0, None),
                };
                let written = match (status, descs.last()) {
                    (Some(s), Some(d)) => match mem.write_obj(s, d.addr()) {
                        Ok(()) => len + 1,
                        Err(_) => {
                            healthy = false;
                            0
                        }
                    },
                    _ => {
                        crate::guest_warn!("virtio-blk: request without a writable status byte; device needs reset");
                        healthy = false;
                        0
                    }
                };
                if a.queue.add_used(&mem, head, written).is_err() {
                    return false;
                }
                done += 1;
            }
            if done >= ring::BUDGET {
                // Let the event loop serve the others; the transport calls again.
                self.more = true;
                break;
            }
            if self.throttled || !a.queue.event_idx_enabled() {
                break;
            }
            match a.queue.enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => return false,
            }
        }
        if done > 0 && a.queue.needs_notification(&mem).unwrap_or(true) {
            a.interrupt.signal_used(0);
        }
        healthy
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-blk: ignoring write to read-only config at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        ActivateError::check_count(&queues, 1)?;
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        self.counters.queue_event_count += 1;
        index != 0 || self.drain_queue()
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("read_count", c.read_count),
            ("read_bytes", c.read_bytes),
            ("write_count", c.write_count),
            ("write_bytes", c.write_bytes),
            ("flush_count", c.flush_count),
            ("invalid_reqs_count", c.invalid_reqs_count),
            ("queue_event_count", c.queue_event_count),
            ("update_count", c.update_count),
            ("rate_limiter_event_count", c.rate_limiter_event_count),
            (
                "rate_limiter_throttled_events",
                self.limiter.throttled_events(),
            ),
        ]
    }

    fn throttled_for(&self) -> Option<std::time::Duration> {
        if self.throttled && self.active.is_some() {
            self.limiter.wait(Instant::now())
        } else {
            None
        }
    }

    fn process_timer(&mut self) -> bool {
        if !self.throttled {
            return true;
        }
        self.counters.rate_limiter_event_count += 1;
        self.drain_queue()
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn queue_pending(&self, index: usize) -> bool {
        index == 0 && self.more
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.more = false;
        self.throttled = false;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        // Requests are served whole within a pass: nothing is held between passes.
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }
}

/// What a snapshot keeps of a block device: the image is reopened by path
/// (and locked again) on restore; the rest is what the driver negotiated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// The image file.
    pub path: PathBuf,
    /// Whether it is served read-only.
    pub read_only: bool,
    /// The serial the driver reads (GET_ID), up to 20 bytes.
    pub serial: Vec<u8>,
    /// The capacity the driver last saw, in sectors.
    pub capacity: u64,
}

impl crate::persist::Persist for Block {
    type State = BlockState;
    type Resources = ();
    type Error = Error;

    fn save(&self) -> BlockState {
        let len = self
            .id
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.id.len());
        BlockState {
            path: self.path.clone(),
            read_only: self.read_only,
            serial: self.id[..len].to_vec(),
            capacity: self.capacity,
        }
    }

    /// Reopens and locks the image (a clone restored while another VM holds
    /// a writable image fails here, before anything runs). The capacity is
    /// the image's now; the VMM tells the driver if it changed. The features
    /// the driver accepted are the transport's to restore.
    fn restore((): (), state: &BlockState) -> Result<Self, Error> {
        let serial = std::str::from_utf8(&state.serial)
            .map_err(|_| Error::IdNotText(String::from_utf8_lossy(&state.serial).into()))?;
        Block::open(&state.path, state.read_only, Some(serial))
    }
}

#[cfg(test)]
mod tests;
