//! The persistent memory device against guest memory built in the test and
//! a real file in a temporary directory.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::persist::Persist;
use crate::test_util::{Rings, BUFFERS as DATA};

/// A file of `len` bytes, each `fill`, in its own temporary directory.
fn file(name: &str, len: usize, fill: u8) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-pmem-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("backing");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&vec![fill; len])
        .unwrap();
    path
}

fn activated(dev: &mut Pmem) -> Rings {
    let rings = Rings::new(1);
    rings.activate(dev, QUEUE_SIZE);
    rings
}

/// The mapping's bytes at `offset`, as the guest would load them.
fn mapped(dev: &Pmem, offset: usize, len: usize) -> Vec<u8> {
    let m = dev.device_memory().unwrap();
    assert!(offset + len <= m.len as usize);
    // SAFETY: the range is inside the device's live mapping (checked above).
    unsafe { std::slice::from_raw_parts((m.host_addr as *const u8).add(offset), len).to_vec() }
}

/// Stores `bytes` at `offset` of the mapping, as the guest would.
fn store(dev: &Pmem, offset: usize, bytes: &[u8]) {
    let m = dev.device_memory().unwrap();
    assert!(offset + bytes.len() <= m.len as usize);
    // SAFETY: the range is inside the device's live mapping (checked above),
    // which is writable.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (m.host_addr as *mut u8).add(offset),
            bytes.len(),
        )
    };
}

/// A FLUSH request at DATA, its response at DATA + 0x100.
fn flush(rings: &mut Rings) {
    rings
        .mem
        .write_obj(REQ_FLUSH.to_le(), GuestAddress(DATA))
        .unwrap();
    rings
        .mem
        .write_obj(0xffu32, GuestAddress(DATA + 0x100))
        .unwrap();
    rings.add_chain(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
}

fn response(rings: &Rings, at: u64) -> u32 {
    rings.mem.read_obj(GuestAddress(at)).unwrap()
}

#[test]
fn the_region_is_the_file_rounded_up_to_2_mib_and_the_config_says_where() {
    let path = file("config", 3 << 20, 0x5a);
    let mut dev = Pmem::open(&path, false).unwrap();
    let m = dev.device_memory().unwrap();
    assert_eq!((m.len, m.read_only, m.guest_addr), (4 << 20, false, None));
    dev.set_device_memory_address(0x1_4000_0000);
    let mut config = [0u8; 16];
    dev.read_config(0, &mut config);
    assert_eq!(
        u64::from_le_bytes(config[..8].try_into().unwrap()),
        0x1_4000_0000
    );
    assert_eq!(u64::from_le_bytes(config[8..].try_into().unwrap()), 4 << 20);
    // The file's bytes, then zeroes past its end.
    assert_eq!(mapped(&dev, 0, 4), [0x5a; 4]);
    assert_eq!(mapped(&dev, (3 << 20) - 2, 4), [0x5a, 0x5a, 0, 0]);
    // The configuration space cannot be written.
    dev.write_config(0, &[1, 2, 3, 4]);
    dev.read_config(0, &mut config);
    assert_eq!(
        u64::from_le_bytes(config[..8].try_into().unwrap()),
        0x1_4000_0000
    );
    assert_eq!(dev.counters().cfg_fails, 1);
}

#[test]
fn a_flush_writes_the_guest_s_stores_to_the_file_and_answers_ok() {
    let path = file("flush", 1 << 20, 0);
    let mut dev = Pmem::open(&path, false).unwrap();
    let mut rings = activated(&mut dev);
    store(&dev, 4096, b"persisted");
    flush(&mut rings);
    assert!(dev.process_queue(0));
    assert_eq!(rings.used(0), [(0, 4)]);
    assert_eq!(response(&rings, DATA + 0x100), RESP_OK);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4096..4105], b"persisted");
    assert_eq!(on_disk.len(), 1 << 20, "the file keeps its size");
    assert_eq!(dev.counters().flush_count, 1);
}

#[test]
fn a_read_only_device_never_changes_its_file() {
    let path = file("ro", 1 << 20, 7);
    let mut dev = Pmem::open(&path, true).unwrap();
    assert!(dev.device_memory().unwrap().read_only);
    let mut rings = activated(&mut dev);
    // Even a store that reached the mapping (a host without read-only
    // memory slots) stays private.
    store(&dev, 0, b"changed");
    flush(&mut rings);
    assert!(dev.process_queue(0));
    assert_eq!(response(&rings, DATA + 0x100), RESP_OK);
    assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 1 << 20]);
}

