//! Queue helpers that virtio-queue does not offer: a checked pop, a bound on
//! the work of one pass, publishing several used elements under one index
//! update, and deciding on an interrupt for all that was published since a
//! given point.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use crate::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

/// Errors of the queue helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The available index says chains are ready that cannot be read.
    #[error("The available ring announces chains that cannot be read; the queue is unusable until the driver resets the device.")]
    Unreadable,
}

/// Most chains a device completes in one pass over a queue before it lets the
/// event loop serve everything else (and asks to be called again).
pub const BUDGET: usize = 256;

/// Gives the chain last popped back to the available ring: the next pop
/// returns it again (a request the device may not serve yet).
pub fn unpop(q: &mut Queue) {
    q.set_next_avail(q.next_avail().wrapping_sub(1));
}

/// Whether the driver's available index is at most a queue length ahead of the
/// device: anything else is a guest error that would make the device spin.
pub fn avail_index_sane(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    match q.avail_idx(mem, Ordering::Acquire) {
        Ok(avail) => (avail - Wrapping(q.next_avail())).0 <= q.size(),
        Err(_) => false,
    }
}

/// The next available chain, None when the driver has posted no more, or Err
/// when the ring says there is more but it cannot be read (a queue the device
/// cannot use: looping on it would never end).
pub fn pop_chain<'a>(
    q: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, Error> {
    // The driver may post a chain between the pop's read of the available
    // index and the check below (a vCPU runs beside the device): then the
    // index has moved and the pop is tried once more before the queue is
    // called unusable.
    for attempt in 0..2 {
        if let Some(chain) = q.pop_descriptor_chain(mem) {
            return Ok(Some(chain));
        }
        match q.avail_idx(mem, Ordering::Acquire) {
            Ok(avail) if avail.0 == q.next_avail() => return Ok(None),
            Ok(_) if attempt == 0 => continue,
            _ => break,
        }
    }
    crate::guest_warn!("virtio: {}", Error::Unreadable);
    Err(Error::Unreadable)
}

/// The next chain of `q` as its head index and descriptors (empty if the
/// chain is longer than the queue, see [`descriptors`]); None when the
/// driver made nothing more available.
pub fn pop_descriptors(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Option<(u16, Vec<Descriptor>)>, Error> {
    let Some(chain) = pop_chain(q, mem)? else {
        return Ok(None);
    };
    let head = chain.head_index();
    let size = q.size();
    Ok(Some((head, descriptors(chain, size).unwrap_or_default())))
}

/// Size of the used ring header (flags and index).
const USED_HEADER: u64 = 4;
/// Size of one used element.
const USED_ELEM: u64 = 8;

/// The descriptors of `chain`, or None if it is longer than `max`, the queue
/// size: a driver must not make a longer chain (virtio 1.2 §2.7.5.3.1), and
/// inside an indirect table virtio-queue would follow up to 65535. The
/// iterator itself stops at loops and at descriptors outside guest memory.
pub fn descriptors(chain: DescriptorChain<&GuestMemoryMmap>, max: u16) -> Option<Vec<Descriptor>> {
    let descs: Vec<Descriptor> = chain.take(usize::from(max) + 1).collect();
    (descs.len() <= usize::from(max)).then_some(descs)
}

/// Puts every `(head, length)` of `elems` on the used ring and only then moves
/// the used index past them, so that the driver sees all of them or none (a
/// merged receive frame must never be seen in part).
pub fn add_used_all(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    elems: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), first)) = elems.split_last() else {
        return Ok(());
    };
    let base = Wrapping(q.next_used());
    for (i, &(head, len)) in first.iter().enumerate() {
        if head >= q.size() {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = u64::from((base + Wrapping(i as u16)).0 % q.size());
        let addr = GuestAddress(q.used_ring())
            .checked_add(USED_HEADER + slot * USED_ELEM)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; USED_ELEM as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    // add_used writes the last element and then stores the index with release
    // ordering, which publishes the elements written above with it.
    q.set_next_used((base + Wrapping(first.len() as u16)).0);
    q.add_used(mem, last_head, last_len)
}

/// Whether the driver wants an interrupt for the used elements published since
/// the used index was `since` (with EVENT_IDX: whether its `used_event` lies in
/// that span; without: always).
pub fn needs_interrupt_since(q: &Queue, mem: &GuestMemoryMmap, since: u16) -> bool {
    if !q.event_idx_enabled() {
        return true;
    }
    // The used index stores must be visible before used_event is read.
    fence(Ordering::SeqCst);
    let Some(addr) = GuestAddress(q.avail_ring()).checked_add(4 + 2 * u64::from(q.size())) else {
        return true;
    };
    let Ok(event) = mem.load::<u16>(addr, Ordering::Relaxed) else {
        return true;
    };
    let now = Wrapping(q.next_used());
    now - Wrapping(u16::from_le(event)) - Wrapping(1) < now - Wrapping(since)
}
