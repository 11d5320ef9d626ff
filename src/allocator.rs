//! The VM's placement resources, handed out by the rust-vmm `vm-allocator`
//! crate: the guest-physical window where virtio-mmio devices get their
//! register pages, and the interrupt lines (GSIs on the in-kernel IOAPIC)
//! they raise. A device gets the first free page and line, or on restore
//! exactly the ones its snapshot names; a removed device gives them back.

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::arch::x86_64::layout::{IRQ_MAX, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::config::MAX_VIRTIO_DEVICES;

/// Errors of placement.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Every page of the window (or every line) is taken.
    #[error("No {0} is left: at most {MAX_VIRTIO_DEVICES} virtio devices fit.")]
    Exhausted(&'static str),
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

/// The free pages of the virtio-mmio window and the free interrupt lines.
#[derive(Clone, Debug)]
pub struct ResourceAllocator {
    mmio: AddressAllocator,
    /// Line n is the range `[n * LINE, n * LINE + LINE - 1]`: the crate's
    /// exact-match allocation cannot take a free range of length one.
    irqs: AddressAllocator,
}

impl Default for ResourceAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceAllocator {
    /// Everything free: pages from `VIRTIO_MMIO_START`, lines 5 to 23.
    pub fn new() -> Self {
        let pages = MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_SIZE;
        let lines = u64::from(IRQ_MAX - VIRTIO_IRQ_START + 1);
        ResourceAllocator {
            // Both ranges are constants that fit: these cannot fail.
            mmio: AddressAllocator::new(VIRTIO_MMIO_START, pages)
                .expect("the virtio-mmio window is a valid range"),
            irqs: AddressAllocator::new(u64::from(VIRTIO_IRQ_START) * LINE, lines * LINE)
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
                let _ = self.mmio.free(&page);
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
            let _ = self.mmio.free(&page);
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
            let _ = self.mmio.free(&page);
            let _ = self.irqs.free(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
