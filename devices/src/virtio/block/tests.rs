//! Request handling against guest memory built in the test: every request type
//! and the malformed cases a hostile guest can produce.

use std::io::Write;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

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

/// A disk image with a known pattern: byte i is (i * 7) mod 251.
fn image(sectors: u64) -> (tempfile_path::TempPath, Vec<u8>) {
    let bytes: Vec<u8> = (0..sectors * SECTOR_SIZE)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let p = tempfile_path::TempPath::new("img");
    std::fs::File::create(&p.0)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    (p, bytes)
}

/// Minimal unique temp paths, removed on drop.
mod tempfile_path {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    pub struct TempPath(pub PathBuf);
    impl TempPath {
        pub fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::SeqCst);
            TempPath(std::env::temp_dir().join(format!("vmm-blk-{}-{tag}-{n}", std::process::id())))
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Block,
    irq: Arc<CountingIrq>,
    next_desc: u16,
    avail_idx: u16,
}

impl Harness {
    fn new(path: &std::path::Path, read_only: bool) -> Self {
        Self::with_event_idx(path, read_only, false)
    }

    fn with_event_idx(path: &std::path::Path, read_only: bool, event_idx: bool) -> Self {
        let mem = crate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)], false).unwrap();
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_ready(true);
        q.set_event_idx(event_idx);
        assert!(q.is_valid(&mem));
        let mut dev = Block::open(path, read_only, Some("serial-0123")).unwrap();
        let irq = Arc::new(CountingIrq::default());
        dev.activate(mem.clone(), vec![q], Interrupt::new(irq.clone()))
            .unwrap();
        Harness {
            mem,
            dev,
            irq,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC_TABLE + u64::from(index) * 16;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Adds a chain of (addr, len, writable) descriptors; returns the head index.
    fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = self.next_desc;
            let last = i + 1 == descs.len();
            let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(index, addr, len, flags, index + 1);
            self.next_desc += 1;
        }
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let slot = AVAIL_RING + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// (id, len) of used-ring entry `i`.
    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED_RING + 4 + u64::from(i) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn process(&mut self) -> bool {
        self.dev.process_queue(0)
    }
}

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x100;

/// One request of `kind` at `sector` with one data buffer of `len` bytes.
fn simple(h: &mut Harness, kind: u32, sector: u64, len: u32, data_writable: bool) {
    h.header(HDR, kind, sector);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.add_chain(&[
        (HDR, 16, false),
        (BUF, len, data_writable),
        (STATUS, 1, true),
    ]);
}

#[test]
fn read_returns_file_bytes_with_ok_status() {
    let (p, bytes) = image(8);
    let mut h = Harness::new(&p.0, false);
    simple(&mut h, VIRTIO_BLK_T_IN, 2, 1024, true);
    assert!(h.process());
    let mut got = vec![0u8; 1024];
    h.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got, bytes[1024..2048]);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used(0), (0, 1025));
    assert_eq!(h.irq.count(), 1);
}

#[test]
fn write_lands_in_the_file_byte_exact() {
    let (p, mut bytes) = image(8);
    let mut h = Harness::new(&p.0, false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 13) as u8 ^ 0xa5).collect();
    h.mem.write_slice(&pattern, GuestAddress(BUF)).unwrap();
    simple(&mut h, VIRTIO_BLK_T_OUT, 5, 1024, false);
    assert!(h.process());
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.used(0).1, 1);
    bytes[5 * 512..7 * 512].copy_from_slice(&pattern);
    assert_eq!(std::fs::read(&p.0).unwrap(), bytes);
}

#[test]
fn scattered_buffers_and_flush() {
    let (p, bytes) = image(8);
    let mut h = Harness::new(&p.0, false);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    h.add_chain(&[
        (HDR, 16, false),
        (BUF, 512, true),
        (BUF + 0x2000, 1024, true),
        (STATUS, 1, true),
    ]);
    h.header(HDR + 0x40, VIRTIO_BLK_T_FLUSH, 0);
    h.add_chain(&[(HDR + 0x40, 16, false), (STATUS + 1, 1, true)]);
    assert!(h.process());
    let mut a = vec![0u8; 512];
    let mut b = vec![0u8; 1024];
    h.mem.read_slice(&mut a, GuestAddress(BUF)).unwrap();
    h.mem
        .read_slice(&mut b, GuestAddress(BUF + 0x2000))
        .unwrap();
    assert_eq!(a, bytes[..512]);
    assert_eq!(b, bytes[512..1536]);
    assert_eq!((h.status(STATUS), h.status(STATUS + 1)), (0, 0));
    assert_eq!(h.used_idx(), 2);
}

