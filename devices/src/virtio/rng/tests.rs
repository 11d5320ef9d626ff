//! The entropy device against guest memory built in the test.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::test_util::CountingIrq;

const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x3000;
const USED_RING: u64 = 0x4000;
const DATA: u64 = 0x10000;
const MEM_SIZE: usize = 0x100000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Harness {
    mem: GuestMemoryMmap,
    dev: Rng,
    next_desc: u16,
    avail_idx: u16,
}

impl Harness {
    fn new(dev: Rng) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_ready(true);
        let mut dev = dev;
        let irq = Arc::new(CountingIrq::default());
        dev.activate(mem.clone(), vec![q], Interrupt::new(irq))
            .unwrap();
        Harness {
            mem,
            dev,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// A chain of (addr, len, writable) descriptors, made available.
    fn add_chain(&mut self, descs: &[(u64, u32, bool)]) {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = self.next_desc;
            let last = i + 1 == descs.len();
            let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let at = DESC_TABLE + u64::from(index) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj(index + 1, GuestAddress(at + 14))
                .unwrap();
            self.next_desc += 1;
        }
        let slot = AVAIL_RING + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx += 1;
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = USED_RING + 4 + u64::from(i) * 8;
                (
                    self.mem.read_obj(GuestAddress(at)).unwrap(),
                    self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
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
    h.mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    h.mem
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
    h.add_chain(&[(MEM_SIZE as u64 - 8, 64, true)]);
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
