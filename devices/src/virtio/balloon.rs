//! virtio-balloon (virtio 1.2 §5.5), Firecracker's balloon device: the host
//! sets a target size (`num_pages`, 4 KiB pages) and the guest driver gives
//! pages to the balloon (inflate queue: their frame numbers) or takes them
//! back (deflate queue). The device drops the host memory behind inflated
//! pages (MADV_DONTNEED), so a guest that gives memory back makes the VMM
//! smaller. With statistics on, the device holds the guest's statistics
//! buffer and hands it back every polling interval for fresh values
//! (the transport's timer wakes it, as it wakes rate-limited devices).
//!
//! Every frame number is checked against guest memory; one outside it is
//! skipped and counted, never touched.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{ring, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature: the statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature: the guest may deflate when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page size (the protocol's, whatever the guest's).
pub const PAGE_SIZE: u64 = 4096;
/// Bytes of one statistic: a 16-bit tag and a 64-bit value.
const STAT_SIZE: usize = 10;
/// Frame numbers one request may carry (Linux sends at most 256): a guest
/// cannot hold the event loop with one huge request.
pub const MAX_PFNS_PER_REQUEST: u32 = 4096;
/// Statistics one buffer may carry (virtio defines 16 tags).
const MAX_STATS_PER_BUFFER: usize = 64;

const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;

/// Counters under Firecracker's `balloon` metric names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Inflate requests served.
    pub inflate_count: u64,
    /// Deflate requests served.
    pub deflate_count: u64,
    /// Statistics buffers read.
    pub stats_updates_count: u64,
    /// Statistics buffers that could not be read.
    pub stats_update_fails: u64,
    /// Frame numbers outside guest memory, or requests that are not arrays
    /// of them.
    pub event_fails: u64,
}

/// The balloon device.
pub struct Balloon {
    num_pages: u32,
    actual: u32,
    deflate_on_oom: bool,
    stats_interval: Duration,
    acked_features: u64,
    active: Option<(GuestMemoryMmap, Vec<Queue>, Interrupt)>,
    stats: BTreeMap<u16, u64>,
    /// The guest's statistics buffer, held until the next poll.
    stats_held: Option<u16>,
    next_poll: Option<Instant>,
    counters: BalloonCounters,
}

/// What a snapshot keeps of the balloon besides its queues.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// The target size, in pages.
    pub num_pages: u32,
    /// The size the guest last reported, in pages.
    pub actual: u32,
    /// Whether DEFLATE_ON_OOM is offered.
    pub deflate_on_oom: bool,
    /// The statistics polling interval in seconds (0: no statistics queue).
    pub stats_interval_s: u16,
}

impl Balloon {
    /// A balloon of `target_pages`, statistics every `stats_interval_s`
    /// seconds (0: none, and no statistics queue).
    pub fn new(target_pages: u32, deflate_on_oom: bool, stats_interval_s: u16) -> Self {
        Balloon {
            num_pages: target_pages,
            actual: 0,
            deflate_on_oom,
            stats_interval: Duration::from_secs(u64::from(stats_interval_s)),
            acked_features: 0,
            active: None,
            stats: BTreeMap::new(),
            stats_held: None,
            next_poll: None,
            counters: BalloonCounters::default(),
        }
    }

    fn stats_on(&self) -> bool {
        !self.stats_interval.is_zero()
    }

    /// The target size in pages.
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    /// The size the guest reported, in pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    /// Sets the target size; the transport must then tell the driver
    /// (a configuration change interrupt).
    pub fn set_target_pages(&mut self, pages: u32) {
        self.num_pages = pages;
    }

