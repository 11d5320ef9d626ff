//! The entropy device against guest memory built in the test.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_util::{Rings, BUFFERS as DATA, RING_MEM};

struct Harness {
    rings: Rings,
    dev: Rng,
}

impl Harness {
    fn new(mut dev: Rng) -> Self {
        let rings = Rings::new(1);
        rings.activate(&mut dev, QUEUE_SIZE);
        Harness { rings, dev }
    }

    fn add_chain(&mut self, descs: &[(u64, u32, bool)]) {
        self.rings.add_chain(0, descs);
    }

    fn used(&self) -> Vec<(u32, u32)> {
        self.rings.used(0)
    }
}

#[test]
fn buffers_are_filled_with_random_bytes_across_descriptors() {
    let mut h = Harness::new(Rng::new());
    h.add_chain(&[(DATA, 100, true), (DATA + 0x1000, 400, true)]);
    assert!(h.dev.process_queue(0));
    assert_eq!(h.used(), [(0, 500)]);
    let mut a = vec![0u8; 100];
    let mut b = vec![0u8; 400];
    h.rings.mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    h.rings
        .mem
        .read_slice(&mut b, GuestAddress(DATA + 0x1000))
        .unwrap();
    // 500 random bytes: all zero, or all one value, would be a broken source.
    let all: Vec<u8> = a.into_iter().chain(b).collect();
    let distinct = all.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct > 100, "{distinct} distinct byte values");
    assert_eq!(h.dev.counters().entropy_bytes, 500);
}

#[test]
fn read_only_buffers_are_refused_and_huge_ones_capped() {
    let mut h = Harness::new(Rng::new());
    h.add_chain(&[(DATA, 64, false)]);
    h.add_chain(&[(DATA, 0x20000, true), (DATA + 0x20000, 0x20000, true)]);
    // Outside guest memory.
    h.add_chain(&[(RING_MEM as u64 - 8, 64, true)]);
    assert!(h.dev.process_queue(0));
    let used = h.used();
    assert_eq!(used[0], (0, 0));
    assert_eq!(used[1], (1, MAX_REQUEST_BYTES as u32));
    assert_eq!(used[2], (3, 0));
    assert_eq!(h.dev.counters().entropy_event_fails, 2);
}

#[test]
fn a_rate_limited_device_holds_requests_until_its_timer() {
    let ops = BucketConfig {
        size: 1,
        one_time_burst: 0,
        refill_time_ms: 40,
    };
    let mut h = Harness::new(Rng::new().with_rate_limiter(None, Some(ops)));
    h.add_chain(&[(DATA, 16, true)]);
    h.add_chain(&[(DATA + 16, 16, true)]);
    assert!(h.dev.process_queue(0));
    assert_eq!(h.used().len(), 1);
    let wait = h.dev.throttled_for().expect("throttled");
    assert!(wait <= std::time::Duration::from_millis(40));
    std::thread::sleep(wait);
    assert!(h.dev.process_timer());
    assert_eq!(h.used().len(), 2);
    let m: std::collections::HashMap<_, _> = h.dev.metrics().into_iter().collect();
    assert_eq!(m["entropy_rate_limiter_throttled"], 1);
    assert_eq!(m["rate_limiter_event_count"], 1);
}
