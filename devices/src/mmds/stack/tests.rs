use std::sync::{Arc, Mutex};

use serde_json::json;

use super::*;
use crate::mmds::{Mmds, Version};

const SVC: [u8; 4] = [169, 254, 169, 254];
const GUEST_IP: [u8; 4] = [172, 16, 0, 2];
const GUEST_MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];

fn stack() -> (MmdsStack, SharedMmds) {
    let mut m = Mmds::new(51200);
    m.configure(Version::V1, false);
    m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "big": "x".repeat(5000)}}}))
        .unwrap();
    let shared = Arc::new(Mutex::new(m));
    (MmdsStack::new(SVC, shared.clone()), shared)
}

fn eth(ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&GUEST_MAC);
    a.extend_from_slice(&GUEST_IP);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    eth(ETHERTYPE_ARP, &a)
}

/// A guest TCP segment to the service (checksums left zero: the stack does
/// not check them, as the guest may offload them).
fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[0x60, flags]);
    t.extend_from_slice(&window.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    t.extend_from_slice(data);
    let total = (20 + t.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&SVC);
    ip.extend_from_slice(&t);
    eth(ETHERTYPE_IPV4, &ip)
}

#[derive(Debug)]
struct Out {
    seq: u32,
    ack: u32,
    flags: u8,
    data: Vec<u8>,
}

/// Parses a frame the stack sent, checking both checksums.
fn parse(f: &[u8]) -> Out {
    assert_eq!(&f[0..6], &GUEST_MAC);
    assert_eq!(&f[6..12], &MMDS_MAC);
    let ip = &f[ETH..];
    assert_eq!(checksum(&ip[..20], 0), 0, "IPv4 header checksum");
    let total = usize::from(be16(ip, 2));
    assert_eq!(total, ip.len());
    let t = &ip[20..total];
    let mut pseudo = 0u32;
    for w in [&SVC[..], &GUEST_IP[..]] {
        pseudo += u32::from(be16(w, 0)) + u32::from(be16(w, 2));
    }
    pseudo += 6 + t.len() as u32;
    assert_eq!(checksum(t, pseudo), 0, "TCP checksum");
    let doff = usize::from(t[12] >> 4) * 4;
    Out {
        seq: be32(t, 4),
        ack: be32(t, 8),
        flags: t[13],
        data: t[doff..].to_vec(),
    }
}

fn drain(s: &mut MmdsStack) -> Vec<Out> {
    std::iter::from_fn(|| s.pop_frame())
        .map(|f| parse(&f))
        .collect()
}

/// Opens a connection from port `sport`; returns (our next seq, its next seq).
fn connect(s: &mut MmdsStack, sport: u16, window: u16) -> (u32, u32) {
    assert!(s.detour(&tcp(sport, 80, 1000, 0, SYN, window, &[])));
    let out = drain(s);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].flags, SYN | ACK);
    assert_eq!(out[0].ack, 1001);
    let theirs = out[0].seq.wrapping_add(1);
    assert!(s.detour(&tcp(sport, 80, 1001, theirs, ACK, window, &[])));
    assert!(drain(s).is_empty(), "no reply to a bare ACK");
    (1001, theirs)
}

#[test]
fn arp_requests_for_the_service_are_answered_and_others_left_alone() {
    let (mut s, _) = stack();
    assert!(s.may_want(&arp_request(SVC)));
    assert!(s.detour(&arp_request(SVC)));
    let reply = s.pop_frame().unwrap();
    assert_eq!(&reply[0..6], &GUEST_MAC);
    assert_eq!(be16(&reply, ETH + 6), 2, "an ARP reply");
    assert_eq!(&reply[ETH + 8..ETH + 14], &MMDS_MAC);
    assert_eq!(&reply[ETH + 14..ETH + 18], &SVC);
    assert_eq!(&reply[ETH + 24..ETH + 28], &GUEST_IP);
    assert!(!s.detour(&arp_request([172, 16, 0, 1])));
    let mut other = tcp(5000, 80, 1, 0, SYN, 1000, &[]);
    other[ETH + 16..ETH + 20].copy_from_slice(&[10, 0, 0, 1]);
    assert!(!s.may_want(&other[..ETH + 20]));
    assert!(!s.detour(&other));
    assert!(s.pop_frame().is_none());
}

