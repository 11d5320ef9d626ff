//! virtio-net (virtio 1.2 §5.1): one receive and one transmit queue over a
//! packet backend (a TAP device opened with a virtio-net header, or, in tests,
//! a datagram socket). Frames move between the backend and guest memory with
//! readv/writev straight on the guest's buffers: the VMM makes no copy. Every
//! frame carries the 12-byte virtio-net header, which the TAP device
//! understands as is, so checksum and segmentation offloads pass through.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::mmds::stack::MmdsStack;
use crate::rate_limiter::{earliest, BucketConfig, RateLimiter};

use super::{
    ring, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// Virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the virtio-net header of virtio 1.x.
pub const NET_HDR_SIZE: usize = 12;
/// Largest frame the device moves: a 64 KiB GSO frame plus the Ethernet header.
pub const MAX_FRAME: usize = 65536 + 14;
/// Most iovecs one readv takes (the kernel's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
const RX: usize = 0;
const TX: usize = 1;

/// What the backend must do beyond moving frames.
pub trait NetBackend: AsRawFd + Send {
    /// Whether frames carry the virtio-net header and the backend can take the
    /// offloads it describes.
    fn supports_offloads(&self) -> bool;
    /// Configures the offloads the guest accepted (its `GUEST_*` features).
    fn set_offloads(&mut self, acked_features: u64) -> std::io::Result<()>;

    /// Reads one frame into `iov` and returns its full length, which is larger
    /// than the iovecs hold if the frame did not fit (as a TAP device reports).
    fn read_frame(&mut self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller's iovecs cover writable guest memory that stays mapped.
        let n = unsafe { libc::readv(self.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame gathered from `iov`; returns the bytes written.
    fn write_frame(&mut self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller's iovecs cover guest memory that stays mapped; writev
        // only reads from them.
        let n = unsafe { libc::writev(self.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Packet and byte counters, for the log at exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent.
    pub tx_packets: u64,
    /// Bytes the guest sent, headers excluded.
    pub tx_bytes: u64,
    /// Frames from the guest that were malformed or that the backend refused.
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest, headers excluded.
    pub rx_bytes: u64,
    /// Frames lost on the way to the guest (buffers too small or unusable).
    pub rx_dropped: u64,
    /// Times the rate-limit timer resumed receiving.
    pub rx_rate_limiter_events: u64,
    /// Times the rate-limit timer resumed sending.
    pub tx_rate_limiter_events: u64,
}

/// New buckets for one direction's limiter: (bandwidth, ops), each `None`
/// to keep the bucket the device has.
pub type LimiterUpdate = (Option<BucketConfig>, Option<BucketConfig>);

/// A virtio network device.
pub struct Net<B: NetBackend> {
    backend: B,
    mac: [u8; 6],
    mtu: Option<u16>,
    mrg_rxbuf: bool,
    acked_features: u64,
    counters: NetCounters,
    /// The guest has no receive buffers: stop reading the backend until it posts some.
    rx_waiting_for_buffers: bool,
    /// Receive buffers taken from the ring, not yet filled.
    rx: RxBuffers,
    /// The backend failed for good: stop watching it.
    backend_failed: bool,
    /// The last transmit pass stopped at its budget with chains left.
    tx_more: bool,
    /// Frames and bytes received per refill period (`rx_rate_limiter`).
    rx_limiter: RateLimiter,
    /// Frames and bytes sent per refill period (`tx_rate_limiter`).
    tx_limiter: RateLimiter,
    /// The receive limiter said wait: the backend is not read until the timer.
    rx_throttled: bool,
    /// The transmit limiter refused the frame at the head of the queue.
    tx_throttled: bool,
    /// The metadata service's endpoint, if the service is on this interface.
    mmds: Option<MmdsStack>,
    active: Option<(GuestMemoryMmap, Vec<Queue>, Interrupt)>,
}

/// Gives a frame the guest sent (`total` bytes over `descs`, virtio-net
/// header first) to the metadata service if it is for it.
fn mmds_detour(
    stack: &mut MmdsStack,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    total: usize,
) -> bool {
    // A look at the headers first: most frames are not for the service.
    let peek = (total - NET_HDR_SIZE).min(34);
    let Some(head) = read_chain(mem, descs, NET_HDR_SIZE, peek) else {
        return false;
    };
    if !stack.may_want(&head) {
        return false;
    }
    match read_chain(mem, descs, NET_HDR_SIZE, total - NET_HDR_SIZE) {
        Some(frame) => stack.detour(&frame),
        None => false,
    }
}

/// `len` bytes from offset `skip` of the buffers `descs` describe; None if
/// they do not hold that much or lie outside guest memory.
fn read_chain(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut skip: usize,
    len: usize,
) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut done = 0;
    for d in descs {
        let dlen = d.len() as usize;
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = (dlen - skip).min(len - done);
        mem.read_slice(&mut out[done..done + n], d.addr().checked_add(skip as u64)?)
            .ok()?;
        done += n;
        skip = 0;
        if done == len {
            return Some(out);
        }
    }
    (done == len).then_some(out)
}

/// Builds iovecs over guest memory for `descs`; None if any lies outside it.
fn iovecs(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<Vec<libc::iovec>> {
    descs
        .iter()
        .map(|d| guest_iovec(mem, d.addr(), d.len() as usize))
        .collect()
}

/// An iovec over `len` bytes of guest memory at `addr`; None unless they lie
/// within one region of guest memory.
fn guest_iovec(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> Option<libc::iovec> {
    let slice = mem.get_slice(addr, len).ok()?;
    Some(libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: len,
    })
}

/// An iovec over `len` bytes of guest memory at `addr` that a `readv` is
/// about to fill: as [`guest_iovec`], with the pages marked dirty
/// ([`crate::memory::writable`]).
fn guest_iovec_mut(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> Option<libc::iovec> {
    let slice = crate::memory::writable(mem, addr, len).ok()?;
    Some(libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: len,
    })
}

impl<B: NetBackend> Net<B> {
    /// A device with `mac` on `backend`.
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        Net {
            backend,
            mac,
            mtu: None,
            mrg_rxbuf: true,
            acked_features: 0,
            counters: NetCounters::default(),
            rx_waiting_for_buffers: false,
            rx: RxBuffers::default(),
            backend_failed: false,
            tx_more: false,
            rx_limiter: RateLimiter::default(),
            tx_limiter: RateLimiter::default(),
            rx_throttled: false,
            tx_throttled: false,
            mmds: None,
            active: None,
        }
    }

    /// Puts the metadata service's endpoint in front of the backend (or
    /// takes it away).
    pub fn set_mmds(&mut self, stack: Option<MmdsStack>) {
        self.mmds = stack;
    }

    /// Whether the metadata service has frames for the guest.
    fn mmds_pending(&self) -> bool {
        self.mmds.as_ref().is_some_and(MmdsStack::has_frames)
    }

    /// Updates the receive and transmit limiters: within each, the buckets
    /// given replace the device's and the others stay (see
    /// [`RateLimiter::update`]); `None` leaves that direction as it is.
    pub fn update_rate_limiters(&mut self, rx: Option<LimiterUpdate>, tx: Option<LimiterUpdate>) {
        let now = Instant::now();
        if let Some((bandwidth, ops)) = rx {
            self.rx_limiter.update(bandwidth, ops, now);
        }
        if let Some((bandwidth, ops)) = tx {
            self.tx_limiter.update(bandwidth, ops, now);
        }
    }

    /// Announces `mtu` to the guest (VIRTIO_NET_F_MTU).
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// Whether to offer mergeable receive buffers (VIRTIO_NET_F_MRG_RXBUF, on
    /// by default).
    pub fn with_mrg_rxbuf(mut self, on: bool) -> Self {
        self.mrg_rxbuf = on;
        self
    }

    /// The counters so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Sends every frame the guest queued for transmission.
    fn process_tx(&mut self) -> bool {
        let Some((mem, queues, interrupt)) = self.active.as_mut() else {
            return true;
        };
        let q = &mut queues[TX];
        let mut used = 0;
        self.tx_more = false;
        self.tx_throttled = false;
        loop {
            // With EVENT_IDX, tell the driver not to kick while the queue is drained,
            // then re-arm and look again for what arrived in between.
            if q.event_idx_enabled() && q.disable_notification(&*mem).is_err() {
                return false;
            }
            if !ring::avail_index_sane(q, mem) {
                return false;
            }
            while used < ring::BUDGET {
                let chain = match ring::pop_chain(q, mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(_) => return false,
                };
                let head = chain.head_index();
                let descs = ring::descriptors(chain, q.size()).unwrap_or_default();
                let total: usize = descs.iter().map(|d| d.len() as usize).sum();
                let well_formed = !descs.is_empty()
                    && descs.iter().all(|d| !d.is_write_only())
                    && (NET_HDR_SIZE..=NET_HDR_SIZE + MAX_FRAME).contains(&total);
                let cost = (total.saturating_sub(NET_HDR_SIZE)) as u64;
                if well_formed && !self.tx_limiter.consume(1, cost) {
                    // Stays in the ring until the limiter allows it.
                    ring::unpop(q);
                    self.tx_throttled = true;
                    break;
                }
                let detoured = well_formed
                    && self
                        .mmds
                        .as_mut()
                        .is_some_and(|stack| mmds_detour(stack, mem, &descs, total));
                if detoured {
                    if q.add_used(&*mem, head, 0).is_err() {
                        return false;
                    }
                    used += 1;
                    continue;
                }
                let sent = well_formed
                    && iovecs(mem, &descs)
                        .is_some_and(|iov| self.backend.write_frame(&iov).ok() == Some(total));
                if sent {
                    self.counters.tx_packets += 1;
                    self.counters.tx_bytes += (total - NET_HDR_SIZE) as u64;
                } else {
                    self.counters.tx_dropped += 1;
                    crate::guest_warn!(
                        "virtio-net: dropped a malformed or refused frame from the guest"
                    );
                }
                if q.add_used(&*mem, head, 0).is_err() {
                    return false;
                }
                used += 1;
            }
            if used >= ring::BUDGET {
                // Let the event loop serve the others; the transport calls again.
                self.tx_more = true;
                break;
            }
            if self.tx_throttled || !q.event_idx_enabled() {
                break;
            }
            match q.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => return false,
            }
        }
        if used > 0 && q.needs_notification(&*mem).unwrap_or(true) {
            interrupt.signal_used(TX);
        }
        true
    }

    /// Bytes a receive frame may need, header included: the largest GSO frame
    /// when the guest takes segmentation offloads, else an MTU-sized (VLAN) frame.
    fn rx_frame_room(&self) -> usize {
        let gso = (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_UFO);
        NET_HDR_SIZE
            + if self.acked_features & gso != 0 {
                MAX_FRAME
            } else {
                usize::from(self.mtu.unwrap_or(1500)) + 18
            }
    }

    /// Moves frames from the backend into receive buffers until the backend has
    /// none left or the guest has no buffers (then stops reading the backend).
    /// With MRG_RXBUF a frame may span several buffers; without, it takes one.
    pub fn process_rx(&mut self) -> bool {
        let mrg = self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let want = if mrg { self.rx_frame_room() } else { 0 };
        let Some((mem, queues, interrupt)) = self.active.as_mut() else {
            return true;
        };
        let q = &mut queues[RX];
        let since = q.next_used();
        let mut healthy = true;
        self.rx_throttled = false;
        // Bounded work per pass: while the backend stays readable, the event
        // loop calls again after serving the others.
        while usize::from(q.next_used().wrapping_sub(since)) < ring::BUDGET {
            if self
                .rx
                .take_buffers(q, mem, want, &mut self.counters)
                .is_err()
            {
                healthy = false;
                break;
            }
            if !self.rx.ready(want, q.size()) {
                // Not enough buffers: ask the driver to kick when it posts some
                // (with EVENT_IDX that means re-arming), and stop reading the backend.
                match q.enable_notification(&*mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(_) => {
                        healthy = false;
                        break;
                    }
                }
                self.rx_waiting_for_buffers = true;
                break;
            }
            if let Some(frame) = self.mmds.as_mut().and_then(MmdsStack::pop_frame) {
                // The service's frames go first, past the limiter (they
                // answer the guest's own requests).
                let n = NET_HDR_SIZE + frame.len();
                if !self.rx.fill(mem, want, &[&[0u8; NET_HDR_SIZE], &frame]) {
                    self.counters.rx_dropped += 1;
                    continue;
                }
                let used = self.rx.consume(mem, n);
                if ring::add_used_all(q, mem, &used).is_err() {
                    healthy = false;
                    break;
                }
                continue;
            }
            if !self.rx_limiter.may_start() {
                // The frame stays in the backend; the timer resumes reading.
                self.rx_throttled = true;
                break;
            }
            let (iov, room) = self.rx.iovecs(mem, want);
            if iov.is_empty() {
                // Cannot happen with the chains take_buffers accepts; never read
                // with no buffers (a TAP returns 0 and keeps the frame).
                healthy = false;
                break;
            }
            let n = match self.backend.read_frame(&iov) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL)) => {
                    // The backend consumed a frame it could not place.
                    self.counters.rx_dropped += 1;
                    continue;
                }
                Err(e) => {
                    log::error!("virtio-net: the backend failed, no more frames are received: {e}");
                    self.backend_failed = true;
                    break;
                }
            };
            if !(NET_HDR_SIZE..=room).contains(&n) {
                // Too short, or larger than the buffers (the TAP device truncates
                // and reports the full length): lost, and the buffers stay for the next.
                self.counters.rx_dropped += 1;
                continue;
            }
            self.rx_limiter.pay_after(1, (n - NET_HDR_SIZE) as u64);
            let used = self.rx.consume(mem, n);
            if ring::add_used_all(q, mem, &used).is_err() {
                healthy = false;
                break;
            }
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += (n - NET_HDR_SIZE) as u64;
        }
        if q.next_used() != since && ring::needs_interrupt_since(q, mem, since) {
            interrupt.signal_used(RX);
        }
        healthy
    }
}

/// What a snapshot keeps of a network device besides its queues; the TAP is
/// reopened by name (the VMM's part of the state, which `network_overrides`
/// may change).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU announced, if any.
    pub mtu: Option<u16>,
    /// Whether MRG_RXBUF is offered.
    pub mrg_rxbuf: bool,
}

impl<B: NetBackend + 'static> crate::persist::Persist for Net<B> {
    type State = NetState;
    type Resources = B;
    type Error = std::convert::Infallible;

    fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            mtu: self.mtu,
            mrg_rxbuf: self.mrg_rxbuf,
        }
    }

    /// A device on `backend` (the TAP opened anew) in `state`. The features
    /// the driver accepted are the transport's to restore (which also
    /// configures their offloads on the backend).
    fn restore(backend: B, state: &NetState) -> Result<Self, Self::Error> {
        let mut dev = Net::new(backend, state.mac).with_mrg_rxbuf(state.mrg_rxbuf);
        dev.mtu = state.mtu;
        Ok(dev)
    }
}

