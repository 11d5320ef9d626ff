//! virtio-rng (virtio 1.2 §5.4), Firecracker's entropy device: the guest
//! posts writable buffers and the device fills them from the host kernel's
//! random number generator (getrandom). One queue, no configuration space.
//! A request costs the rate limiter one operation and the bytes it asks for;
//! one refused stays in the ring until the limiter's timer, as in the other
//! devices. A request gets at most [`MAX_REQUEST_BYTES`], so a guest cannot
//! make the VMM allocate more than that per request.

use std::time::Instant;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::one_queue::OneQueue;
use super::{ring, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::rate_limiter::{BucketConfig, RateLimiter};

/// Virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Descriptors in the queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes one request is given at most.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Counters under Firecracker's `entropy` metric names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngCounters {
    /// Queue notifications served.
    pub entropy_event_count: u64,
    /// Requests that could not be served (bad buffers).
    pub entropy_event_fails: u64,
    /// Random bytes given to the guest.
    pub entropy_bytes: u64,
    /// Times the host's generator failed.
    pub host_rng_fails: u64,
    /// Times the rate limiter's timer woke the device.
    pub rate_limiter_event_count: u64,
}

/// The entropy device.
pub struct Rng {
    acked_features: u64,
    queue: OneQueue,
    counters: RngCounters,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

/// Fills `buf` from the host kernel's generator.
fn host_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most the given length into the given
        // buffer, which is `buf`'s remaining part.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

impl Rng {
    /// An entropy device without a rate limit.
    pub fn new() -> Self {
        Rng {
            acked_features: 0,
            queue: OneQueue::default(),
            counters: RngCounters::default(),
        }
    }

    /// Limits the bytes and requests the guest gets (Firecracker's
    /// `rate_limiter` of `/entropy`).
    pub fn with_rate_limiter(
        mut self,
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> Self {
        self.queue.limiter = RateLimiter::new(bandwidth, ops, Instant::now());
        self
    }

    /// The counters so far.
    pub fn counters(&self) -> RngCounters {
        self.counters
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
        let mut used = 0;
        let mut healthy = true;
        while used < ring::BUDGET {
            let (head, descs) = match ring::pop_descriptors(q, mem) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(_) => return false,
            };
            let wanted: usize = descs.iter().map(|d| d.len() as usize).sum();
            let usable = !descs.is_empty() && descs.iter().all(|d| d.is_write_only());
            let give = wanted.min(MAX_REQUEST_BYTES);
            if usable && !limiter.consume(1, give as u64) {
                ring::unpop(q);
                *throttled = true;
                break;
            }
            let mut written = 0;
            if !usable {
                self.counters.entropy_event_fails += 1;
                crate::guest_warn!("virtio-rng: a request with a read-only or no buffer");
            } else {
                let mut bytes = vec![0u8; give];
                if host_random(&mut bytes) {
                    for d in &descs {
                        let n = (d.len() as usize).min(give - written);
                        if n == 0 {
                            break;
                        }
                        if mem
                            .write_slice(&bytes[written..written + n], d.addr())
                            .is_err()
                        {
                            crate::guest_warn!("virtio-rng: a buffer outside guest memory");
                            self.counters.entropy_event_fails += 1;
                            break;
                        }
                        written += n;
                    }
                    self.counters.entropy_bytes += written as u64;
                } else {
                    self.counters.host_rng_fails += 1;
                    log::warn!("virtio-rng: the host's random number generator failed");
                }
            }
            if q.add_used(mem, head, written as u32).is_err() {
                healthy = false;
                break;
            }
            used += 1;
        }
        if used >= ring::BUDGET {
            *more = true;
        }
        if used > 0 {
            interrupt.signal_used(0);
        }
        healthy
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
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

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-rng: ignoring a write to configuration space at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        self.queue.activate(mem, queues, interrupt)
    }

    fn process_queue(&mut self, index: usize) -> bool {
        self.counters.entropy_event_count += 1;
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
            ("entropy_event_count", c.entropy_event_count),
            ("entropy_event_fails", c.entropy_event_fails),
            ("entropy_bytes", c.entropy_bytes),
            ("host_rng_fails", c.host_rng_fails),
            ("rate_limiter_event_count", c.rate_limiter_event_count),
            (
                "entropy_rate_limiter_throttled",
                self.queue.limiter.throttled_events(),
            ),
        ]
    }

    fn report(&self) -> Option<String> {
        Some(format!(
            "{} random bytes in {} notifications",
            self.counters.entropy_bytes, self.counters.entropy_event_count
        ))
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests;