#[test]
fn malformed_requests_get_an_error_or_nothing_and_the_device_keeps_serving() {
    let path = file("bad", 1 << 20, 0);
    let mut dev = Pmem::open(&path, false).unwrap();
    let mut rings = activated(&mut dev);
    // An unknown type.
    rings
        .mem
        .write_obj(9u32.to_le(), GuestAddress(DATA))
        .unwrap();
    rings.add_chain(0, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
    // A header of the wrong length.
    rings.add_chain(0, &[(DATA + 0x200, 8, false), (DATA + 0x300, 4, true)]);
    // No response descriptor at all.
    rings.add_chain(0, &[(DATA + 0x400, 4, false)]);
    // A response too short.
    rings.add_chain(0, &[(DATA + 0x500, 4, false), (DATA + 0x600, 2, true)]);
    assert!(dev.process_queue(0));
    assert_eq!(rings.used(0), [(0, 4), (2, 4), (4, 0), (5, 0)]);
    assert_eq!(response(&rings, DATA + 0x100), RESP_EIO);
    assert_eq!(response(&rings, DATA + 0x300), RESP_EIO);
    assert_eq!(dev.counters().event_fails, 4);
    // A good flush after them still works.
    flush(&mut rings);
    assert!(dev.process_queue(0));
    assert_eq!(response(&rings, DATA + 0x100), RESP_OK);
}

#[test]
fn flushes_of_one_notification_share_one_msync_and_the_limiter_holds_the_next() {
    let path = file("limit", 1 << 20, 0);
    let mut dev = Pmem::open(&path, false).unwrap();
    let ops = BucketConfig {
        size: 1,
        one_time_burst: 0,
        refill_time_ms: 40,
    };
    dev.update_rate_limiter(None, Some(ops));
    let mut rings = activated(&mut dev);
    flush(&mut rings);
    flush(&mut rings);
    assert!(dev.process_queue(0));
    assert_eq!(rings.used(0).len(), 2);
    assert_eq!(dev.counters().flush_count, 1);
    flush(&mut rings);
    assert!(dev.process_queue(0));
    assert_eq!(rings.used(0).len(), 2, "held by the limiter");
    let wait = dev.throttled_for().expect("throttled");
    std::thread::sleep(wait);
    assert!(dev.process_timer());
    assert_eq!(rings.used(0).len(), 3);
    assert_eq!(dev.counters().rate_limiter_event_count, 1);
    let metrics = dev.metrics();
    assert!(
        metrics.contains(&("rate_limiter_throttled_events", 1)),
        "{metrics:?}"
    );
}

#[test]
fn bad_files_are_refused_with_their_reason() {
    let empty = file("empty", 0, 0);
    assert!(matches!(Pmem::open(&empty, false), Err(Error::Empty(_))));
    assert!(Pmem::open(&empty, false)
        .err()
        .unwrap()
        .to_string()
        .contains("Error backing file size is 0"));
    let dir = empty.parent().unwrap();
    assert!(matches!(Pmem::open(dir, false), Err(Error::NotAFile(_))));
    assert!(matches!(
        Pmem::open(&dir.join("missing"), false),
        Err(Error::Open { .. })
    ));
    // A writable device holds its file alone.
    let path = file("locked", 4096, 0);
    let _first = Pmem::open(&path, false).unwrap();
    assert!(matches!(Pmem::open(&path, false), Err(Error::InUse(_))));
    assert!(matches!(Pmem::open(&path, true), Err(Error::InUse(_))));
}

#[test]
fn a_saved_device_comes_back_at_its_address_unless_its_file_changed_size() {
    let path = file("persist", 1 << 20, 3);
    let mut dev = Pmem::open(&path, false).unwrap();
    dev.set_device_memory_address(0x2_0000_0000);
    let state = dev.save();
    assert_eq!(state.size, 2 << 20);
    drop(dev);
    let back = Pmem::restore((), &state).unwrap();
    assert_eq!(
        back.device_memory().unwrap().guest_addr,
        Some(0x2_0000_0000)
    );
    assert_eq!(back.save(), state);
    drop(back);
    // Grown past the next 2 MiB: the driver's region would be wrong.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    assert!(matches!(
        Pmem::restore((), &state),
        Err(Error::SizeChanged { .. })
    ));
}
