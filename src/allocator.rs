//! The VM's placement resources, handed out by the rust-vmm `vm-allocator`
//! crate: the guest-physical window where virtio-mmio devices get their
//! register pages, and the interrupt lines (GSIs on the in-kernel IOAPIC)
//! they raise. A device gets the first free page and line, or on restore
//! exactly the ones its snapshot names; a removed device gives them back.

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::arch::x86_64::layout::{
    VIRTIO_IRQ_END, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::config::MAX_VIRTIO_DEVICES;

/// Errors of placement.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Every page of the window (or every line) is taken.
    #[error("No {0} is left: at most {MAX_VIRTIO_DEVICES} virtio devices fit.")]
    Exhausted(&'static str),
    /// No room is left for a device's memory.
    #[error(
        "No {0} is left for device memory (pmem files); attach fewer or smaller pmem devices."
    )]
    NoDeviceMemory(&'static str),
    /// A snapshot names a page or line that is taken, or outside this VMM's range.
    #[error("The {what} {value:#x} the snapshot names is taken or outside this VMM's range (a snapshot from another device layout).")]
    Unavailable { what: &'static str, value: u64 },
}

/// The width of one interrupt line in the allocator's space.
const LINE: u64 = 2;

/// What a device was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// First address of its register page.
    pub base: u64,
    /// Its interrupt line.
    pub irq: u32,
}

/// An address allocator that refuses an exact claim of a range already
/// given out: vm-allocator 0.1.4's exact match hands out an allocated range
/// again, which a snapshot naming one place twice would reach.
#[derive(Clone, Debug)]
struct Space {
    inner: AddressAllocator,
    /// Start and length of every range given out.
    taken: std::collections::BTreeMap<u64, u64>,
}

impl Space {
    fn new(base: u64, size: u64) -> Result<Self, vm_allocator::Error> {
        Ok(Space {
            inner: AddressAllocator::new(base, size)?,
            taken: Default::default(),
        })
    }

    fn allocate(
        &mut self,
        len: u64,
        align: u64,
        policy: AllocPolicy,
    ) -> Result<RangeInclusive, vm_allocator::Error> {
        if let AllocPolicy::ExactMatch(at) = policy {
            let end = at.saturating_add(len);
            let before = self.taken.range(..end).next_back();
            if before.is_some_and(|(s, l)| s.saturating_add(*l) > at) {
                return Err(vm_allocator::Error::ResourceNotAvailable);
            }
        }
        let r = self.inner.allocate(len, align, policy)?;
        self.taken.insert(r.start(), r.len());
        Ok(r)
    }

    fn free(&mut self, r: &RangeInclusive) {
        if self.taken.remove(&r.start()).is_some() {
            let _ = self.inner.free(r);
        }
    }
}

/// The free pages of the virtio-mmio window and the free interrupt lines.
#[derive(Clone, Debug)]
pub struct ResourceAllocator {
    mmio: Space,
    /// Line n is the range `[n * LINE, n * LINE + LINE - 1]`: the crate's
    /// exact-match allocation cannot take a free range of length one.
    irqs: Space,
}

impl Default for ResourceAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceAllocator {
    /// Everything free: pages from `VIRTIO_MMIO_START`, lines 5 to 22.
    pub fn new() -> Self {
        let pages = MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_SIZE;
        let lines = u64::from(VIRTIO_IRQ_END - VIRTIO_IRQ_START + 1);
        ResourceAllocator {
            // Both ranges are constants that fit: these cannot fail.
            mmio: Space::new(VIRTIO_MMIO_START, pages)
                .expect("the virtio-mmio window is a valid range"),
            irqs: Space::new(u64::from(VIRTIO_IRQ_START) * LINE, lines * LINE)
                .expect("the interrupt lines are a valid range"),
        }
    }

    /// The first free page and line (both or neither).
    pub fn place(&mut self) -> Result<Placement, Error> {
        let page = self
            .mmio
            .allocate(VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE, AllocPolicy::FirstMatch)
            .map_err(|_| Error::Exhausted("virtio-mmio page"))?;
        match self.irqs.allocate(LINE, LINE, AllocPolicy::FirstMatch) {
            Ok(line) => Ok(Placement {
                base: page.start(),
                irq: (line.start() / LINE) as u32,
            }),
            Err(_) => {
                self.mmio.free(&page);
                Err(Error::Exhausted("interrupt line"))
            }
        }
    }

    /// Exactly `want` (a restored device's), if both are free.
    pub fn claim(&mut self, want: Placement) -> Result<(), Error> {
        let page = self
            .mmio
            .allocate(
                VIRTIO_MMIO_SIZE,
                VIRTIO_MMIO_SIZE,
                AllocPolicy::ExactMatch(want.base),
            )
            .map_err(|_| Error::Unavailable {
                what: "virtio-mmio page",
                value: want.base,
            })?;
        let line = self.irqs.allocate(
            LINE,
            LINE,
            AllocPolicy::ExactMatch(u64::from(want.irq) * LINE),
        );
        if line.is_err() {
            self.mmio.free(&page);
            return Err(Error::Unavailable {
                what: "interrupt line",
                value: u64::from(want.irq),
            });
        }
        Ok(())
    }

    /// Gives back what [`Self::place`] or [`Self::claim`] handed out.
    pub fn release(&mut self, p: Placement) {
        let page = RangeInclusive::new(p.base, p.base + VIRTIO_MMIO_SIZE - 1);
        let first = u64::from(p.irq) * LINE;
        let line = RangeInclusive::new(first, first + LINE - 1);
        if let (Ok(page), Ok(line)) = (page, line) {
            self.mmio.free(&page);
            self.irqs.free(&line);
        }
    }
}

