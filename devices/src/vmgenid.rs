//! The VM generation ID: 16 bytes in guest memory that change whenever the
//! VM may have been duplicated (a snapshot restored), announced to the guest
//! by an ACPI notification (Linux's vmgenid driver then reseeds its random
//! number generator, so clones of one snapshot do not hand out the same
//! random bytes). The ACPI side (the `VGEN` device naming the ID's address,
//! and the generic event device whose interrupt carries the notification) is
//! the VMM's DSDT; this is the ID and its interrupt.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::memory::GuestMemoryMmap;
use crate::InterruptLine;

/// Bytes of a generation ID.
pub const ID_LEN: usize = 16;

/// Errors changing the generation ID.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No random bytes from the host.
    #[error("Cannot draw a new VM generation ID from the host's random source: {0}.")]
    Random(std::io::Error),
    /// The ID's address is not guest RAM.
    #[error("Cannot write the VM generation ID into guest memory: {0}.")]
    Write(GuestMemoryError),
    /// The interrupt could not be raised.
    #[error("Cannot notify the guest of its new VM generation ID: {0}.")]
    Notify(std::io::Error),
}

/// The generation ID at `addr` and the interrupt line that announces a new one.
pub struct VmGenId {
    addr: GuestAddress,
    irq: Arc<dyn InterruptLine>,
}

impl VmGenId {
    /// The device with its ID at `addr`, notifying on `irq`.
    pub fn new(addr: GuestAddress, irq: Arc<dyn InterruptLine>) -> Self {
        VmGenId { addr, irq }
    }

    /// Where the ID is in guest memory.
    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    /// Writes a new random ID (at boot: before the guest runs, no
    /// notification).
    pub fn write_new(&self, mem: &GuestMemoryMmap) -> Result<[u8; ID_LEN], Error> {
        let id = random_id()?;
        mem.write_slice(&id, self.addr).map_err(Error::Write)?;
        Ok(id)
    }

    /// Writes a new random ID and notifies the guest (after a restore).
    pub fn regenerate(&self, mem: &GuestMemoryMmap) -> Result<[u8; ID_LEN], Error> {
        let id = self.write_new(mem)?;
        self.irq.trigger().map_err(Error::Notify)?;
        Ok(id)
    }
}

/// 16 bytes from the host kernel's random source.
fn random_id() -> Result<[u8; ID_LEN], Error> {
    let mut id = [0u8; ID_LEN];
    let mut filled = 0;
    while filled < ID_LEN {
        // SAFETY: getrandom writes at most `ID_LEN - filled` bytes into the
        // rest of `id`, which has that many.
        let n = unsafe { libc::getrandom(id[filled..].as_mut_ptr().cast(), ID_LEN - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Random(err));
        }
        filled += n as usize;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vm_memory::GuestMemoryBackend;

    struct Count(AtomicU32);
    impl InterruptLine for Count {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn each_generation_is_new_and_only_a_regeneration_notifies() {
        let mem = crate::memory::anonymous(&[(GuestAddress(0), 0x10000)], true).unwrap();
        let irq = Arc::new(Count(AtomicU32::new(0)));
        let dev = VmGenId::new(GuestAddress(0xf000), irq.clone());
        let first = dev.write_new(&mem).unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        let second = dev.regenerate(&mem).unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_ne!(first, second);
        let mut back = [0u8; ID_LEN];
        mem.read_slice(&mut back, GuestAddress(0xf000)).unwrap();
        assert_eq!(back, second);
        // The write is the VMM's: a Diff snapshot must carry it.
        let bitmap = crate::memory::region_bitmap(mem.iter().next().unwrap()).unwrap();
        assert!(bitmap.is_page_set(0xf));
        // Outside guest memory: an error, not a panic.
        let far = VmGenId::new(GuestAddress(0x10_0000), irq);
        assert!(matches!(far.write_new(&mem), Err(Error::Write(_))));
    }
}