#[test]
fn get_id_returns_the_serial() {
    let (p, _) = image(1);
    let mut h = Harness::new(&p.0, false);
    simple(&mut h, VIRTIO_BLK_T_GET_ID, 0, 20, true);
    assert!(h.process());
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..11], b"serial-0123");
    assert_eq!(h.status(STATUS), 0);
    assert_eq!(h.used(0).1, 21);
}

#[test]
fn write_to_a_read_only_disk_is_ioerr_and_leaves_the_file() {
    let (p, bytes) = image(4);
    let mut h = Harness::new(&p.0, true);
    assert_ne!(h.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    h.mem.write_slice(&[0u8; 512], GuestAddress(BUF)).unwrap();
    simple(&mut h, VIRTIO_BLK_T_OUT, 0, 512, false);
    assert!(h.process());
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(std::fs::read(&p.0).unwrap(), bytes);
}

#[test]
fn malformed_requests_get_ioerr() {
    let (p, bytes) = image(4);
    type Setup = Box<dyn Fn(&mut Harness)>;
    let cases: Vec<(&str, Setup)> = vec![
        (
            "read past the end",
            Box::new(|h| simple(h, VIRTIO_BLK_T_IN, 3, 1024, true)),
        ),
        (
            "sector overflow",
            Box::new(|h| simple(h, VIRTIO_BLK_T_IN, u64::MAX, 512, true)),
        ),
        (
            "partial sector",
            Box::new(|h| simple(h, VIRTIO_BLK_T_OUT, 0, 100, false)),
        ),
        (
            "zero-length data",
            Box::new(|h| simple(h, VIRTIO_BLK_T_IN, 0, 0, true)),
        ),
        (
            "IN into a read-only buffer",
            Box::new(|h| simple(h, VIRTIO_BLK_T_IN, 0, 512, false)),
        ),
        (
            "OUT from a write-only buffer",
            Box::new(|h| simple(h, VIRTIO_BLK_T_OUT, 0, 512, true)),
        ),
        (
            "data outside guest memory",
            Box::new(|h| {
                h.header(HDR, VIRTIO_BLK_T_IN, 0);
                h.add_chain(&[
                    (HDR, 16, false),
                    (MEM_SIZE as u64 - 256, 512, true),
                    (STATUS, 1, true),
                ]);
            }),
        ),
        (
            "huge length",
            Box::new(|h| {
                h.header(HDR, VIRTIO_BLK_T_IN, 0);
                h.add_chain(&[
                    (HDR, 16, false),
                    (BUF, u32::MAX - 511, true),
                    (STATUS, 1, true),
                ]);
            }),
        ),
        (
            "short header",
            Box::new(|h| {
                h.header(HDR, VIRTIO_BLK_T_IN, 0);
                h.add_chain(&[(HDR, 8, false), (BUF, 512, true), (STATUS, 1, true)]);
            }),
        ),
        (
            "header outside guest memory",
            Box::new(|h| {
                h.add_chain(&[
                    (u64::MAX - 8, 16, false),
                    (BUF, 512, true),
                    (STATUS, 1, true),
                ]);
            }),
        ),
    ];
    for (name, setup) in cases {
        let mut h = Harness::new(&p.0, false);
        h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        setup(&mut h);
        assert!(h.process(), "{name}: device stays usable");
        assert_eq!(h.status(STATUS), VIRTIO_BLK_S_IOERR as u8, "{name}");
        assert_eq!(h.used_idx(), 1, "{name}");
        assert_eq!(h.used(0).1, 1, "{name}: only the status byte was written");
        assert_eq!(
            std::fs::read(&p.0).unwrap(),
            bytes,
            "{name}: file unchanged"
        );
    }
}

#[test]
fn unknown_request_type_is_unsupported() {
    let (p, _) = image(1);
    let mut h = Harness::new(&p.0, false);
    simple(&mut h, 0x1234, 0, 512, true);
    assert!(h.process());
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn chain_without_a_writable_status_marks_the_device_broken() {
    let (p, _) = image(1);
    let mut h = Harness::new(&p.0, false);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    h.add_chain(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, false)]);
    assert!(!h.process());
    // The chain is still returned, so the driver is not left waiting forever.
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used(0).1, 0);
}