#[test]
fn a_get_over_tcp_is_answered_and_closed_as_asked() {
    let (mut s, m) = stack();
    let (mut seq, ack) = connect(&mut s, 40000, 65535);
    // The request in two segments.
    let req = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nConnection: close\r\n\r\n";
    let (a, b) = req.split_at(20);
    assert!(s.detour(&tcp(40000, 80, seq, ack, ACK, 65535, a)));
    let out = drain(&mut s);
    assert_eq!((out.len(), out[0].flags, out[0].ack), (1, ACK, seq + 20));
    seq += 20;
    assert!(s.detour(&tcp(40000, 80, seq, ack, ACK | PSH, 65535, b)));
    seq += b.len() as u32;
    let out = drain(&mut s);
    let data: Vec<u8> = out.iter().flat_map(|o| o.data.clone()).collect();
    let text = String::from_utf8(data).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nami-1"), "{text}");
    assert_eq!(out[0].seq, ack);
    assert!(out.iter().all(|o| o.ack == seq));
    let fin = out.last().unwrap();
    assert_eq!(fin.flags, FIN | ACK);
    // The guest acknowledges our FIN, then closes its side: its FIN is
    // acknowledged (not reset) and the connection goes.
    let end = fin.seq.wrapping_add(1);
    assert!(s.detour(&tcp(40000, 80, seq, end, ACK, 65535, &[])));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.conns.len(), 1);
    assert!(s.detour(&tcp(40000, 80, seq, end, FIN | ACK, 65535, &[])));
    let out = drain(&mut s);
    assert_eq!((out.len(), out[0].flags, out[0].ack), (1, ACK, seq + 1));
    assert!(s.conns.is_empty());
    let c = m.lock().unwrap().counters;
    assert_eq!(
        (c.connections_created, c.connections_destroyed, c.tx_count),
        (1, 1, 1)
    );
}

#[test]
fn the_response_keeps_to_the_guests_window_and_mss() {
    let (mut s, _) = stack();
    let (seq, ack) = connect(&mut s, 40001, 3000);
    let req = b"GET /latest/meta-data/big HTTP/1.1\r\n\r\n";
    assert!(s.detour(&tcp(40001, 80, seq, ack, ACK, 3000, req)));
    let seq = seq + req.len() as u32;
    let out = drain(&mut s);
    let sizes: Vec<usize> = out.iter().map(|o| o.data.len()).collect();
    assert_eq!(sizes, [1460, 1460, 80], "3000 bytes of window, 1460 of MSS");
    // The guest takes it all and opens its window: the rest comes.
    let acked = ack.wrapping_add(3000);
    assert!(s.detour(&tcp(40001, 80, seq, acked, ACK, 65535, &[])));
    let rest: usize = drain(&mut s).iter().map(|o| o.data.len()).sum();
    let body_and_head = 3000 + rest;
    assert!(
        body_and_head > 5000 && body_and_head < 5200,
        "{body_and_head}"
    );
    // Kept open (HTTP/1.1 without Connection: close).
    assert_eq!(s.conns.len(), 1);
}

#[test]
fn strays_get_resets_and_floods_stay_bounded() {
    let (mut s, _) = stack();
    // Data on no connection: RST at its ACK number.
    assert!(s.detour(&tcp(40002, 80, 5, 77, ACK, 1000, b"x")));
    let out = drain(&mut s);
    assert_eq!((out[0].flags, out[0].seq), (RST, 77));
    // A SYN to a port nobody serves: RST+ACK.
    assert!(s.detour(&tcp(40003, 22, 5, 0, SYN, 1000, &[])));
    let out = drain(&mut s);
    assert_eq!((out[0].flags, out[0].ack), (RST | ACK, 6));
    // 100 connections: the oldest go.
    for port in 0..100 {
        assert!(s.detour(&tcp(41000 + port, 80, 1, 0, SYN, 1000, &[])));
    }
    assert_eq!(s.conns.len(), MAX_CONNECTIONS);
    // A guest that never takes its frames fills the queue to its limit only.
    for port in 0..2000 {
        s.detour(&tcp(42000 + port, 80, 1, 0, SYN, 1000, &[]));
    }
    assert_eq!(s.out.len(), MAX_QUEUED_FRAMES);
}

#[test]
fn malformed_frames_for_the_service_are_taken_and_do_no_harm() {
    let (mut s, _) = stack();
    let good = tcp(40004, 80, 1, 0, SYN, 1000, &[]);
    let mut x: u32 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for round in 0..20_000 {
        let mut f = good.clone();
        let len = ETH + 20 + (next() as usize % 60);
        f.resize(len, 0);
        // Scramble bytes after the destination address.
        for _ in 0..(round % 8 + 1) {
            let i = ETH + (next() as usize % (len - ETH));
            if !(ETH + 16..ETH + 20).contains(&i) {
                f[i] = next() as u8;
            }
        }
        s.detour(&f);
        while s.pop_frame().is_some() {}
    }
    // Short and odd frames.
    for len in 0..ETH + 24 {
        let f = &good[..len.min(good.len())];
        let _ = s.may_want(f);
        s.detour(f);
    }
}