/// Where device memory (virtio-pmem's files) goes in guest-physical space:
/// from the first GiB boundary past RAM (and past 4 GiB), 1 TiB of room,
/// each region 2 MiB aligned; and the KVM memory slots it takes, after
/// those of RAM.
#[derive(Clone, Debug)]
pub struct DeviceMemoryAllocator {
    space: Space,
    slots: std::collections::BTreeSet<u32>,
}

/// The first KVM memory slot of device memory (RAM takes 0 and 1).
pub const FIRST_DEVICE_MEMORY_SLOT: u32 = 8;
/// Most device memory regions.
pub const MAX_DEVICE_MEMORY_SLOTS: u32 = 256;
/// Room for device memory.
pub const DEVICE_MEMORY_SPACE: u64 = 1 << 40;

impl DeviceMemoryAllocator {
    /// Everything free above `ram_end` (the first address past guest RAM).
    pub fn new(ram_end: u64) -> Self {
        const GIB: u64 = 1 << 30;
        let start = ram_end.max(1 << 32).div_ceil(GIB) * GIB;
        DeviceMemoryAllocator {
            // RAM is at most 1 TiB: the range fits in 64 bits and is not empty.
            space: Space::new(start, DEVICE_MEMORY_SPACE)
                .expect("the device memory window is a valid range"),
            slots: Default::default(),
        }
    }

    /// A slot and `len` bytes (a multiple of `align`) at `want`, or at the
    /// first free place.
    pub fn place(&mut self, len: u64, align: u64, want: Option<u64>) -> Result<(u32, u64), Error> {
        let slot = (FIRST_DEVICE_MEMORY_SLOT..FIRST_DEVICE_MEMORY_SLOT + MAX_DEVICE_MEMORY_SLOTS)
            .find(|s| !self.slots.contains(s))
            .ok_or(Error::NoDeviceMemory("memory slot"))?;
        let policy = match want {
            Some(at) => AllocPolicy::ExactMatch(at),
            None => AllocPolicy::FirstMatch,
        };
        let range = self
            .space
            .allocate(len, align, policy)
            .map_err(|_| match want {
                Some(at) => Error::Unavailable {
                    what: "device memory address",
                    value: at,
                },
                None => Error::NoDeviceMemory("address space"),
            })?;
        self.slots.insert(slot);
        Ok((slot, range.start()))
    }

    /// Gives back what [`Self::place`] handed out.
    pub fn release(&mut self, slot: u32, start: u64, len: u64) {
        self.slots.remove(&slot);
        if let Ok(r) = RangeInclusive::new(start, start + len - 1) {
            self.space.free(&r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_memory_goes_past_ram_2_mib_aligned_and_comes_back() {
        const MIB: u64 = 1 << 20;
        // 128 MiB of RAM: from 4 GiB.
        let mut a = DeviceMemoryAllocator::new(128 * MIB);
        let (s0, first) = a.place(2 * MIB, 2 * MIB, None).unwrap();
        assert_eq!((s0, first), (FIRST_DEVICE_MEMORY_SLOT, 1 << 32));
        let (s1, second) = a.place(4 * MIB, 2 * MIB, None).unwrap();
        assert_eq!((s1, second), (s0 + 1, first + 2 * MIB));
        // RAM past 4 GiB: from the next GiB after it.
        let b = DeviceMemoryAllocator::new((5 << 30) + 1).space;
        assert_eq!(b.inner.base(), 6 << 30);
        // A restored region is claimed where it was, or refused if taken.
        let taken = a.place(2 * MIB, 2 * MIB, Some(second));
        assert!(matches!(taken, Err(Error::Unavailable { .. })), "{taken:?}");
        a.release(s1, second, 4 * MIB);
        assert_eq!(
            a.place(4 * MIB, 2 * MIB, Some(second)).unwrap(),
            (s1, second)
        );
    }

    #[test]
    fn devices_get_pages_and_lines_in_order_until_the_window_is_full() {
        let mut a = ResourceAllocator::new();
        for i in 0..MAX_VIRTIO_DEVICES as u64 {
            assert_eq!(
                a.place().unwrap(),
                Placement {
                    base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
                    irq: VIRTIO_IRQ_START + i as u32,
                }
            );
        }
        assert_eq!(a.place(), Err(Error::Exhausted("virtio-mmio page")));
    }

    #[test]
    fn a_released_placement_is_reused_and_claims_are_exact() {
        let mut a = ResourceAllocator::new();
        let first = a.place().unwrap();
        let second = a.place().unwrap();
        a.release(first);
        assert_eq!(a.place().unwrap(), first, "the hole is filled first");
        // A restore claims what the snapshot names, in any order.
        let mut b = ResourceAllocator::new();
        b.claim(second).unwrap();
        b.claim(first).unwrap();
        assert!(matches!(b.claim(first), Err(Error::Unavailable { .. })));
        let outside = Placement {
            base: VIRTIO_MMIO_START - VIRTIO_MMIO_SIZE,
            irq: 7,
        };
        assert!(matches!(b.claim(outside), Err(Error::Unavailable { .. })));
        // A failed claim keeps nothing: line 7 is still free.
        let line7 = Placement {
            base: VIRTIO_MMIO_START + 5 * VIRTIO_MMIO_SIZE,
            irq: 7,
        };
        b.claim(line7).unwrap();
        // A place claimed twice (a snapshot naming it for two devices).
        assert!(matches!(b.claim(line7), Err(Error::Unavailable { .. })));
        let bad_irq = Placement {
            base: VIRTIO_MMIO_START + 6 * VIRTIO_MMIO_SIZE,
            irq: 30,
        };
        assert!(matches!(b.claim(bad_irq), Err(Error::Unavailable { .. })));
        b.claim(Placement {
            base: bad_irq.base,
            irq: 8,
        })
        .unwrap();
    }
}
