//! What a device with one queue, served in passes under a rate limiter,
//! keeps between passes (the entropy and pmem devices): the queue once the
//! driver started it, the limiter, and whether the last pass stopped on the
//! limiter or at its budget.

use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueState};

use super::{ActivateError, Interrupt};
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::RateLimiter;

/// One queue and its limiter.
#[derive(Default)]
pub struct OneQueue {
    /// Guest memory, the queue and the interrupt, once started.
    pub active: Option<(GuestMemoryMmap, Queue, Interrupt)>,
    /// What requests may cost per refill period.
    pub limiter: RateLimiter,
    /// The limiter refused the request at the head of the queue: it stays in
    /// the ring until the limiter's timer.
    pub throttled: bool,
    /// The last pass stopped at its budget with requests left.
    pub more: bool,
}

impl OneQueue {
    /// Starts serving the driver's one queue.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        ActivateError::check_count(&queues, 1)?;
        self.active = Some((mem, queues.remove(0), interrupt));
        Ok(())
    }

    /// See `VirtioDevice::queue_pending`.
    pub fn pending(&self, index: usize) -> bool {
        index == 0 && self.more
    }

    /// See `VirtioDevice::throttled_for`.
    pub fn throttled_for(&self) -> Option<Duration> {
        if self.throttled && self.active.is_some() {
            self.limiter.wait(Instant::now())
        } else {
            None
        }
    }

    /// Drops the queue (the limiter stays).
    pub fn reset(&mut self) {
        self.active = None;
        self.throttled = false;
        self.more = false;
    }

    /// The queue's state; requests are answered in the pass that takes
    /// them, so nothing is held between passes.
    pub fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.active.as_ref().map(|(_, q, _)| vec![q.state()])
    }
}
