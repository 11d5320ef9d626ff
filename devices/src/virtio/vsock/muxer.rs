//! The host side of virtio-vsock, with Firecracker's hybrid Unix-socket
//! protocol (its docs/vsock.md):
//! - a host program connects to the device's Unix socket `uds_path` and
//!   writes `CONNECT <port>\n`; the guest's listener on that port gets the
//!   connection, and the host program reads `OK <host port>\n` first;
//! - a guest connection to CID 2, port P, is forwarded to the Unix socket
//!   `<uds_path>_P`; nobody listening there means a reset.
//!
//! Flow control is virtio-vsock's credit: the guest never sends more than
//! the buffer this side announced (a guest that does is reset), and this
//! side never reads more from a host socket than the guest has room for. No
//! buffer grows without bound: per connection at most `CONN_BUF` bytes wait
//! for the host socket, and the control packets waiting for the guest are
//! bounded by the connection count.
//!
//! Every socket is non-blocking and watched by one epoll instance whose
//! descriptor is the device's backend descriptor: the VMM's event loop
//! watches that one, the muxer dispatches.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Bytes of guest data one connection buffers for its host socket (the
/// credit announced to the guest).
pub const CONN_BUF: u32 = 256 * 1024;
/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most host connections still writing their `CONNECT` line.
const MAX_PENDING_HOST: usize = 256;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First port given to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// epoll token of the listener.
const LISTENER: u64 = u64::MAX;

/// Errors setting the backend up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path cannot be bound.
    #[error("Cannot listen on vsock socket '{path}': {err}. Give a path in a writable directory that does not exist yet.")]
    Bind { path: PathBuf, err: std::io::Error },
    /// epoll failed.
    #[error("Cannot watch the vsock sockets: {0}.")]
    Epoll(std::io::Error),
}

/// Connection counters (Firecracker's vsock metric names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MuxerCounters {
    /// Connections made, either way.
    pub added: u64,
    /// Connections reset by this side (credit lies, socket errors, guest close).
    pub killed: u64,
    /// Connections ended by the guest's reset.
    pub removed: u64,
}

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for its RESPONSE.
    Requested,
    /// Data flows.
    Established,
}

/// One stream between a host Unix socket and a guest port.
struct Connection {
    stream: UnixStream,
    state: State,
    /// The host side's port (a guest-initiated connection: the port the
    /// guest connected to).
    local_port: u32,
    /// The guest's port.
    peer_port: u32,
    /// Guest data not yet written to the host socket (≤ CONN_BUF), after
    /// `ours` bytes of this side's own (the `OK <port>` line).
    to_host: VecDeque<u8>,
    ours: usize,
    /// Bytes of guest data received and written to the host socket.
    rx_cnt: u32,
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    fwd_cnt_told: u32,
    /// The guest's buffer and what it consumed of it; bytes sent to it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    /// The host socket may have data (edge-triggered: until a read would block).
    host_readable: bool,
    /// The host socket ended its side.
    host_eof: bool,
    /// The guest will send no more (SHUTDOWN with SEND).
    guest_done_sending: bool,
    /// The host socket's sending side was shut (once the guest was done
    /// sending and all of it was out).
    host_write_shut: bool,
    /// The guest closed (SHUTDOWN both ways): reset once its data is out.
    guest_closed: bool,
    /// A packet the guest must get for this connection.
    owe_response: bool,
    owe_credit: bool,
    owe_shutdown: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state,
            local_port,
            peer_port,
            to_host: VecDeque::new(),
            ours: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            host_readable: false,
            host_eof: false,
            guest_done_sending: false,
            host_write_shut: false,
            guest_closed: false,
            owe_response: false,
            owe_credit: false,
            owe_shutdown: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes what the guest sent to the host socket, as far as it takes it.
    /// Err if the host socket failed.
    fn flush_to_host(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    // Only guest data counts as forwarded.
                    let own = n.min(self.ours);
                    self.ours -= own;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - own) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Tell the guest about freed space once half the buffer is free
        // again (it stops sending when it runs out).
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= CONN_BUF / 2 {
            self.owe_credit = true;
        }
        Ok(())
    }

    fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        let mut h = Header::to_guest(guest_cid, self.local_port, self.peer_port, op);
        h.buf_alloc = CONN_BUF;
        h.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_told = self.fwd_cnt;
        h
    }
}

