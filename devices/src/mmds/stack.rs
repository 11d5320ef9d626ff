//! The network endpoint of the metadata service, in front of one network
//! device's TAP: it answers ARP requests for the service's address, and TCP
//! segments to that address on port 80 go to a minimal TCP endpoint that
//! feeds the HTTP server ([`super::http`]); everything else goes to the TAP
//! as before. Its frames for the guest wait in a bounded queue that the
//! device empties into the guest's receive buffers before reading the TAP.
//!
//! The link is the guest's own virtio ring, which neither loses nor
//! reorders frames, so the endpoint keeps no retransmission timers: it sends
//! within the guest's advertised window (and at most [`MAX_IN_FLIGHT`]
//! bytes ahead), ACKs what arrives in order, and answers anything out of
//! order with a duplicate ACK. All state is bounded: [`MAX_CONNECTIONS`]
//! connections (the oldest is dropped for a new one), [`MAX_QUEUED_FRAMES`]
//! frames waiting for the guest, and [`super::http::MAX_REQUEST`] bytes of
//! request per connection.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::http::{self, Outcome, MAX_REQUEST};
use super::SharedMmds;

/// The service's MAC address (Firecracker's).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// Connections at most.
pub const MAX_CONNECTIONS: usize = 30;
/// Frames waiting for the guest at most; more are dropped and counted.
pub const MAX_QUEUED_FRAMES: usize = 512;
/// Unacknowledged bytes per connection at most.
pub const MAX_IN_FLIGHT: u32 = 16 * 1024;
/// Segment size the endpoint announces and sends at most.
const OUR_MSS: u16 = 1460;
/// The window the endpoint announces: what a request may take.
const OUR_WINDOW: u16 = MAX_REQUEST as u16;