#[test]
fn descriptor_loop_terminates() {
    let (p, _) = image(1);
    let mut h = Harness::new(&p.0, false);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ... : the chain iterator stops after the queue size.
    h.write_desc(0, HDR, 16, F_NEXT, 1);
    h.write_desc(1, BUF, 512, F_NEXT | F_WRITE, 0);
    h.publish(0);
    // The cut-off chain ends in a writable buffer, taken as the status byte: the
    // request fails with IOERR and the device goes on.
    assert!(h.process());
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.status(BUF), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn next_index_past_the_queue_ends_the_chain() {
    let (p, _) = image(1);
    let mut h = Harness::new(&p.0, false);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    h.write_desc(0, HDR, 16, F_NEXT, 1);
    h.write_desc(1, BUF, 512, F_NEXT | F_WRITE, 500);
    h.publish(0);
    // The chain ends at descriptor 1, taken as the status byte: IOERR.
    assert!(h.process());
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.status(BUF), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn available_index_far_ahead_marks_the_device_broken() {
    let (p, _) = image(1);
    let mut h = Harness::new(&p.0, false);
    h.mem
        .write_obj(QSIZE + 5, GuestAddress(AVAIL_RING + 2))
        .unwrap();
    assert!(!h.process());
    assert_eq!(h.used_idx(), 0);
}

#[test]
fn config_space_reports_capacity_seg_max_and_block_size() {
    let (p, _) = image(8);
    let h = Harness::new(&p.0, false);
    let mut cap = [0u8; 8];
    h.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut w = [0u8; 4];
    h.dev.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), SEG_MAX);
    h.dev.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 512);
    h.dev.read_config(1000, &mut w);
    assert_eq!(w, [0; 4]);
    h.dev.read_config(u64::MAX, &mut w);
    assert_eq!(w, [0; 4]);
}

#[test]
fn open_refuses_a_locked_image_directories_and_empty_files() {
    let (p, _) = image(1);
    let _first = Block::open(&p.0, false, None).unwrap();
    assert!(matches!(
        Block::open(&p.0, false, None),
        Err(Error::InUse(_))
    ));
    assert!(matches!(
        Block::open(&p.0, true, None),
        Err(Error::InUse(_))
    ));
    assert!(matches!(
        Block::open(&std::env::temp_dir(), true, None),
        Err(Error::Directory(_))
    ));
    let empty = tempfile_path::TempPath::new("empty");
    std::fs::File::create(&empty.0).unwrap();
    assert!(matches!(
        Block::open(&empty.0, false, None),
        Err(Error::TooSmall(_))
    ));
    assert!(matches!(
        Block::open(&p.0, true, Some("x".repeat(21).as_str())),
        Err(Error::IdTooLong(_))
    ));
}

#[test]
fn read_only_images_may_be_shared() {
    let (p, _) = image(1);
    let _a = Block::open(&p.0, true, None).unwrap();
    let _b = Block::open(&p.0, true, None).unwrap();
    assert!(matches!(
        Block::open(&p.0, false, None),
        Err(Error::InUse(_))
    ));
}

#[test]
fn indirect_descriptor_tables_are_followed() {
    let (p, bytes) = image(4);
    let mut h = Harness::new(&p.0, false);
    assert_ne!(h.dev.features() & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    const TABLE: u64 = DATA + 0x3000;
    h.header(HDR, VIRTIO_BLK_T_IN, 1);
    // The indirect table: header, 512-byte buffer, status.
    let table = [
        (HDR, 16u32, F_NEXT, 1u16),
        (BUF, 512, F_NEXT | F_WRITE, 2),
        (STATUS, 1, F_WRITE, 0),
    ];
    for (i, (addr, len, flags, next)) in table.iter().enumerate() {
        let at = TABLE + i as u64 * 16;
        h.mem.write_obj(*addr, GuestAddress(at)).unwrap();
        h.mem.write_obj(*len, GuestAddress(at + 8)).unwrap();
        h.mem.write_obj(*flags, GuestAddress(at + 12)).unwrap();
        h.mem.write_obj(*next, GuestAddress(at + 14)).unwrap();
    }
    const F_INDIRECT: u16 = 4;
    h.write_desc(0, TABLE, 48, F_INDIRECT, 0);
    h.publish(0);
    assert!(h.process());
    let mut got = vec![0u8; 512];
    h.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got, bytes[512..1024]);
    assert_eq!(h.status(STATUS), 0);
    assert_eq!(h.used(0).1, 513);
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let (p, _) = image(4);
    let mut h = Harness::with_event_idx(&p.0, false, true);
    // used_event (after the avail ring) = 5: interrupt only once the used index passes 5.
    h.mem
        .write_obj(5u16, GuestAddress(AVAIL_RING + 4 + 2 * u64::from(QSIZE)))
        .unwrap();
    for _ in 0..2 {
        h.next_desc = 0; // the previous chain is done: reuse its descriptors
        simple(&mut h, VIRTIO_BLK_T_FLUSH, 0, 512, true);
        assert!(h.process());
    }
    assert_eq!(h.used_idx(), 2);
    assert_eq!(h.irq.count(), 0, "no interrupt before used_event");
    for _ in 0..4 {
        h.next_desc = 0;
        simple(&mut h, VIRTIO_BLK_T_FLUSH, 0, 512, true);
        assert!(h.process());
    }
    assert_eq!(h.irq.count(), 1, "one interrupt when used_event is crossed");
}