/// Receive buffers taken from the ring and not yet filled. The device keeps
/// them between frames, so that with MRG_RXBUF it can read a frame into as many
/// buffers as the largest frame needs and give back only those it filled.
#[derive(Default)]
struct RxBuffers {
    /// Per chain, oldest first: head index, number of descriptors, room in bytes.
    chains: VecDeque<(u16, usize, usize)>,
    /// The descriptors of those chains, in order: guest address and length.
    descs: VecDeque<(GuestAddress, usize)>,
    /// Total room of the chains.
    room: usize,
}

impl RxBuffers {
    /// Whether a frame can be read now: one chain without MRG_RXBUF (`want` 0),
    /// else room for the largest frame, or every descriptor the ring can hold.
    fn ready(&self, want: usize, queue_size: u16) -> bool {
        if want == 0 {
            return !self.chains.is_empty();
        }
        !self.chains.is_empty()
            && (self.room >= want
                || self.chains.len() >= usize::from(queue_size)
                || self.descs.len() >= usize::from(queue_size))
    }

    /// Takes chains from the available ring until [`Self::ready`]. Buffers the
    /// device cannot write go back empty and are counted. Err: the ring is broken.
    fn take_buffers(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        want: usize,
        counters: &mut NetCounters,
    ) -> Result<(), ()> {
        while !self.ready(want, q.size()) {
            if !ring::avail_index_sane(q, mem) {
                return Err(());
            }
            let Some(chain) = ring::pop_chain(q, mem).map_err(|_| ())? else {
                return Ok(());
            };
            let head = chain.head_index();
            // An overlong chain comes back empty, hence unusable.
            let descs = ring::descriptors(chain, q.size()).unwrap_or_default();
            let room: usize = descs.iter().map(|d| d.len() as usize).sum();
            let usable = room >= NET_HDR_SIZE
                && descs.iter().all(|d| {
                    d.is_write_only() && guest_iovec(mem, d.addr(), d.len() as usize).is_some()
                });
            if !usable {
                counters.rx_dropped += 1;
                crate::guest_warn!("virtio-net: unusable receive buffer from the guest");
                // The chains held stay the last ones taken from the ring (a
                // snapshot gives them back by rewinding the available index):
                // those taken before this one go back empty with it.
                for (held, _, _) in self.chains.drain(..) {
                    q.add_used(mem, held, 0).map_err(|_| ())?;
                }
                self.descs.clear();
                self.room = 0;
                q.add_used(mem, head, 0).map_err(|_| ())?;
                continue;
            }
            self.chains.push_back((head, descs.len(), room));
            self.descs
                .extend(descs.iter().map(|d| (d.addr(), d.len() as usize)));
            self.room += room;
        }
        Ok(())
    }

