//! The device against guest memory built in the test: packets through the
//! transmit queue reach real Unix sockets, answers come back in receive
//! buffers, malformed chains are dropped without stopping the device.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use crate::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;

use super::packet::{op, HOST_CID};
use super::*;
use crate::test_util::CountingIrq;

const MEM_SIZE: usize = 0x100000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const BUFS: u64 = 0x40000;
const CID: u64 = 3;

/// Rings of queue i at 0x1000 + i * 0x4000.
fn ring(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + q as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Vsock,
    dir: std::path::PathBuf,
    next_desc: [u16; 3],
    avail_idx: [u16; 3],
    next_buf: u64,
}

impl Harness {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-vsockdev-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = crate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)], false).unwrap();
        let queues = (0..3)
            .map(|i| {
                let (d, a, u) = ring(i);
                let mut q = Queue::new(QUEUE_SIZE).unwrap();
                q.set_size(QSIZE);
                q.set_desc_table_address(Some(d as u32), Some(0));
                q.set_avail_ring_address(Some(a as u32), Some(0));
                q.set_used_ring_address(Some(u as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect();
        let muxer = Muxer::new(CID, &dir.join("v.sock")).unwrap();
        let mut dev = Vsock::new(muxer);
        dev.activate(
            mem.clone(),
            queues,
            Interrupt::new(Arc::new(CountingIrq::default())),
        )
        .unwrap();
        Harness {
            mem,
            dev,
            dir,
            next_desc: [0; 3],
            avail_idx: [0; 3],
            next_buf: BUFS,
        }
    }

    /// A buffer of `len` bytes in guest memory holding `bytes`.
    fn buffer(&mut self, bytes: &[u8], len: u32) -> u64 {
        let at = self.next_buf;
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        self.next_buf += (u64::from(len) + 0xfff) & !0xfff;
        at
    }

    fn add_chain(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
        let (table, avail, _) = ring(q);
        let head = self.next_desc[q];
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = self.next_desc[q];
            let flags =
                if writable { F_WRITE } else { 0 } | if i + 1 < descs.len() { F_NEXT } else { 0 };
            let at = table + u64::from(index % QSIZE) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj((index + 1) % QSIZE, GuestAddress(at + 14))
                .unwrap();
            self.next_desc[q] += 1;
        }
        let slot = avail + 4 + u64::from(self.avail_idx[q] % QSIZE) * 2;
        self.mem
            .write_obj(head % QSIZE, GuestAddress(slot))
            .unwrap();
        self.avail_idx[q] += 1;
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    /// The guest sends `h` with `data`, header and data in two descriptors.
    fn send(&mut self, h: Header, data: &[u8]) {
        let hdr = self.buffer(&h.to_bytes(), HDR_SIZE as u32);
        if data.is_empty() {
            self.add_chain(TX, &[(hdr, HDR_SIZE as u32, false)]);
        } else {
            let d = self.buffer(data, data.len() as u32);
            self.add_chain(
                TX,
                &[(hdr, HDR_SIZE as u32, false), (d, data.len() as u32, false)],
            );
        }
        assert!(self.dev.process_queue(TX));
    }

    fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let (_, _, used) = ring(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = used + 4 + u64::from(i % QSIZE) * 8;
                (
                    self.mem.read_obj(GuestAddress(at)).unwrap(),
                    self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    /// Posts a receive buffer of `len` bytes; returns its address.
    fn post_rx(&mut self, len: u32) -> u64 {
        let at = self.buffer(&[], len);
        self.add_chain(RX, &[(at, len, true)]);
        at
    }

    fn packet_at(&self, at: u64) -> (Header, Vec<u8>) {
        let mut hdr = [0u8; HDR_SIZE];
        self.mem.read_slice(&mut hdr, GuestAddress(at)).unwrap();
        let h = Header::from_bytes(&hdr);
        let mut data = vec![0u8; h.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(at + HDR_SIZE as u64))
            .unwrap();
        (h, data)
    }
}

fn from_guest(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
    super::packet::from_guest(CID, src_port, dst_port, op, len)
}

#[test]
fn config_space_holds_the_guest_cid() {
    let h = Harness::new("cfg");
    let mut b = [0u8; 8];
    h.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
}

#[test]
fn a_guest_stream_to_a_host_listener_carries_data_both_ways() {
    let mut h = Harness::new("stream");
    let listener = UnixListener::bind(h.dir.join("v.sock_80")).unwrap();
    let rx0 = h.post_rx(4096);
    h.send(from_guest(1025, 80, op::REQUEST, 0), &[]);
    assert_eq!(h.used(RX), [(0, HDR_SIZE as u32)]);
    let (resp, _) = h.packet_at(rx0);
    assert_eq!(
        (resp.op, resp.src_cid, resp.dst_port),
        (op::RESPONSE, HOST_CID, 1025)
    );
    let (mut host, _) = listener.accept().unwrap();
    h.send(from_guest(1025, 80, op::RW, 6), b"ping!\n");
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 6];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping!\n");
    assert_eq!(h.used(TX).len(), 2);
    // Host data reaches the guest's next buffer when the socket is ready.
    host.write_all(b"pong").unwrap();
    let rx1 = h.post_rx(4096);
    std::thread::sleep(Duration::from_millis(5));
    assert!(h.dev.process_backend());
    assert_eq!(h.used(RX)[1], (1, HDR_SIZE as u32 + 4));
    let (pkt, data) = h.packet_at(rx1);
    assert_eq!((pkt.op, data.as_slice()), (op::RW, &b"pong"[..]));
    let c = h.dev.counters();
    assert_eq!(
        (c.tx_packets, c.tx_bytes, c.rx_packets, c.rx_bytes),
        (2, 6, 2, 4)
    );
}

#[test]
fn malformed_transmit_chains_are_dropped_and_the_device_keeps_running() {
    let mut h = Harness::new("bad");
    // Too short for a header.
    let a = h.buffer(&[0u8; 10], 10);
    h.add_chain(TX, &[(a, 10, false)]);
    // A length past the chain's data.
    let hdr = from_guest(1, 2, op::RW, 100).to_bytes();
    let b = h.buffer(&hdr, HDR_SIZE as u32);
    h.add_chain(TX, &[(b, HDR_SIZE as u32, false)]);
    // A length over 64 KiB.
    let hdr = from_guest(1, 2, op::RW, 70000).to_bytes();
    let c = h.buffer(&hdr, 80000);
    h.add_chain(TX, &[(c, 80000, false)]);
    // A writable descriptor, and one outside guest memory.
    let d = h.buffer(
        &from_guest(1, 2, op::REQUEST, 0).to_bytes(),
        HDR_SIZE as u32,
    );
    h.add_chain(TX, &[(d, HDR_SIZE as u32, true)]);
    h.add_chain(TX, &[(0xfff_0000, HDR_SIZE as u32, false)]);
    assert!(h.dev.process_queue(TX), "the device keeps running");
    assert_eq!(h.used(TX).len(), 5, "every chain is given back");
    assert_eq!(h.dev.counters().tx_dropped, 5);
    // A receive buffer too small for a header comes back empty.
    let small = h.buffer(&[], 16);
    h.add_chain(RX, &[(small, 16, true)]);
    h.send(from_guest(1, 9999, op::REQUEST, 0), &[]); // nobody listens: a reset is owed
    assert_eq!(h.used(RX), [(0, 0)]);
    let rx = h.post_rx(4096);
    assert!(h.dev.process_queue(RX));
    assert_eq!(h.used(RX)[1], (1, HDR_SIZE as u32));
    assert_eq!(h.packet_at(rx).0.op, op::RST);
}

#[test]
fn after_a_transport_reset_nothing_reaches_the_guest_until_its_driver_handled_it() {
    let mut h = Harness::new("reset");
    let ev = h.buffer(&[0xff; 4], 4);
    h.add_chain(EVT, &[(ev, 4, true)]);
    assert!(h.dev.send_transport_reset());
    assert_eq!(h.used(EVT), [(0, 4)]);
    let mut id = [0xffu8; 4];
    h.mem.read_slice(&mut id, GuestAddress(ev)).unwrap();
    assert_eq!(id, [0, 0, 0, 0], "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    // A host program connects at once; the guest has buffers.
    let mut host = std::os::unix::net::UnixStream::connect(h.dir.join("v.sock")).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    h.post_rx(4096);
    std::thread::sleep(Duration::from_millis(5));
    assert!(h.dev.process_backend());
    // The VMM's own kick of every queue after a restore is not the driver.
    assert!(h.dev.process_queue(EVT));
    assert!(h.used(RX).is_empty(), "the REQUEST waits for the driver");
    // The driver gives the event buffer back: the reset is handled.
    h.add_chain(EVT, &[(ev, 4, true)]);
    assert!(h.dev.process_queue(EVT));
    assert_eq!(h.used(RX).len(), 1, "now the REQUEST goes");
}

#[test]
fn a_restored_device_resets_exactly_the_connections_its_snapshot_had_open() {
    use crate::persist::Persist;
    let mut h = Harness::new("restore");
    let listener = UnixListener::bind(h.dir.join("v.sock_80")).unwrap();
    h.post_rx(4096);
    h.send(from_guest(1025, 80, op::REQUEST, 0), &[]);
    let _host = listener.accept().unwrap();
    let saved = h.dev.save();
    assert_eq!(saved.open_connections, Some(vec![(80, 1025)]));
    // The clone: a new socket, the same guest memory and rings.
    let uds = h.dir.join("clone.sock");
    let Ok(mut clone) = Vsock::restore(Muxer::new(CID, &uds).unwrap(), &saved);
    let queues = h.dev.queue_states().unwrap();
    let queues = queues
        .into_iter()
        .map(|q| crate::virtio::QueueSnapshot::from(q).to_queue().unwrap())
        .collect();
    clone
        .activate(
            h.mem.clone(),
            queues,
            Interrupt::new(Arc::new(CountingIrq::default())),
        )
        .unwrap();
    h.dev = clone;
    assert!(h.dev.reset_after_restore(), "no transport reset is needed");
    assert!(h.used(EVT).is_empty(), "no event buffer was used");
    let rx = h.post_rx(4096);
    assert!(h.dev.process_queue(RX));
    let (pkt, _) = h.packet_at(rx);
    assert_eq!((pkt.op, pkt.src_port, pkt.dst_port), (op::RST, 80, 1025));
}
