//! MSI routing: KVM's GSI routing table, and each PCI function's MSI-X
//! vectors as GSIs with an irqfd each.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the router keeps it: the
//! default routes of GSIs 0-23 (the IOAPIC's pins, 0-15 also on the 8259
//! PICs, exactly as KVM sets them up for a new VM) plus one MSI route per
//! vector the guest has programmed and unmasked. A vector is an eventfd
//! registered as an irqfd on its GSI: raising it is one write, and KVM
//! delivers the message the route holds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::msix::MsiMessage;
use devices::virtio::pci::MsiVectors;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{IRQ_MAX, MSI_GSI_END, MSI_GSI_START};

/// Errors setting up vectors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Every GSI for MSI routes is taken.
    #[error("No GSI is left for MSI-X vectors ({MSI_GSI_START} to {MSI_GSI_END} are all in use).")]
    Exhausted,
    /// An eventfd cannot be created.
    #[error("Cannot create an eventfd for an MSI-X vector: {0}.")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd or the routing table.
    #[error("KVM could not {what}: {err}.")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
}

/// The VM's GSI routing table.
pub struct MsiRouter {
    vm: Arc<VmFd>,
    inner: Mutex<Routes>,
}

struct Routes {
    gsis: IdAllocator,
    msi: BTreeMap<u32, MsiMessage>,
}

impl MsiRouter {
    /// A router with the default routes only, set in KVM.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, Error> {
        let gsis = IdAllocator::new(MSI_GSI_START, MSI_GSI_END - 1)
            .expect("the MSI GSI range is a valid range");
        let router = MsiRouter {
            vm,
            inner: Mutex::new(Routes {
                gsis,
                msi: BTreeMap::new(),
            }),
        };
        let routes = router.lock();
        router.commit(&routes).map_err(|err| Error::Kvm {
            what: "set the interrupt routing table",
            err,
        })?;
        drop(routes);
        Ok(router)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives KVM the whole table.
    fn commit(&self, routes: &Routes) -> Result<(), kvm_ioctls::Error> {
        let mut entries = default_routes();
        for (&gsi, m) in &routes.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        // At most 40 default routes plus one per GSI of the MSI range: within
        // KVM_MAX_IRQ_ROUTES (4096).
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.vm.set_gsi_routing(&table)
    }

    /// Routes `gsi` to `message`, or removes its route (None).
    fn set(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()> {
        let mut routes = self.lock();
        let old = match message {
            Some(m) => routes.msi.insert(gsi, m),
            None => routes.msi.remove(&gsi),
        };
        if old == message {
            return Ok(());
        }
        self.commit(&routes).map_err(std::io::Error::from)
    }

    /// Takes `count` GSIs for a function's vectors.
    fn take(&self, count: u16) -> Result<Vec<u32>, Error> {
        let mut routes = self.lock();
        let mut taken = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            match routes.gsis.allocate_id() {
                Ok(gsi) => taken.push(gsi),
                Err(_) => {
                    for gsi in taken {
                        let _ = routes.gsis.free_id(gsi);
                    }
                    return Err(Error::Exhausted);
                }
            }
        }
        Ok(taken)
    }

    /// Gives `gsis` back and drops their routes.
    fn give_back(&self, gsis: &[u32]) {
        let mut routes = self.lock();
        let mut changed = false;
        for gsi in gsis {
            changed |= routes.msi.remove(gsi).is_some();
            let _ = routes.gsis.free_id(*gsi);
        }
        if changed {
            if let Err(e) = self.commit(&routes) {
                log::warn!("cannot update the interrupt routing table: {e}");
            }
        }
    }
}

/// KVM's routes for a new VM: GSI n to IOAPIC pin n (0-23), and GSIs 0-15
/// also to the PICs (pin n % 8 of the master below 8, of the slave above).
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    for gsi in 0..=IRQ_MAX {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
        e.u.irqchip.pin = gsi;
        entries.push(e);
        if gsi < 16 {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            e.u.irqchip.pin = gsi % 8;
            entries.push(e);
        }
    }
    entries
}

/// One function's MSI-X vectors: a GSI and an irqfd each.
pub struct FunctionVectors {
    router: Arc<MsiRouter>,
    gsis: Vec<u32>,
    evts: Vec<EventFd>,
}

impl FunctionVectors {
    /// `count` vectors, each an eventfd registered as an irqfd on a GSI of
    /// its own (with no route until the guest programs the vector).
    pub fn new(router: &Arc<MsiRouter>, count: u16) -> Result<Self, Error> {
        let gsis = router.take(count)?;
        let mut vectors = FunctionVectors {
            router: router.clone(),
            gsis: Vec::new(),
            evts: Vec::new(),
        };
        for gsi in gsis {
            let evt = match EventFd::new(libc::EFD_NONBLOCK) {
                Ok(e) => e,
                Err(e) => {
                    router.give_back(&[gsi]);
                    return Err(Error::EventFd(e));
                }
            };
            if let Err(err) = router.vm.register_irqfd(&evt, gsi) {
                router.give_back(&[gsi]);
                return Err(Error::Kvm {
                    what: "connect an MSI-X vector's eventfd",
                    err,
                });
            }
            // Dropping `vectors` from here on undoes this one too.
            vectors.gsis.push(gsi);
            vectors.evts.push(evt);
        }
        Ok(vectors)
    }
}

impl Drop for FunctionVectors {
    fn drop(&mut self) {
        for (evt, gsi) in self.evts.iter().zip(&self.gsis) {
            let _ = self.router.vm.unregister_irqfd(evt, *gsi);
        }
        self.router.give_back(&self.gsis);
    }
}

impl MsiVectors for FunctionVectors {
    fn route(&self, v: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        match self.gsis.get(usize::from(v)) {
            Some(&gsi) => self.router.set(gsi, message),
            None => Err(std::io::Error::other(format!("no MSI-X vector {v}"))),
        }
    }

    fn raise(&self, v: u16) -> std::io::Result<()> {
        match self.evts.get(usize::from(v)) {
            Some(evt) => evt.write(1),
            None => Err(std::io::Error::other(format!("no MSI-X vector {v}"))),
        }
    }
}