    /// Iovecs over the buffers one frame may fill (the first chain, or with
    /// `want` > 0 the chains up to `want` bytes), and their room.
    fn iovecs(&self, mem: &GuestMemoryMmap, want: usize) -> (Vec<libc::iovec>, usize) {
        let mut iov = Vec::new();
        let mut room = 0;
        let mut next = 0;
        for &(_, ndescs, chain_room) in &self.chains {
            if iov.len() + ndescs > MAX_IOVECS {
                break;
            }
            for &(addr, len) in self.descs.range(next..next + ndescs) {
                // Checked when the chain was taken, and guest memory does not
                // change: a failure here would be a bug, so read nothing.
                let Some(v) = guest_iovec_mut(mem, addr, len) else {
                    return (Vec::new(), 0);
                };
                iov.push(v);
            }
            next += ndescs;
            room += chain_room;
            if room >= want {
                break;
            }
        }
        (iov, room)
    }

    /// Gives up the chains a frame of `n` bytes filled, writes their count into
    /// the header's num_buffers (1 without MRG_RXBUF, as virtio 1.2 §5.1.6.4
    /// asks), and returns their used elements.
    fn consume(&mut self, mem: &GuestMemoryMmap, n: usize) -> Vec<(u16, u32)> {
        let mut used = Vec::with_capacity(1);
        let mut left = n;
        for &(head, _, room) in &self.chains {
            let take = left.min(room);
            used.push((head, take as u32));
            left -= take;
            if left == 0 {
                break;
            }
        }
        // num_buffers sits at bytes 10-11 of the header, inside the first chain.
        let first_ndescs = self.chains.front().map_or(0, |c| c.1);
        let count = (used.len() as u16).to_le_bytes();
        for (i, byte) in count.iter().enumerate() {
            let mut offset = NET_HDR_SIZE - 2 + i;
            for &(addr, len) in self.descs.range(..first_ndescs) {
                if offset < len {
                    let _ = mem.write_obj(*byte, addr.unchecked_add(offset as u64));
                    break;
                }
                offset -= len;
            }
        }
        for (_, ndescs, room) in self.chains.drain(..used.len()) {
            self.descs.drain(..ndescs);
            self.room -= room;
        }
        used
    }

