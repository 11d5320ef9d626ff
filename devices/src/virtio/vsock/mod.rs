//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host
//! programs, over Firecracker's hybrid Unix-socket backend (`muxer.rs`).
//! Three queues: receive (packets for the guest), transmit (packets from
//! it) and events. Every guest-given header, length and buffer is checked; a
//! malformed packet is dropped, a ring the device cannot read stops it.

pub mod muxer;
pub mod packet;

use std::os::fd::RawFd;

use crate::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};

use super::{
    ring, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use muxer::Muxer;
use packet::{Header, HDR_SIZE};

/// Virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data of one packet from the guest (Linux sends at most 64 KiB).
pub const MAX_PKT_DATA: usize = 64 * 1024;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

/// Packet counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockCounters {
    /// Packets from the guest.
    pub tx_packets: u64,
    /// Packets from the guest dropped as malformed.
    pub tx_dropped: u64,
    /// Packets to the guest.
    pub rx_packets: u64,
    /// Data bytes each way.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// A virtio-vsock device.
pub struct Vsock {
    muxer: Muxer,
    acked_features: u64,
    counters: VsockCounters,
    active: Option<(GuestMemoryMmap, Vec<Queue>, Interrupt)>,
    /// The last transmit pass stopped at its budget.
    tx_more: bool,
    /// A transport reset was sent and the driver has not handled it yet
    /// (it gives the event buffer back when it has): nothing goes to the
    /// guest meanwhile, or the reset would also end connections made after it.
    reset_pending: bool,
    /// The event queue's available index when the reset was sent: the
    /// driver has handled it once it makes another buffer available (a
    /// notification alone proves nothing: the VMM signals every queue after
    /// a restore).
    evt_avail_at_reset: u16,
    /// Restored from a state that does not list its connections: the driver
    /// must be told that all of them are gone.
    needs_transport_reset: bool,
}

impl Vsock {
    /// A device for the guest with CID `muxer.guest_cid()`.
    pub fn new(muxer: Muxer) -> Self {
        Vsock {
            muxer,
            acked_features: 0,
            counters: VsockCounters::default(),
            active: None,
            tx_more: false,
            reset_pending: false,
            evt_avail_at_reset: 0,
            needs_transport_reset: false,
        }
    }

    /// After a restore: ends, in the guest, the connections the snapshot had
    /// open. With the list saved, each gets a reset packet (nothing else
    /// waits); without it, the driver gets a transport reset, and nothing
    /// reaches the guest until it has handled it. False if the driver left
    /// no event buffer for the transport reset.
    pub fn reset_after_restore(&mut self) -> bool {
        if !self.needs_transport_reset {
            return true;
        }
        self.needs_transport_reset = false;
        self.send_transport_reset()
    }

    /// The counters so far.
    pub fn counters(&self) -> VsockCounters {
        self.counters
    }

    /// Stops listening and removes the Unix socket (at VMM exit).
    pub fn close(&mut self) {
        self.muxer.close();
    }

    /// Tells the driver that every connection is gone
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, after a snapshot restore: the
    /// host sockets of the saved connections do not exist any more). False
    /// if the driver left no event buffer.
    pub fn send_transport_reset(&mut self) -> bool {
        let Some((mem, queues, interrupt)) = self.active.as_mut() else {
            return false;
        };
        let q = &mut queues[EVT];
        let Ok(Some((head, descs))) = ring::pop_descriptors(q, mem) else {
            return false;
        };
        // struct virtio_vsock_event { le32 id; }, id 0: transport reset.
        let written = match descs.first() {
            Some(d) if d.is_write_only() && d.len() >= 4 => {
                u32::from(mem.write_slice(&0u32.to_le_bytes(), d.addr()).is_ok()) * 4
            }
            _ => 0,
        };
        if q.add_used(&*mem, head, written).is_err() {
            return false;
        }
        interrupt.signal_used(EVT);
        self.evt_avail_at_reset = q
            .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
            .map_or(0, |w| w.0);
        self.reset_pending = written == 4;
        self.reset_pending
    }

    /// Whether the driver made an event buffer available since the reset.
    fn reset_handled(&self) -> bool {
        let Some((mem, queues, _)) = self.active.as_ref() else {
            return true;
        };
        queues[EVT]
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_or(true, |w| w.0 != self.evt_avail_at_reset)
    }

    /// Takes the guest's packets. False if the ring is unusable.
    fn process_tx(&mut self) -> bool {
        let Some((mem, queues, interrupt)) = self.active.as_mut() else {
            return true;
        };
        let q = &mut queues[TX];
        self.tx_more = false;
        if !ring::avail_index_sane(q, mem) {
            return false;
        }
        let mut used = 0;
        while used < ring::BUDGET {
            let (head, descs) = match ring::pop_descriptors(q, mem) {
                Ok(Some(popped)) => popped,
                Ok(None) => break,
                Err(_) => return false,
            };
            match read_packet(mem, &descs) {
                Some((h, data)) => {
                    self.counters.tx_packets += 1;
                    self.counters.tx_bytes += data.len() as u64;
                    self.muxer.send_pkt(&h, &data);
                }
                None => {
                    self.counters.tx_dropped += 1;
                    crate::guest_warn!("vsock: malformed packet from the guest dropped");
                }
            }
            if q.add_used(&*mem, head, 0).is_err() {
                return false;
            }
            used += 1;
        }
        self.tx_more = used >= ring::BUDGET;
        if used > 0 {
            interrupt.signal_used(TX);
        }
        true
    }

    /// Fills the guest's receive buffers with what the host side has for it.
    fn process_rx(&mut self) -> bool {
        if self.reset_pending {
            return true;
        }
        let Some((mem, queues, interrupt)) = self.active.as_mut() else {
            return true;
        };
        let q = &mut queues[RX];
        if !ring::avail_index_sane(q, mem) {
            return false;
        }
        let mut used = 0;
        while used < ring::BUDGET && self.muxer.has_rx() {
            let (head, descs) = match ring::pop_descriptors(q, mem) {
                Ok(Some(popped)) => popped,
                Ok(None) => break,
                Err(_) => return false,
            };
            let room: usize = descs.iter().map(|d| d.len() as usize).sum();
            let writable = !descs.is_empty() && descs.iter().all(|d| d.is_write_only());
            if !writable || room < HDR_SIZE {
                crate::guest_warn!("vsock: unusable receive buffer from the guest");
                if q.add_used(&*mem, head, 0).is_err() {
                    return false;
                }
                used += 1;
                continue;
            }
            let Some((h, data)) = self.muxer.recv_pkt(room - HDR_SIZE) else {
                // Nothing after all (a socket had no data): the buffer stays.
                q.set_next_avail(q.next_avail().wrapping_sub(1));
                break;
            };
            let written = match write_packet(mem, &descs, &h, &data) {
                Some(n) => n,
                None => {
                    crate::guest_warn!("vsock: receive buffer outside guest memory");
                    0
                }
            };
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += data.len() as u64;
            if q.add_used(&*mem, head, written).is_err() {
                return false;
            }
            used += 1;
        }
        if used > 0 {
            interrupt.signal_used(RX);
        }
        true
    }
}

/// What a snapshot keeps of a vsock device: the guest's CID. Connections are
/// not kept (their host sockets belong to the old process): a restored
/// device starts with none and tells the driver so (transport reset); the
/// Unix socket is bound anew, at the configured path (`vsock_override`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The next port a host-initiated connection gets: a restored device
    /// goes on from there, never reusing a port the guest may still hold.
    #[serde(default)]
    pub next_local_port: u32,
    /// The connections open when the snapshot was taken, as (host port,
    /// guest port): a restored device resets exactly these in the guest
    /// (their host sockets are gone). None (a state without the list): the
    /// driver gets a transport reset instead.
    #[serde(default)]
    pub open_connections: Option<Vec<(u32, u32)>>,
}

