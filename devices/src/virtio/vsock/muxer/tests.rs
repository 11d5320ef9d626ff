//! The muxer against real Unix sockets, driven as the guest would drive it
//! (headers in, headers out).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::*;

const CID: u64 = 3;

/// A fresh directory for one test's sockets.
fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-vsock-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn from_guest(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
    crate::virtio::vsock::packet::from_guest(CID, src_port, dst_port, op, len)
}

/// Lets the muxer see socket events, then takes every packet it has.
fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
    std::thread::sleep(Duration::from_millis(5));
    m.process_events();
    let mut out = Vec::new();
    while let Some(p) = m.recv_pkt(4096) {
        out.push(p);
    }
    out
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn a_host_program_connects_to_a_guest_port_and_both_ways_carry_data() {
    let d = dir("host-init");
    let uds = d.join("v.sock");
    let mut m = Muxer::new(CID, &uds).unwrap();
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 52\nearly").unwrap();
    let pkts = drain(&mut m);
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].0;
    assert_eq!(
        (
            req.op,
            req.src_cid,
            req.dst_cid,
            req.dst_port,
            req.buf_alloc
        ),
        (op::REQUEST, HOST_CID, CID, 52, CONN_BUF)
    );
    let local = req.src_port;
    // The guest accepts; the host program reads OK first, then the data.
    m.send_pkt(&from_guest(52, local, op::RESPONSE, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}"));
    m.send_pkt(&from_guest(52, local, op::RW, 5), b"hello");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    // What the host program wrote after its CONNECT line is data.
    let pkts = drain(&mut m);
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!((pkts[0].0.op, pkts[0].0.len), (op::RW, 5));
    assert_eq!(pkts[0].1, b"early");
    // The host closes: the guest is told both directions are done.
    drop(host);
    let pkts = drain(&mut m);
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.flags),
        (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    );
    m.send_pkt(&from_guest(52, local, op::RST, 0), &[]);
    assert_eq!(m.connection_count(), 0);
    assert_eq!(
        m.counters(),
        MuxerCounters {
            added: 1,
            killed: 0,
            removed: 1
        }
    );
    drop(m);
    assert!(!uds.exists(), "the socket goes with the device");
}

#[test]
fn a_guest_connection_reaches_the_listener_at_uds_path_underscore_port() {
    let d = dir("guest-init");
    let uds = d.join("v.sock");
    let mut m = Muxer::new(CID, &uds).unwrap();
    let listener = UnixListener::bind(d.join("v.sock_1234")).unwrap();
    m.send_pkt(&from_guest(999, 1234, op::REQUEST, 0), &[]);
    let pkts = drain(&mut m);
    assert_eq!(pkts.len(), 1);
    let resp = pkts[0].0;
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (op::RESPONSE, 1234, 999)
    );
    let (mut host, _) = listener.accept().unwrap();
    m.send_pkt(&from_guest(999, 1234, op::RW, 3), b"abc");
    let mut got = [0u8; 3];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"abc");
    host.write_all(b"xyz").unwrap();
    let pkts = drain(&mut m);
    assert_eq!(pkts[0].1, b"xyz");
    // Nobody listens on another port: a reset.
    m.send_pkt(&from_guest(1000, 4321, op::REQUEST, 0), &[]);
    let pkts = drain(&mut m);
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (op::RST, 4321, 1000)
    );
    // The guest closes: its data goes out, then the host socket sees EOF.
    m.send_pkt(&from_guest(999, 1234, op::RW, 4), b"last");
    let mut shut = from_guest(999, 1234, op::SHUTDOWN, 0);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    m.send_pkt(&shut, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"last");
    let pkts = drain(&mut m);
    assert_eq!(pkts[0].0.op, op::RST);
    assert_eq!(m.connection_count(), 0);
    assert_eq!(
        m.counters(),
        MuxerCounters {
            added: 1,
            killed: 1,
            removed: 0
        },
        "the refused connection was never added"
    );
}

#[test]
fn the_host_never_sends_past_the_guests_credit() {
    let d = dir("credit");
    let uds = d.join("v.sock");
    let mut m = Muxer::new(CID, &uds).unwrap();
    let listener = UnixListener::bind(d.join("v.sock_7")).unwrap();
    let mut req = from_guest(50, 7, op::REQUEST, 0);
    req.buf_alloc = 100;
    m.send_pkt(&req, &[]);
    let _ = drain(&mut m);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 1000]).unwrap();
    let pkts = drain(&mut m);
    let sent: usize = pkts.iter().map(|p| p.1.len()).sum();
    assert_eq!(sent, 100, "exactly the guest's buffer");
    assert!(drain(&mut m).is_empty(), "nothing more without credit");
    // The guest consumed 60 bytes: 60 more may come.
    let mut upd = from_guest(50, 7, op::CREDIT_UPDATE, 0);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 60;
    m.send_pkt(&upd, &[]);
    let sent: usize = drain(&mut m).iter().map(|p| p.1.len()).sum();
    assert_eq!(sent, 60);
}