    /// Changes the statistics polling interval; statistics cannot be turned
    /// on or off once the device exists (the queue count would change).
    pub fn set_stats_interval(&mut self, secs: u16) -> Result<(), &'static str> {
        if (secs == 0) == self.stats_on() {
            return Err(if secs == 0 {
                "Statistics cannot be disabled after they were enabled before the start."
            } else {
                "Statistics cannot be enabled after the start; configure stats_polling_interval_s before it."
            });
        }
        self.stats_interval = Duration::from_secs(u64::from(secs));
        if self.stats_held.is_some() {
            self.next_poll = Some(Instant::now() + self.stats_interval);
        }
        Ok(())
    }

    /// The latest statistics the guest gave, by virtio tag; None when
    /// statistics are off.
    pub fn stats(&self) -> Option<&BTreeMap<u16, u64>> {
        self.stats_on().then_some(&self.stats)
    }

    /// The counters so far.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// Serves the inflate or deflate queue: arrays of 32-bit frame numbers.
    fn pages(&mut self, index: usize) -> bool {
        let Some((mem, queues, interrupt)) = self.active.as_mut() else {
            return true;
        };
        let q = &mut queues[index];
        if !ring::avail_index_sane(q, mem) {
            return false;
        }
        let mut used = 0;
        while used < ring::BUDGET {
            let (head, descs) = match ring::pop_descriptors(q, mem) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(_) => return false,
            };
            let mut ok = !descs.is_empty();
            let mut budget = MAX_PFNS_PER_REQUEST;
            for d in &descs {
                if d.is_write_only() || d.len() % 4 != 0 || d.len() / 4 > budget {
                    ok = false;
                    break;
                }
                budget -= d.len() / 4;
                for i in 0..d.len() / 4 {
                    let Some(at) = d.addr().checked_add(u64::from(i) * 4) else {
                        ok = false;
                        break;
                    };
                    match mem.read_obj::<u32>(at) {
                        Ok(pfn) if index == INFLATE => {
                            if !discard(mem, u64::from(pfn) * PAGE_SIZE) {
                                ok = false;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            ok = false;
                            break;
                        }
                    }
                }
            }
            if !ok {
                self.counters.event_fails += 1;
                crate::guest_warn!(
                    "virtio-balloon: a request with frame numbers outside guest memory or unreadable"
                );
            }
            if index == INFLATE {
                self.counters.inflate_count += 1;
            } else {
                self.counters.deflate_count += 1;
            }
            if q.add_used(&*mem, head, 0).is_err() {
                return false;
            }
            used += 1;
        }
        if used > 0 {
            interrupt.signal_used(index);
        }
        true
    }

    /// Takes the guest's statistics buffer, reads it and holds it.
    fn take_stats(&mut self) -> bool {
        let Some((mem, queues, _)) = self.active.as_mut() else {
            return true;
        };
        let q = &mut queues[STATS];
        if !ring::avail_index_sane(q, mem) {
            return false;
        }
        loop {
            let (head, descs) = match ring::pop_descriptors(q, mem) {
                Ok(Some(r)) => r,
                Ok(None) => return true,
                Err(_) => return false,
            };
            // A second buffer while one is held: the older goes back.
            if let Some(old) = self.stats_held.take() {
                if q.add_used(&*mem, old, 0).is_err() {
                    return false;
                }
            }
            let mut ok = !descs.is_empty();
            for d in &descs {
                if d.is_write_only() {
                    ok = false;
                    continue;
                }
                let n = (d.len() as usize / STAT_SIZE).min(MAX_STATS_PER_BUFFER);
                for i in 0..n {
                    let mut raw = [0u8; STAT_SIZE];
                    let at = d.addr().checked_add((i * STAT_SIZE) as u64);
                    match at.map(|a| mem.read_slice(&mut raw, a)) {
                        Some(Ok(())) => {
                            let tag = u16::from_le_bytes([raw[0], raw[1]]);
                            let mut v = [0u8; 8];
                            v.copy_from_slice(&raw[2..]);
                            // Tags past the ones virtio 1.2 defines are
                            // ignored: a guest cannot grow the map.
                            if tag <= 15 {
                                self.stats.insert(tag, u64::from_le_bytes(v));
                            }
                        }
                        _ => {
                            ok = false;
                            break;
                        }
                    }
                }
            }
            if ok {
                self.counters.stats_updates_count += 1;
            } else {
                self.counters.stats_update_fails += 1;
            }
            self.stats_held = Some(head);
            self.next_poll = Some(Instant::now() + self.stats_interval);
        }
    }

    /// Gives the held statistics buffer back so the guest refills it.
    fn poll_stats(&mut self) -> bool {
        let Some((mem, queues, interrupt)) = self.active.as_mut() else {
            return true;
        };
        let Some(head) = self.stats_held.take() else {
            return true;
        };
        self.next_poll = None;
        if queues[STATS].add_used(&*mem, head, 0).is_err() {
            return false;
        }
        interrupt.signal_used(STATS);
        true
    }

    /// The state a snapshot keeps.
    pub fn save(&self) -> BalloonState {
        BalloonState {
            num_pages: self.num_pages,
            actual: self.actual,
            deflate_on_oom: self.deflate_on_oom,
            stats_interval_s: self.stats_interval.as_secs() as u16,
        }
    }

    /// A balloon as saved (its queues are the transport's to restore).
    pub fn restore(state: &BalloonState) -> Self {
        let mut b = Balloon::new(
            state.num_pages,
            state.deflate_on_oom,
            state.stats_interval_s,
        );
        b.actual = state.actual;
        b
    }
}