    /// Writes `parts` one after the other into the buffers a frame may
    /// fill (as [`Self::iovecs`] chooses them); false if they do not fit.
    fn fill(&self, mem: &GuestMemoryMmap, want: usize, parts: &[&[u8]]) -> bool {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut bytes = parts.iter().flat_map(|p| p.iter().copied());
        let mut written = 0;
        let mut next = 0;
        let mut room = 0;
        for &(_, ndescs, chain_room) in &self.chains {
            for &(addr, len) in self.descs.range(next..next + ndescs) {
                let chunk: Vec<u8> = bytes.by_ref().take(len).collect();
                if chunk.is_empty() {
                    break;
                }
                if mem.write_slice(&chunk, addr).is_err() {
                    return false;
                }
                written += chunk.len();
            }
            next += ndescs;
            room += chain_room;
            if written == total || room >= want {
                break;
            }
        }
        written == total
    }

    fn clear(&mut self) {
        *self = RxBuffers::default();
    }
}

impl<B: NetBackend + 'static> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS);
        if self.mrg_rxbuf {
            f |= 1 << VIRTIO_NET_F_MRG_RXBUF;
        }
        if self.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        if self.backend.supports_offloads() {
            f |= (1 << VIRTIO_NET_F_CSUM)
                | (1 << VIRTIO_NET_F_GUEST_CSUM)
                | (1 << VIRTIO_NET_F_GUEST_TSO4)
                | (1 << VIRTIO_NET_F_GUEST_TSO6)
                | (1 << VIRTIO_NET_F_HOST_TSO4)
                | (1 << VIRTIO_NET_F_HOST_TSO6);
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
        if let Err(e) = self.backend.set_offloads(self.acked_features) {
            log::warn!("virtio-net: cannot configure offloads on the backend: {e}");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-net: ignoring write to read-only config at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        ActivateError::check_count(&queues, 2)?;
        self.active = Some((mem, queues, interrupt));
        self.rx_waiting_for_buffers = false;
        self.rx.clear();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            RX => {
                // New receive buffers: resume reading the backend.
                self.rx_waiting_for_buffers = false;
                self.process_rx()
            }
            TX => {
                // Answers of the metadata service go out at once.
                self.process_tx() && (!self.mmds_pending() || self.process_rx())
            }
            _ => true,
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.rx_waiting_for_buffers = false;
        self.tx_more = false;
        self.rx_throttled = false;
        self.tx_throttled = false;
        self.rx.clear();
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        let (_, queues, _) = self.active.as_ref()?;
        let mut states: Vec<_> = queues.iter().map(|q| q.state()).collect();
        // Receive chains taken from the ring but not filled were the last ones
        // taken (they are used oldest first): a restored device takes them
        // again from the available ring.
        if let Some(rx) = states.get_mut(RX) {
            rx.next_avail = rx.next_avail.wrapping_sub(self.rx.chains.len() as u16);
        }
        Some(states)
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.backend.as_raw_fd())
    }

    fn queue_pending(&self, index: usize) -> bool {
        // Frames of the metadata service left after a receive pass stopped
        // at its budget: nothing else would bring the device back for them
        // (the TAP's readiness does for its own frames).
        let mmds_left = self.mmds_pending() && !self.rx_waiting_for_buffers;
        (index == TX && self.tx_more) || ((index == TX || index == RX) && mmds_left)
    }

    fn process_backend(&mut self) -> bool {
        self.process_rx()
    }

    fn wants_backend_events(&self) -> bool {
        self.active.is_some()
            && !self.rx_waiting_for_buffers
            && !self.rx_throttled
            && !self.backend_failed
    }

    fn throttled_for(&self) -> Option<std::time::Duration> {
        self.active.as_ref()?;
        // Asked after every event: the clock is read only when held back.
        if !self.rx_throttled && !self.tx_throttled {
            return None;
        }
        let now = Instant::now();
        let rx = self
            .rx_throttled
            .then(|| self.rx_limiter.wait(now))
            .flatten();
        let tx = self
            .tx_throttled
            .then(|| self.tx_limiter.wait(now))
            .flatten();
        earliest(rx, tx)
    }

    fn process_timer(&mut self) -> bool {
        let mut healthy = true;
        if self.tx_throttled {
            self.counters.tx_rate_limiter_events += 1;
            healthy &= self.process_tx();
        }
        if self.rx_throttled {
            self.counters.rx_rate_limiter_events += 1;
            healthy &= self.process_rx();
        }
        healthy
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("rx_bytes_count", c.rx_bytes),
            ("rx_packets_count", c.rx_packets),
            ("rx_count", c.rx_packets),
            ("rx_fails", c.rx_dropped),
            ("tx_bytes_count", c.tx_bytes),
            ("tx_packets_count", c.tx_packets),
            ("tx_count", c.tx_packets),
            ("tx_malformed_frames", c.tx_dropped),
            ("rx_event_rate_limiter_count", c.rx_rate_limiter_events),
            ("tx_rate_limiter_event_count", c.tx_rate_limiter_events),
            (
                "rx_rate_limiter_throttled",
                self.rx_limiter.throttled_events(),
            ),
            (
                "tx_rate_limiter_throttled",
                self.tx_limiter.throttled_events(),
            ),
        ]
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn report(&self) -> Option<String> {
        let c = self.counters;
        Some(format!(
            "tx {} packets {} bytes {} dropped, rx {} packets {} bytes {} dropped",
            c.tx_packets, c.tx_bytes, c.tx_dropped, c.rx_packets, c.rx_bytes, c.rx_dropped
        ))
    }
}

#[cfg(test)]
mod tests;