const ETH: usize = 14;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const HTTP_PORT: u16 = 80;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `a` comes after `b` in sequence space.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The Internet checksum of `data`, starting from the partial sum `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    SynReceived,
    Established,
}

#[derive(Debug)]
struct Conn {
    guest_mac: [u8; 6],
    state: State,
    snd_una: u32,
    snd_nxt: u32,
    rcv_nxt: u32,
    peer_window: u32,
    mss: usize,
    request: Vec<u8>,
    response: VecDeque<u8>,
    /// Close once the response is out (the guest sent FIN, or asked to close).
    close_after: bool,
    fin_sent: bool,
    /// The guest's FIN came.
    peer_fin: bool,
    born: u64,
}

/// A parsed TCP segment from the guest.
#[derive(Clone, Copy)]
struct Segment<'a> {
    guest_mac: [u8; 6],
    guest_ip: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: &'a [u8],
}

/// The metadata service's endpoint on one network device.
pub struct MmdsStack {
    ip: [u8; 4],
    mmds: SharedMmds,
    conns: HashMap<([u8; 4], u16), Conn>,
    out: VecDeque<Vec<u8>>,
    ip_id: u16,
    next_isn: u32,
    born: u64,
}

impl MmdsStack {
    /// An endpoint at `ip` serving `mmds`.
    pub fn new(ip: [u8; 4], mmds: SharedMmds) -> Self {
        MmdsStack {
            ip,
            mmds,
            conns: HashMap::new(),
            out: VecDeque::new(),
            ip_id: 0,
            // Initial sequence numbers need not be secret on a link only the
            // guest is on; they only have to differ between connections (and
            // being fixed makes the fuzz target reproducible).
            next_isn: 0x6d6d_6473,
            born: 0,
        }
    }

    /// Whether a frame whose first bytes are `head` may be for the service
    /// (no false negatives: an ARP frame, or IPv4 to the service's address).
    pub fn may_want(&self, head: &[u8]) -> bool {
        if head.len() < ETH + 20 {
            return head.len() >= ETH && be16(head, 12) == ETHERTYPE_ARP;
        }
        match be16(head, 12) {
            ETHERTYPE_ARP => true,
            ETHERTYPE_IPV4 => head[ETH + 16..ETH + 20] == self.ip,
            _ => false,
        }
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Frames waiting for the guest.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Whether frames wait for the guest.
    pub fn has_frames(&self) -> bool {
        !self.out.is_empty()
    }

    /// The next frame for the guest.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Takes a frame the guest sent if it is for the service (true), else
    /// leaves it for the TAP (false).
    pub fn detour(&mut self, frame: &[u8]) -> bool {
        if frame.len() < ETH {
            return false;
        }
        let taken = match be16(frame, 12) {
            ETHERTYPE_ARP => self.arp(frame),
            ETHERTYPE_IPV4 if frame.len() >= ETH + 20 && frame[ETH + 16..ETH + 20] == self.ip => {
                self.ipv4(frame);
                true
            }
            _ => false,
        };
        if taken {
            self.with_counters(|c| c.rx_count += 1);
        }
        taken
    }

    fn with_counters(&self, f: impl FnOnce(&mut super::MmdsCounters)) {
        f(&mut self.mmds.lock().unwrap_or_else(|e| e.into_inner()).counters);
    }

    fn arp(&mut self, f: &[u8]) -> bool {
        let a = ETH;
        if f.len() < a + 28
            || be16(f, a) != 1
            || be16(f, a + 2) != ETHERTYPE_IPV4
            || f[a + 4] != 6
            || f[a + 5] != 4
            || f[a + 24..a + 28] != self.ip
        {
            return false;
        }
        if be16(f, a + 6) == 1 {
            let mut sha = [0u8; 6];
            sha.copy_from_slice(&f[a + 8..a + 14]);
            let spa = &f[a + 14..a + 18];
            let mut r = Vec::with_capacity(ETH + 28);
            r.extend_from_slice(&sha);
            r.extend_from_slice(&MMDS_MAC);
            r.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
            r.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
            r.extend_from_slice(&MMDS_MAC);
            r.extend_from_slice(&self.ip);
            r.extend_from_slice(&sha);
            r.extend_from_slice(spa);
            self.queue(r);
        }
        self.with_counters(|c| c.rx_accepted += 1);
        true
    }

    fn ipv4(&mut self, f: &[u8]) {
        let ip = &f[ETH..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
            self.with_counters(|c| c.rx_accepted_err += 1);
            return;
        }
        // Fragments and anything but TCP are dropped.
        if be16(ip, 6) & 0x3fff != 0 || ip[9] != 6 {
            self.with_counters(|c| c.rx_accepted_unusual += 1);
            return;
        }
        let tcp = &ip[ihl..total];
        let doff = tcp.get(12).map_or(0, |b| usize::from(b >> 4) * 4);
        if tcp.len() < 20 || doff < 20 || doff > tcp.len() {
            self.with_counters(|c| c.rx_accepted_err += 1);
            return;
        }
        let mut mss = None;
        let mut opts = &tcp[20..doff];
        while let [kind, rest @ ..] = opts {
            match kind {
                0 => break,
                1 => opts = rest,
                _ => {
                    let Some(&len) = rest.first() else { break };
                    let len = usize::from(len);
                    if len < 2 || len > opts.len() {
                        break;
                    }
                    if *kind == 2 && len == 4 {
                        mss = Some(be16(opts, 2));
                    }
                    opts = &opts[len..];
                }
            }
        }
        let mut guest_mac = [0u8; 6];
        guest_mac.copy_from_slice(&f[6..12]);
        let mut guest_ip = [0u8; 4];
        guest_ip.copy_from_slice(&ip[12..16]);
        self.with_counters(|c| c.rx_accepted += 1);
        self.segment(Segment {
            guest_mac,
            guest_ip,
            sport: be16(tcp, 0),
            dport: be16(tcp, 2),
            seq: be32(tcp, 4),
            ack: be32(tcp, 8),
            flags: tcp[13],
            window: be16(tcp, 14),
            mss,
            payload: &tcp[doff..],
        });
    }

    fn segment(&mut self, s: Segment) {
        let key = (s.guest_ip, s.sport);
        if s.flags & RST != 0 {
            if self.conns.remove(&key).is_some() {
                self.with_counters(|c| c.connections_destroyed += 1);
            }
            return;
        }
        let syn_len = u32::from(s.flags & SYN != 0) + u32::from(s.flags & FIN != 0);
        let reset = |stack: &mut Self| {
            // RFC 793's reset for a segment to no connection.
            let (seq, ack, flags) = if s.flags & ACK != 0 {
                (s.ack, 0, RST)
            } else {
                let len = s.payload.len() as u32 + syn_len;
                (0, s.seq.wrapping_add(len), RST | ACK)
            };
            let frame = stack.tcp_frame(&s, seq, ack, flags, 0, &[]);
            stack.queue(frame);
        };
        if s.dport != HTTP_PORT {
            reset(self);
            return;
        }
        if s.flags & SYN != 0 && s.flags & ACK == 0 {
            self.open(&s);
            return;
        }
        let Some(mut c) = self.conns.remove(&key) else {
            reset(self);
            return;
        };
        if s.flags & SYN != 0 {
            // A SYN-ACK from the guest makes no sense here.
            reset(self);
            self.with_counters(|c| c.connections_destroyed += 1);
            return;
        }
        if s.flags & ACK != 0 && seq_after(s.ack, c.snd_una) && !seq_after(s.ack, c.snd_nxt) {
            c.snd_una = s.ack;
            if c.state == State::SynReceived {
                c.state = State::Established;
            }
        }
        c.peer_window = u32::from(s.window);
        let mut must_ack = false;
        if s.seq == c.rcv_nxt {
            if !s.payload.is_empty() {
                // Past the request limit the HTTP server answers 400 and closes.
                let room = (MAX_REQUEST + 1).saturating_sub(c.request.len());
                c.request
                    .extend_from_slice(&s.payload[..s.payload.len().min(room)]);
                c.rcv_nxt = c.rcv_nxt.wrapping_add(s.payload.len() as u32);
                must_ack = true;
            }
            if s.flags & FIN != 0 && !c.peer_fin {
                c.rcv_nxt = c.rcv_nxt.wrapping_add(1);
                c.close_after = true;
                c.peer_fin = true;
                must_ack = true;
            }
        } else if !s.payload.is_empty() || s.flags & FIN != 0 {
            // Out of order or repeated: say where we are.
            must_ack = true;
        }
        self.serve(&mut c);
        let sent = self.pump(&mut c, &s);
        if must_ack && !sent {
            let frame = self.tcp_frame(&s, c.snd_nxt, c.rcv_nxt, ACK, 0, &[]);
            self.queue(frame);
        }
        // Gone once both sides have closed and our FIN is acknowledged (a
        // guest that never closes its side loses the connection to eviction).
        if c.fin_sent && c.peer_fin && c.snd_una == c.snd_nxt {
            self.with_counters(|c| c.connections_destroyed += 1);
        } else {
            self.conns.insert(key, c);
        }
    }

    fn open(&mut self, s: &Segment) {
        let key = (s.guest_ip, s.sport);
        if !self.conns.contains_key(&key) && self.conns.len() >= MAX_CONNECTIONS {
            let oldest = self
                .conns
                .iter()
                .min_by_key(|(_, c)| c.born)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.conns.remove(&k);
                self.with_counters(|c| c.connections_destroyed += 1);
            }
        }
        let isn = self.next_isn;
        self.next_isn = self.next_isn.wrapping_add(0x0100_0193);
        self.born += 1;
        let c = Conn {
            guest_mac: s.guest_mac,
            state: State::SynReceived,
            snd_una: isn,
            snd_nxt: isn.wrapping_add(1),
            rcv_nxt: s.seq.wrapping_add(1),
            peer_window: u32::from(s.window),
            mss: usize::from(s.mss.unwrap_or(536).clamp(64, OUR_MSS)),
            request: Vec::new(),
            response: VecDeque::new(),
            close_after: false,
            fin_sent: false,
            peer_fin: false,
            born: self.born,
        };
        let frame = self.tcp_frame(s, isn, c.rcv_nxt, SYN | ACK, OUR_MSS, &[]);
        self.queue(frame);
        if self.conns.insert(key, c).is_none() {
            self.with_counters(|c| c.connections_created += 1);
        }
    }

    /// Answers every whole request the connection has received.
    fn serve(&self, c: &mut Conn) {
        if c.state != State::Established {
            return;
        }
        let mut mmds = self.mmds.lock().unwrap_or_else(|e| e.into_inner());
        // Nothing more is read once the connection is closing.
        while !c.request.is_empty() && !c.fin_sent {
            match http::serve(&mut mmds, &c.request, Instant::now()) {
                Outcome::Incomplete => break,
                Outcome::Answered {
                    consumed,
                    response,
                    close,
                } => {
                    c.request.drain(..consumed.min(c.request.len()));
                    c.response.extend(response);
                    mmds.counters.tx_count += 1;
                    if close {
                        c.close_after = true;
                        c.request.clear();
                        break;
                    }
                }
            }
        }
    }

    /// Sends what the window allows, then FIN if the connection is done.
    /// True if it sent anything (every segment carries the ACK).
    fn pump(&mut self, c: &mut Conn, s: &Segment) -> bool {
        let mut sent = false;
        while !c.response.is_empty() {
            let in_flight = c.snd_nxt.wrapping_sub(c.snd_una);
            let room = c.peer_window.min(MAX_IN_FLIGHT).saturating_sub(in_flight) as usize;
            let n = c.response.len().min(c.mss).min(room);
            if n == 0 {
                break;
            }
            let data: Vec<u8> = c.response.drain(..n).collect();
            let frame = self.tcp_frame_to(c, s, c.snd_nxt, ACK | PSH, &data);
            self.queue(frame);
            c.snd_nxt = c.snd_nxt.wrapping_add(n as u32);
            sent = true;
        }
        if c.response.is_empty() && c.close_after && !c.fin_sent && c.state == State::Established {
            let frame = self.tcp_frame_to(c, s, c.snd_nxt, FIN | ACK, &[]);
            self.queue(frame);
            c.snd_nxt = c.snd_nxt.wrapping_add(1);
            c.fin_sent = true;
            sent = true;
        }
        sent
    }

    fn tcp_frame_to(&mut self, c: &Conn, s: &Segment, seq: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let to = Segment {
            guest_mac: c.guest_mac,
            ..*s
        };
        self.tcp_frame(&to, seq, c.rcv_nxt, flags, 0, data)
    }

    /// A TCP segment from the service to the sender of `s`; `mss` > 0 adds
    /// the MSS option.
    fn tcp_frame(
        &mut self,
        s: &Segment,
        seq: u32,
        ack: u32,
        flags: u8,
        mss: u16,
        data: &[u8],
    ) -> Vec<u8> {
        let opt_len = if mss > 0 { 4 } else { 0 };
        let tcp_len = 20 + opt_len + data.len();
        let total = 20 + tcp_len;
        let mut f = Vec::with_capacity(ETH + total);
        f.extend_from_slice(&s.guest_mac);
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        // IPv4 header.
        self.ip_id = self.ip_id.wrapping_add(1);
        let ip_at = f.len();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&self.ip_id.to_be_bytes());
        f.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&self.ip);
        f.extend_from_slice(&s.guest_ip);
        let sum = checksum(&f[ip_at..ip_at + 20], 0);
        f[ip_at + 10..ip_at + 12].copy_from_slice(&sum.to_be_bytes());
        // TCP header.
        let tcp_at = f.len();
        f.extend_from_slice(&HTTP_PORT.to_be_bytes());
        f.extend_from_slice(&s.sport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.push(((20 + opt_len) as u8 / 4) << 4);
        f.push(flags);
        f.extend_from_slice(&OUR_WINDOW.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        if mss > 0 {
            f.extend_from_slice(&[2, 4]);
            f.extend_from_slice(&mss.to_be_bytes());
        }
        f.extend_from_slice(data);
        let mut pseudo = 0u32;
        for w in [&self.ip[..], &s.guest_ip[..]] {
            pseudo += u32::from(be16(w, 0)) + u32::from(be16(w, 2));
        }
        pseudo += 6 + tcp_len as u32;
        let sum = checksum(&f[tcp_at..], pseudo);
        f[tcp_at + 16..tcp_at + 18].copy_from_slice(&sum.to_be_bytes());
        f
    }

    fn queue(&mut self, frame: Vec<u8>) {
        let len = frame.len() as u64;
        if self.out.len() >= MAX_QUEUED_FRAMES {
            self.with_counters(|c| c.tx_errors += 1);
            return;
        }
        self.out.push_back(frame);
        self.with_counters(|c| {
            c.tx_frames += 1;
            c.tx_bytes += len;
        });
    }
}

#[cfg(test)]
mod tests;
