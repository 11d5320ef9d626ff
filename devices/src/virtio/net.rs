//! virtio-net (virtio 1.2 §5.1): one receive and one transmit queue over a
//! packet backend (a TAP device opened with a virtio-net header, or, in tests,
//! a datagram socket). Frames move between the backend and guest memory with
//! readv/writev straight on the guest's buffers: the VMM makes no copy. Every
//! frame carries the 12-byte virtio-net header, which the TAP device
//! understands as is, so checksum and segmentation offloads pass through.

use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_net::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use super::{
    ActivateError, Interrupt, VirtioDevice, INTERRUPT_USED_BUFFER, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the virtio-net header of virtio 1.x.
pub const NET_HDR_SIZE: usize = 12;
/// Largest frame the device moves: a 64 KiB GSO frame plus the Ethernet header.
pub const MAX_FRAME: usize = 65536 + 14;
const RX: usize = 0;
const TX: usize = 1;

/// What the backend must do beyond moving frames.
pub trait NetBackend: AsRawFd + Send {
    /// Whether frames carry the virtio-net header and the backend can take the
    /// offloads it describes.
    fn supports_offloads(&self) -> bool;
    /// Configures the offloads the guest accepted (its `GUEST_*` features).
    fn set_offloads(&mut self, acked_features: u64) -> std::io::Result<()>;
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
}

/// A virtio network device.
pub struct Net<B: NetBackend> {
    backend: B,
    mac: [u8; 6],
    mtu: Option<u16>,
    acked_features: u64,
    counters: NetCounters,
    /// The guest has no receive buffers: stop reading the backend until it posts some.
    rx_waiting_for_buffers: bool,
    active: Option<(GuestMemoryMmap, Vec<Queue>, Interrupt)>,
}

/// Whether the driver's available index is at most a queue length ahead of the
/// device: anything else is a guest error that would make the device spin.
fn avail_index_sane(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(avail) => (avail - std::num::Wrapping(q.next_avail())).0 <= q.size(),
        Err(_) => false,
    }
}

/// Builds iovecs over guest memory for `descs`; None if any lies outside it.
fn iovecs(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<Vec<libc::iovec>> {
    descs
        .iter()
        .map(|d| {
            let slice = mem.get_slice(d.addr(), d.len() as usize).ok()?;
            Some(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: d.len() as usize,
            })
        })
        .collect()
}

impl<B: NetBackend> Net<B> {
    /// A device with `mac` on `backend`.
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        Net {
            backend,
            mac,
            mtu: None,
            acked_features: 0,
            counters: NetCounters::default(),
            rx_waiting_for_buffers: false,
            active: None,
        }
    }

    /// Announces `mtu` to the guest (VIRTIO_NET_F_MTU).
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        self.mtu = Some(mtu);
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
        let mut used_any = false;
        loop {
            // With EVENT_IDX, tell the driver not to kick while the queue is drained,
            // then re-arm and look again for what arrived in between.
            if q.event_idx_enabled() && q.disable_notification(&*mem).is_err() {
                return false;
            }
            if !avail_index_sane(q, mem) {
                return false;
            }
            while let Some(chain) = q.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let descs: Vec<Descriptor> = chain.collect();
                let total: usize = descs.iter().map(|d| d.len() as usize).sum();
                let well_formed = !descs.is_empty()
                    && descs.iter().all(|d| !d.is_write_only())
                    && (NET_HDR_SIZE..=NET_HDR_SIZE + MAX_FRAME).contains(&total);
                let sent = well_formed
                    && match iovecs(mem, &descs) {
                        Some(iov) => {
                            // SAFETY: every iovec covers a live mapping of guest memory
                            // (checked by get_slice for its whole length); writev only
                            // reads from them.
                            let n = unsafe {
                                libc::writev(
                                    self.backend.as_raw_fd(),
                                    iov.as_ptr(),
                                    iov.len() as i32,
                                )
                            };
                            n >= 0 && n as usize == total
                        }
                        None => false,
                    };
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
                used_any = true;
            }
            if !q.event_idx_enabled() {
                break;
            }
            match q.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => return false,
            }
        }
        if used_any && q.needs_notification(&*mem).unwrap_or(true) {
            interrupt.raise(INTERRUPT_USED_BUFFER);
        }
        true
    }

    /// Moves frames from the backend into receive buffers until the backend has
    /// none left or the guest has no buffers (then stops reading the backend).
    pub fn process_rx(&mut self) -> bool {
        let Some((mem, queues, interrupt)) = self.active.as_mut() else {
            return true;
        };
        let q = &mut queues[RX];
        let mut used_any = false;
        loop {
            if !avail_index_sane(q, mem) {
                return false;
            }
            let Some(chain) = q.pop_descriptor_chain(&*mem) else {
                // No buffers: ask the driver to kick when it posts some (with
                // EVENT_IDX that means re-arming), and stop reading the backend.
                match q.enable_notification(&*mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(_) => return false,
                }
                self.rx_waiting_for_buffers = true;
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let room: usize = descs.iter().map(|d| d.len() as usize).sum();
            let usable = descs.iter().all(|d| d.is_write_only()) && room >= NET_HDR_SIZE;
            let iov = if usable { iovecs(mem, &descs) } else { None };
            let Some(iov) = iov else {
                // A buffer the device cannot use: give it back empty.
                self.counters.rx_dropped += 1;
                crate::guest_warn!("virtio-net: unusable receive buffer from the guest");
                if q.add_used(&*mem, head, 0).is_err() {
                    return false;
                }
                used_any = true;
                continue;
            };
            // SAFETY: every iovec covers a live mapping of guest memory (checked by
            // get_slice for its whole length) that the guest gave the device to write.
            let n =
                unsafe { libc::readv(self.backend.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n < 0 {
                // Nothing to read (or a backend error): return the buffer to the ring.
                q.go_to_previous_position();
                break;
            }
            let n = n as usize;
            if n < NET_HDR_SIZE {
                self.counters.rx_dropped += 1;
                q.go_to_previous_position();
                continue;
            }
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += (n - NET_HDR_SIZE) as u64;
            if q.add_used(&*mem, head, n as u32).is_err() {
                return false;
            }
            used_any = true;
        }
        if used_any && q.needs_notification(&*mem).unwrap_or(true) {
            interrupt.raise(INTERRUPT_USED_BUFFER);
        }
        true
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
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
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 2,
            });
        }
        self.active = Some((mem, queues, interrupt));
        self.rx_waiting_for_buffers = false;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            RX => {
                // New receive buffers: resume reading the backend.
                self.rx_waiting_for_buffers = false;
                self.process_rx()
            }
            TX => self.process_tx(),
            _ => true,
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.rx_waiting_for_buffers = false;
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.backend.as_raw_fd())
    }

    fn process_backend(&mut self) -> bool {
        self.process_rx()
    }

    fn wants_backend_events(&self) -> bool {
        self.active.is_some() && !self.rx_waiting_for_buffers
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
