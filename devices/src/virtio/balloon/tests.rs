//! The balloon against guest memory built in the test.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_util::{Rings, BUFFERS, RING_MEM};

fn started(dev: &mut Balloon) -> Rings {
    let rings = Rings::new(dev.queue_max_sizes().len());
    rings.activate(dev, QUEUE_SIZE);
    rings
}

#[test]
fn inflated_pages_lose_their_contents_and_bad_frame_numbers_are_skipped() {
    let mut b = Balloon::new(16, false, 0);
    assert_eq!(b.queue_max_sizes().len(), 2, "no statistics queue");
    assert_eq!(b.features() & (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM), 0);
    let mut r = started(&mut b);
    let page = 0x80000u64;
    r.mem
        .write_slice(&[0xab; 4096], GuestAddress(page))
        .unwrap();
    r.mem
        .write_slice(&[0xcd; 16], GuestAddress(page + 4096))
        .unwrap();
    // Frame numbers: the page, then one past the end of guest memory.
    let pfns = [
        (page / PAGE_SIZE) as u32,
        (RING_MEM as u64 / PAGE_SIZE) as u32,
    ];
    for (i, p) in pfns.iter().enumerate() {
        r.mem
            .write_obj(*p, GuestAddress(BUFFERS + i as u64 * 4))
            .unwrap();
    }
    r.add_chain(0, &[(BUFFERS, 8, false)]);
    assert!(b.process_queue(0));
    assert_eq!(r.used(0), [(0, 0)]);
    let mut got = [0u8; 16];
    r.mem.read_slice(&mut got, GuestAddress(page)).unwrap();
    assert_eq!(got, [0; 16], "the inflated page was dropped");
    r.mem
        .read_slice(&mut got, GuestAddress(page + 4096))
        .unwrap();
    assert_eq!(got, [0xcd; 16], "its neighbour was not");
    let c = b.counters();
    assert_eq!((c.inflate_count, c.event_fails), (1, 1));
    // Deflate: acknowledged, nothing touched.
    r.add_chain(1, &[(BUFFERS, 4, false)]);
    assert!(b.process_queue(1));
    assert_eq!(r.used(1).len(), 1);
    // A writable buffer is not a frame number array.
    r.add_chain(0, &[(BUFFERS, 4, true)]);
    assert!(b.process_queue(0));
    assert_eq!(b.counters().event_fails, 2);
}

#[test]
fn the_target_and_actual_sizes_are_in_configuration_space() {
    let mut b = Balloon::new(256, true, 0);
    assert_ne!(b.features() & (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM), 0);
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    assert_eq!(c, [0, 1, 0, 0, 0, 0, 0, 0]);
    b.write_config(4, &100u32.to_le_bytes());
    // num_pages is the host's: a guest write is ignored.
    b.write_config(0, &7u32.to_le_bytes());
    b.set_target_pages(512);
    b.read_config(0, &mut c);
    assert_eq!(c, [0, 2, 0, 0, 100, 0, 0, 0]);
    assert_eq!(b.actual_pages(), 100);
    let state = b.save();
    let r = Balloon::restore(&state);
    assert_eq!((r.target_pages(), r.actual_pages()), (512, 100));
}

#[test]
fn statistics_are_read_held_and_handed_back_every_interval() {
    let mut b = Balloon::new(0, false, 1);
    assert_eq!(b.queue_max_sizes().len(), 3);
    let mut r = started(&mut b);
    // Two statistics: free memory (tag 4) and total memory (tag 5), and one
    // with a tag virtio does not define.
    let mut buf = Vec::new();
    for (tag, val) in [(4u16, 1000u64), (5, 4096), (999, 1)] {
        buf.extend_from_slice(&tag.to_le_bytes());
        buf.extend_from_slice(&val.to_le_bytes());
    }
    r.mem.write_slice(&buf, GuestAddress(BUFFERS)).unwrap();
    r.add_chain(2, &[(BUFFERS, buf.len() as u32, false)]);
    assert!(b.process_queue(2));
    assert!(r.used(2).is_empty(), "held until the poll");
    let stats = b.stats().unwrap();
    assert_eq!(stats.get(&4), Some(&1000));
    assert_eq!(stats.get(&5), Some(&4096));
    assert_eq!(stats.len(), 2);
    // A snapshot now gives the held buffer back to the ring.
    assert_eq!(b.queue_states().unwrap()[2].next_avail, 0);
    let wait = b.throttled_for().expect("a poll is due");
    assert!(wait <= Duration::from_secs(1));
    assert!(b.process_timer(), "too early: nothing");
    assert!(r.used(2).is_empty());
    std::thread::sleep(wait);
    assert!(b.process_timer());
    assert_eq!(r.used(2).len(), 1);
    assert_eq!(b.throttled_for(), None);
    assert!(b.set_stats_interval(0).is_err());
    assert!(b.set_stats_interval(5).is_ok());
    assert!(Balloon::new(0, false, 0).set_stats_interval(1).is_err());
}

#[test]
fn huge_or_unreadable_requests_end_quickly_and_are_counted() {
    let mut b = Balloon::new(16, false, 1);
    let mut r = started(&mut b);
    let t = std::time::Instant::now();
    // 4 GiB of "frame numbers" outside guest memory, then more than a
    // request may carry inside it.
    r.add_chain(0, &[(0x1_0000_0000, 0xffff_fffc, false)]);
    r.add_chain(0, &[(BUFFERS, (MAX_PFNS_PER_REQUEST + 1) * 4, false)]);
    // A statistics buffer of 4 GiB outside memory.
    r.add_chain(2, &[(0x1_0000_0000, 0xffff_fff0, false)]);
    assert!(b.process_queue(0));
    assert!(b.process_queue(2));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(r.used(0).len(), 2);
    assert_eq!(b.counters().event_fails, 2);
    assert_eq!(b.counters().stats_update_fails, 1);
}