impl crate::persist::Persist for Vsock {
    type State = VsockState;
    type Resources = Muxer;
    type Error = std::convert::Infallible;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.muxer.guest_cid(),
            next_local_port: self.muxer.next_local_port(),
            open_connections: Some(self.muxer.connection_keys()),
        }
    }

    /// A device on `muxer` (bound for the saved CID by the caller).
    fn restore(mut muxer: Muxer, state: &VsockState) -> Result<Self, Self::Error> {
        muxer.set_next_local_port(state.next_local_port);
        let mut dev = Vsock::new(muxer);
        match &state.open_connections {
            Some(keys) => dev.muxer.reset_stale(keys),
            None => dev.needs_transport_reset = true,
        }
        Ok(dev)
    }
}

/// Reads a packet from the guest's readable descriptors: the header, then
/// `len` bytes of data. None if the chain is malformed: writable parts, too
/// short for the header or the data it announces, data over MAX_PKT_DATA, or
/// buffers outside guest memory.
fn read_packet(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<(Header, Vec<u8>)> {
    if descs.is_empty() || descs.iter().any(|d| d.is_write_only()) {
        return None;
    }
    let total: usize = descs.iter().map(|d| d.len() as usize).sum();
    if total < HDR_SIZE {
        return None;
    }
    let mut hdr = [0u8; HDR_SIZE];
    let mut copied = gather(mem, descs, 0, &mut hdr)?;
    debug_assert_eq!(copied, HDR_SIZE);
    let h = Header::from_bytes(&hdr);
    let len = h.len as usize;
    if len > MAX_PKT_DATA || len > total - HDR_SIZE {
        return None;
    }
    let mut data = vec![0u8; len];
    copied = gather(mem, descs, HDR_SIZE, &mut data)?;
    (copied == len).then_some((h, data))
}

/// Copies `out.len()` bytes starting `skip` bytes into the chain; None if a
/// buffer is outside guest memory.
fn gather(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    skip: usize,
    out: &mut [u8],
) -> Option<usize> {
    let mut pos = 0usize; // offset in the chain
    let mut done = 0usize;
    for d in descs {
        let len = d.len() as usize;
        if done == out.len() {
            break;
        }
        if pos + len <= skip {
            pos += len;
            continue;
        }
        let from = skip.saturating_sub(pos);
        let n = (len - from).min(out.len() - done);
        let addr = d.addr().checked_add(from as u64)?;
        mem.read_slice(&mut out[done..done + n], addr).ok()?;
        done += n;
        pos += len;
    }
    Some(done)
}

/// Writes the header and data into the guest's writable descriptors (the
/// caller checked they hold them); returns the bytes written, None if a
/// buffer is outside guest memory.
fn write_packet(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    h: &Header,
    data: &[u8],
) -> Option<u32> {
    let hdr = h.to_bytes();
    let mut parts: [&[u8]; 2] = [&hdr, data];
    let mut written = 0usize;
    for d in descs {
        let mut at = d.addr();
        let mut left = d.len() as usize;
        for part in parts.iter_mut() {
            if left == 0 {
                break;
            }
            let n = part.len().min(left);
            if n == 0 {
                continue;
            }
            mem.write_slice(&part[..n], at).ok()?;
            at = at.checked_add(n as u64)?;
            left -= n;
            written += n;
            *part = &part[n..];
        }
    }
    u32::try_from(written).ok()
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.muxer.guest_cid().to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        ActivateError::check_count(&queues, 3)?;
        self.active = Some((mem, queues, interrupt));
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            // The guest's packets may owe it answers: both directions.
            TX => self.process_tx() && self.process_rx(),
            RX => self.process_rx(),
            // The driver gives event buffers back after handling an event:
            // a transport reset is done, the guest may hear from the host.
            EVT => {
                if self.reset_pending && self.reset_handled() {
                    self.reset_pending = false;
                }
                self.process_rx()
            }
            _ => true,
        }
    }

    fn queue_pending(&self, index: usize) -> bool {
        index == TX && self.tx_more
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.tx_more = false;
        self.reset_pending = false;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        let (_, queues, _) = self.active.as_ref()?;
        Some(queues.iter().map(|q| q.state()).collect())
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.fd())
    }

    fn process_backend(&mut self) -> bool {
        self.muxer.process_events();
        self.process_rx()
    }

    fn wants_backend_events(&self) -> bool {
        self.active.is_some()
    }

    fn report(&self) -> Option<String> {
        let c = self.counters;
        Some(format!(
            "tx {} packets {} bytes {} dropped, rx {} packets {} bytes, {} connections open",
            c.tx_packets,
            c.tx_bytes,
            c.tx_dropped,
            c.rx_packets,
            c.rx_bytes,
            self.muxer.connection_count()
        ))
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        let m = self.muxer.counters();
        vec![
            ("rx_bytes_count", c.rx_bytes),
            ("rx_packets_count", c.rx_packets),
            ("tx_bytes_count", c.tx_bytes),
            ("tx_packets_count", c.tx_packets),
            ("conns_added", m.added),
            ("conns_killed", m.killed),
            ("conns_removed", m.removed),
        ]
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests;