/// Drops the host memory behind the guest page at `gpa`; false if the page
/// is not wholly in guest memory.
fn discard(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    // The page's contents change (to zero or the file's): marked dirty.
    let Ok(slice) = crate::memory::writable(mem, GuestAddress(gpa), PAGE_SIZE as usize) else {
        return false;
    };
    let ptr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `ptr` starts PAGE_SIZE bytes of one region of guest memory
    // (get_slice checked it), mapped by this process for the guest; the
    // guest gave this page to the balloon, and MADV_DONTNEED only replaces
    // its contents (zero, or the file's for a restored VM), which is what
    // the balloon protocol allows a deflated page to hold.
    let r = unsafe { libc::madvise(ptr.cast(), PAGE_SIZE as usize, libc::MADV_DONTNEED) };
    r == 0
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        if self.stats_on() {
            &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
        } else {
            &[QUEUE_SIZE, QUEUE_SIZE]
        }
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1;
        if self.stats_on() {
            f |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
        }
        if self.deflate_on_oom {
            f |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        c[4..].copy_from_slice(&self.actual.to_le_bytes());
        super::read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        } else {
            crate::guest_warn!("virtio-balloon: a write to configuration space at {offset:#x}");
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        ActivateError::check_count(&queues, self.queue_max_sizes().len())?;
        self.active = Some((mem, queues, interrupt));
        self.stats_held = None;
        self.next_poll = None;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            INFLATE | DEFLATE => self.pages(index),
            STATS if self.stats_on() => self.take_stats(),
            _ => true,
        }
    }

    fn throttled_for(&self) -> Option<Duration> {
        self.active.as_ref()?;
        self.stats_held?;
        let at = self.next_poll?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    fn process_timer(&mut self) -> bool {
        match self.next_poll {
            Some(at) if at <= Instant::now() => self.poll_stats(),
            _ => true,
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.stats_held = None;
        self.next_poll = None;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        let (_, queues, _) = self.active.as_ref()?;
        let mut states: Vec<_> = queues.iter().map(|q| q.state()).collect();
        // The held statistics buffer is the last one taken: a restored device
        // takes it again.
        if self.stats_held.is_some() {
            if let Some(s) = states.get_mut(STATS) {
                s.next_avail = s.next_avail.wrapping_sub(1);
            }
        }
        Some(states)
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("inflate_count", c.inflate_count),
            ("deflate_count", c.deflate_count),
            ("stats_updates_count", c.stats_updates_count),
            ("stats_update_fails", c.stats_update_fails),
            ("event_fails", c.event_fails),
        ]
    }

    fn report(&self) -> Option<String> {
        Some(format!(
            "target {} pages, guest reports {}",
            self.num_pages, self.actual
        ))
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests;