#[test]
fn a_chain_longer_than_the_queue_marks_the_device_broken() {
    // An indirect table may hold up to 65535 descriptors; a driver must not
    // make a chain longer than the queue (16 here). The chain is returned empty.
    let (p, _) = image(1);
    let mut h = Harness::new(&p.0, false);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    let table = DATA + 0x4000;
    for i in 0..17u64 {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, F_NEXT),
            16 => (STATUS, 1, F_WRITE),
            _ => (BUF + (i - 1) * 512, 512, F_NEXT | F_WRITE),
        };
        let at = table + i * 16;
        h.mem.write_obj(addr, GuestAddress(at)).unwrap();
        h.mem.write_obj(len as u32, GuestAddress(at + 8)).unwrap();
        h.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        h.mem
            .write_obj((i + 1) as u16, GuestAddress(at + 14))
            .unwrap();
    }
    h.mem.write_obj(0x5au8, GuestAddress(STATUS)).unwrap();
    h.write_desc(0, table, 17 * 16, 4, 0); // INDIRECT
    h.publish(0);
    assert!(!h.process());
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used(0), (0, 0));
    assert_eq!(h.status(STATUS), 0x5a, "nothing was written");
}

#[test]
fn block_state_round_trips_and_reopens_the_image() {
    use crate::persist::Persist;
    let (p, _) = image(16);
    let mut h = Harness::new(&p.0, false);
    let saved = h.dev.save();
    assert_eq!(saved.serial, b"serial-0123");
    assert_eq!((saved.capacity, saved.read_only), (16, false));
    // The image is locked by the running device: a second restore fails
    // cleanly, as a second VM on the same writable disk would.
    assert!(matches!(Block::restore((), &saved), Err(Error::InUse(_))));
    simple(&mut h, VIRTIO_BLK_T_IN, 0, 512, true);
    assert!(h.process());
    let queues = h.dev.queue_states().unwrap();
    assert_eq!(
        (queues.len(), queues[0].next_avail, queues[0].next_used),
        (1, 1, 1)
    );
    drop(h);
    let back = Block::restore((), &saved).unwrap();
    assert_eq!(back.save(), saved);
}

#[test]
fn a_rate_limited_device_leaves_requests_in_the_ring_until_its_timer() {
    use crate::rate_limiter::BucketConfig;
    let (p, bytes) = image(16);
    let mut h = Harness::new(&p.0, false);
    // 2 KiB per 100 ms: two 1 KiB reads now, the next one 50 ms later.
    h.dev.update_rate_limiter(
        Some(BucketConfig {
            size: 2048,
            one_time_burst: 0,
            refill_time_ms: 100,
        }),
        None,
    );
    for i in 0..4u64 {
        let hdr = HDR + i * 0x20;
        h.header(hdr, VIRTIO_BLK_T_IN, i * 2);
        h.add_chain(&[
            (hdr, 16, false),
            (BUF + i * 0x1000, 1024, true),
            (STATUS + i, 1, true),
        ]);
    }
    assert!(h.process());
    assert_eq!(h.used_idx(), 2);
    // The two left are the driver's again in a snapshot taken now.
    let states = h.dev.queue_states().unwrap();
    assert_eq!(states[0].next_avail, 2);
    let wait = h.dev.throttled_for().expect("throttled");
    assert!(wait <= std::time::Duration::from_millis(50), "{wait:?}");
    // A kick before the timer serves nothing.
    assert!(h.process());
    assert_eq!(h.used_idx(), 2);
    let mut timer_passes = 0;
    while h.used_idx() < 4 {
        let wait = h.dev.throttled_for().expect("still throttled");
        std::thread::sleep(wait);
        assert!(h.dev.process_timer());
        timer_passes += 1;
        assert!(timer_passes < 10);
    }
    assert_eq!(h.dev.throttled_for(), None);
    for i in 0..4u64 {
        let mut got = vec![0u8; 1024];
        h.mem
            .read_slice(&mut got, GuestAddress(BUF + i * 0x1000))
            .unwrap();
        let at = (i * 1024) as usize;
        assert_eq!(got, bytes[at..at + 1024], "read {i}");
        assert_eq!(h.status(STATUS + i), VIRTIO_BLK_S_OK as u8);
        assert_eq!(h.used(i as u16).0, (i * 3) as u32);
    }
    let m: std::collections::HashMap<_, _> = h.dev.metrics().into_iter().collect();
    assert!(m["rate_limiter_throttled_events"] >= 2);
    assert_eq!(m["rate_limiter_event_count"], timer_passes);
    assert_eq!(m["read_count"], 4);
}