/// A host program that connected to `uds_path` and has not finished its
/// `CONNECT` line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The connections of one vsock device and their Unix sockets.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// By (local port, guest port).
    conns: HashMap<(u32, u32), Connection>,
    /// epoll token (the socket's fd) → connection key.
    tokens: HashMap<u64, (u32, u32)>,
    pending: HashMap<u64, PendingHost>,
    /// Resets owed to the guest for packets of no connection (bounded).
    resets: VecDeque<Header>,
    next_port: u32,
    /// Round-robin start among connections with data for the guest.
    rr: usize,
    /// The socket file was removed.
    closed: bool,
    counters: MuxerCounters,
}

impl Muxer {
    /// Listens on `uds_path` for host connections to the guest with `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        let bind_err = |err| Error::Bind {
            path: uds_path.to_path_buf(),
            err,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        let ready = listener
            .set_nonblocking(true)
            .and_then(|()| Epoll::new())
            .and_then(|epoll| {
                epoll.ctl(
                    ControlOperation::Add,
                    listener.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, LISTENER),
                )?;
                Ok(epoll)
            });
        let epoll = match ready {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_file(uds_path);
                return Err(Error::Epoll(e));
            }
        };
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            resets: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            rr: 0,
            closed: false,
            counters: MuxerCounters::default(),
        })
    }

    /// The guest CID and the socket path this muxer was made for.
    pub fn bound_to(&self) -> (u64, &Path) {
        (self.guest_cid, &self.uds_path)
    }

    /// The descriptor the event loop watches: readable when any socket is.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The next port a host-initiated connection gets.
    pub fn next_local_port(&self) -> u32 {
        self.next_port
    }

    /// Continues the port numbering at `port` (a restored device: the guest
    /// may still hold connections on the ports given out before, which its
    /// transport reset ends only once their programs close them).
    pub fn set_next_local_port(&mut self, port: u32) {
        self.next_port = port.max(FIRST_LOCAL_PORT);
    }

    /// The open connections, as (host port, guest port).
    pub fn connection_keys(&self) -> Vec<(u32, u32)> {
        let mut keys: Vec<_> = self.conns.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// Resets, in the guest, connections whose host side is gone (those a
    /// snapshot had open: their sockets belonged to the old process).
    pub fn reset_stale(&mut self, keys: &[(u32, u32)]) {
        for &(local, peer) in keys.iter().take(MAX_CONNECTIONS) {
            if self.resets.len() < MAX_CONNECTIONS {
                self.resets
                    .push_back(Header::to_guest(self.guest_cid, local, peer, op::RST));
            }
        }
    }

    /// The connection counters so far.
    pub fn counters(&self) -> MuxerCounters {
        self.counters
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn watch(&mut self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    fn forget(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.tokens.remove(&(fd as u64));
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// A reset for the guest's packet `h` (never in answer to a reset).
    fn reset_for(&mut self, h: &Header) {
        if h.op == op::RST || self.resets.len() >= MAX_CONNECTIONS {
            return;
        }
        self.resets.push_back(Header::to_guest(
            self.guest_cid,
            h.dst_port,
            h.src_port,
            op::RST,
        ));
    }

    /// Resets connection `key` on both sides.
    fn kill(&mut self, key: (u32, u32)) {
        if self.conns.contains_key(&key) {
            self.counters.killed += 1;
            self.forget(key);
            if self.resets.len() < MAX_CONNECTIONS {
                self.resets
                    .push_back(Header::to_guest(self.guest_cid, key.0, key.1, op::RST));
            }
        }
    }

    /// A packet the guest sent, with its data.
    pub fn send_pkt(&mut self, h: &Header, data: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            // Not a packet of this guest to the host: dropped (answering it
            // would let the guest make the device talk to other CIDs).
            crate::guest_warn!(
                "vsock: packet from CID {} to CID {} dropped",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        if h.kind != TYPE_STREAM {
            self.reset_for(h);
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            self.guest_connect(h);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.reset_for(h);
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, c.state) {
            (op::RESPONSE, State::Requested) => {
                c.state = State::Established;
                let ok = format!("OK {}\n", c.local_port);
                // The host program reads this before any data.
                c.to_host.extend(ok.as_bytes());
                c.ours = ok.len();
                if c.flush_to_host().is_err() {
                    self.kill(key);
                }
            }
            (op::RW, State::Established) => {
                let buffered = c.rx_cnt.wrapping_sub(c.fwd_cnt);
                let len = data.len() as u32;
                if c.guest_done_sending || buffered.saturating_add(len) > CONN_BUF {
                    // More than the credit it was given: the guest lies.
                    crate::guest_warn!("vsock: guest sent past its credit; connection reset");
                    self.kill(key);
                    return;
                }
                c.to_host.extend(data);
                c.rx_cnt = c.rx_cnt.wrapping_add(len);
                self.after_flush(key);
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => c.owe_credit = true,
            (op::SHUTDOWN, State::Established) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done_sending = true;
                }
                let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
                c.guest_closed = h.flags & both == both;
                self.after_flush(key);
            }
            (op::RST, _) => {
                self.counters.removed += 1;
                self.forget(key);
            }
            _ => {
                crate::guest_warn!("vsock: operation {} out of place; connection reset", h.op);
                self.kill(key);
            }
        }
    }

    /// Writes what connection `key` holds for its host socket; once the
    /// guest is done sending and all of it is out, ends the host side
    /// (closed by the guest: a reset ends the connection).
    fn after_flush(&mut self, key: (u32, u32)) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.flush_to_host().is_err() {
            self.kill(key);
            return;
        }
        if !c.to_host.is_empty() {
            return;
        }
        if c.guest_closed {
            self.kill(key);
        } else if c.guest_done_sending && !c.host_write_shut {
            c.host_write_shut = true;
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// The guest connects to host port `h.dst_port`: `<uds_path>_<port>`.
    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.reset_for(h);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let Ok(stream) = connect_nonblocking(Path::new(&path)) else {
            self.reset_for(h);
            return;
        };
        let mut c = Connection::new(stream, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if self.add_connection(key, c).is_err() {
            self.reset_for(h);
        }
    }

    /// Watches connection `key`'s socket and keeps it; it owes the guest its
    /// first packet (a REQUEST, or the RESPONSE to the guest's).
    fn add_connection(&mut self, key: (u32, u32), mut c: Connection) -> std::io::Result<()> {
        let fd = c.stream.as_raw_fd();
        self.watch(
            fd,
            fd as u64,
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
        )?;
        c.owe_response = true;
        self.tokens.insert(fd as u64, key);
        self.conns.insert(key, c);
        self.counters.added += 1;
        Ok(())
    }

    /// Handles every socket that is ready, including those that became
    /// ready while this ran (an accepted host program's CONNECT line); never
    /// blocks, and bounded: what is left wakes the event loop again.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        for _ in 0..64 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vsock: cannot wait for socket events: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                self.handle_event(ev.data(), ev.event_set());
            }
        }
    }

    fn handle_event(&mut self, token: u64, set: EventSet) {
        if token == LISTENER {
            self.accept_all();
        } else if self.pending.contains_key(&token) {
            self.read_connect_line(token);
        } else if let Some(&key) = self.tokens.get(&token) {
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
                c.host_readable = true;
            }
            if set.contains(EventSet::ERROR) {
                self.kill(key);
            } else if set.contains(EventSet::OUT) {
                self.after_flush(key);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING_HOST
                        || self.conns.len() >= MAX_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: the host program sees the close
                    }
                    let fd = stream.as_raw_fd();
                    if self.watch(fd, fd as u64, EventSet::IN).is_ok() {
                        self.pending.insert(
                            fd as u64,
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock, or out of descriptors: retried on the next event
            }
        }
    }

    /// Reads a host program's `CONNECT <port>\n`, byte by byte (nothing
    /// after the newline may be consumed: it is the stream's data).
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break parse_connect(&p.line),
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(b[0]),
                Ok(_) => break None, // EOF, or a line too long
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let fd = p.stream.as_raw_fd();
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(peer_port) = port else {
            return; // dropped: the host program sees the close
        };
        let Some(local_port) = self.free_local_port(peer_port) else {
            return;
        };
        let c = Connection::new(p.stream, State::Requested, local_port, peer_port);
        // On failure the stream is dropped: the host program sees the close.
        let _ = self.add_connection((local_port, peer_port), c);
    }

    fn free_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..MAX_CONNECTIONS * 2 {
            let port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    /// Whether a packet for the guest is waiting (a control packet, or data
    /// the guest has room for).
    pub fn has_rx(&self) -> bool {
        !self.resets.is_empty()
            || self.conns.values().any(|c| {
                c.owe_response
                    || c.owe_credit
                    || c.owe_shutdown
                    || (c.state == State::Established && c.host_readable && c.peer_credit() > 0)
            })
    }

    /// The next packet for the guest, with at most `max_data` bytes of data.
    pub fn recv_pkt(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.resets.pop_front() {
            return Some((h, Vec::new()));
        }
        let mut keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        keys.sort_unstable();
        let n = keys.len();
        for i in 0..n {
            let key = keys[(self.rr + i) % n];
            if let Some(pkt) = self.packet_of(key, max_data) {
                self.rr = (self.rr + i + 1) % n.max(1);
                return Some(pkt);
            }
        }
        None
    }

    /// A packet of connection `key` for the guest, if it owes one.
    fn packet_of(&mut self, key: (u32, u32), max_data: usize) -> Option<(Header, Vec<u8>)> {
        let cid = self.guest_cid;
        let c = self.conns.get_mut(&key)?;
        if c.owe_response {
            c.owe_response = false;
            let op = match c.state {
                State::Requested => op::REQUEST,
                State::Established => op::RESPONSE,
            };
            return Some((c.header(cid, op), Vec::new()));
        }
        if c.owe_shutdown {
            c.owe_shutdown = false;
            let mut h = c.header(cid, op::SHUTDOWN);
            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            return Some((h, Vec::new()));
        }
        if c.state == State::Established && c.host_readable && !c.host_eof {
            let room = (c.peer_credit() as usize).min(max_data);
            if room > 0 {
                let mut buf = vec![0u8; room];
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.host_eof = true;
                        c.host_readable = false;
                        c.owe_shutdown = true;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                        let mut h = c.header(cid, op::RW);
                        h.len = n as u32;
                        c.owe_credit = false;
                        return Some((h, buf));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => c.host_readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.kill(key);
                        return self.resets.pop_back().map(|h| (h, Vec::new()));
                    }
                }
                if c.owe_shutdown {
                    c.owe_shutdown = false;
                    let mut h = c.header(cid, op::SHUTDOWN);
                    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    return Some((h, Vec::new()));
                }
            }
        }
        if c.owe_credit {
            c.owe_credit = false;
            return Some((c.header(cid, op::CREDIT_UPDATE), Vec::new()));
        }
        None
    }
}

impl Muxer {
    /// Removes the Unix socket (once: a later one at the same path, e.g. of
    /// a restored clone, is not this device's).
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Connects to the Unix socket at `path` without ever waiting: a listener
/// whose backlog is full refuses (EAGAIN) instead of blocking the VMM.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(ErrorKind::InvalidInput.into());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket() with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket this function just created and owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes, and
    // connect only reads it.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// The port of a `CONNECT <port>` line (without its newline).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?;
    port.trim_end_matches('\r').parse().ok()
}

#[cfg(test)]
mod tests;