#[test]
fn a_guest_that_sends_past_its_credit_is_reset_and_nothing_grows_without_bound() {
    let d = dir("lie");
    let uds = d.join("v.sock");
    let mut m = Muxer::new(CID, &uds).unwrap();
    let listener = UnixListener::bind(d.join("v.sock_9")).unwrap();
    m.send_pkt(&from_guest(60, 9, op::REQUEST, 0), &[]);
    let _ = drain(&mut m);
    let (_host, _) = listener.accept().unwrap(); // never reads
    let chunk = vec![1u8; 64 * 1024];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..64 {
        m.send_pkt(&from_guest(60, 9, op::RW, chunk.len() as u32), &chunk);
        if let Some(c) = m.conns.get(&(9, 60)) {
            assert!(c.to_host.len() <= CONN_BUF as usize, "bounded");
            sent += chunk.len();
        } else {
            reset = true;
            break;
        }
    }
    assert!(
        reset,
        "the guest kept sending past {CONN_BUF} bytes of credit"
    );
    assert!(
        sent >= CONN_BUF as usize,
        "all the credit was usable: {sent}"
    );
    let pkts = drain(&mut m);
    assert_eq!(pkts.last().map(|p| p.0.op), Some(op::RST));
}

#[test]
fn stray_and_malformed_packets_are_dropped_or_reset_never_more() {
    let d = dir("stray");
    let uds = d.join("v.sock");
    let mut m = Muxer::new(CID, &uds).unwrap();
    // From another CID, or to one: dropped silently.
    let mut h = from_guest(1, 2, op::REQUEST, 0);
    h.src_cid = 4;
    m.send_pkt(&h, &[]);
    let mut h = from_guest(1, 2, op::REQUEST, 0);
    h.dst_cid = 7;
    m.send_pkt(&h, &[]);
    assert!(drain(&mut m).is_empty());
    // A datagram, data or a response for no connection: reset.
    let mut h = from_guest(1, 2, op::REQUEST, 0);
    h.kind = 2;
    m.send_pkt(&h, &[]);
    m.send_pkt(&from_guest(1, 3, op::RW, 2), b"hi");
    m.send_pkt(&from_guest(1, 4, op::RESPONSE, 0), &[]);
    let ops: Vec<u16> = drain(&mut m).iter().map(|p| p.0.op).collect();
    assert_eq!(ops, [op::RST, op::RST, op::RST]);
    // A reset is never answered.
    m.send_pkt(&from_guest(1, 5, op::RST, 0), &[]);
    assert!(drain(&mut m).is_empty());
    // Garbage instead of a CONNECT line: the host program is dropped.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"HELLO THERE\n").unwrap();
    assert!(drain(&mut m).is_empty());
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0, "closed");
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(&[b'C'; 100]).unwrap();
    assert!(drain(&mut m).is_empty());
    assert_eq!(
        host.read(&mut b).unwrap_or(0),
        0,
        "an overlong line is closed"
    );
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn a_thousand_host_connections_at_once() {
    let d = dir("many");
    let uds = d.join("v.sock");
    let mut m = Muxer::new(CID, &uds).unwrap();
    let mut hosts = Vec::new();
    let mut requests = Vec::new();
    for i in 0..1000u32 {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.write_all(format!("CONNECT {}\n", 5000 + i).as_bytes())
            .unwrap();
        hosts.push(s);
        if i % 64 == 63 {
            requests.extend(drain(&mut m));
        }
    }
    requests.extend(drain(&mut m));
    assert_eq!(requests.len(), 1000);
    assert!(requests.iter().all(|p| p.0.op == op::REQUEST));
    for p in &requests {
        m.send_pkt(
            &from_guest(p.0.dst_port, p.0.src_port, op::RESPONSE, 0),
            &[],
        );
    }
    assert_eq!(m.connection_count(), 1000);
    for (i, h) in hosts.iter_mut().enumerate() {
        let line = read_line(h);
        assert!(line.starts_with("OK "), "{i}: {line}");
    }
}
