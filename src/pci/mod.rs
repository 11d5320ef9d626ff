//! The VM's PCI segment, with `--enable-pci`: bus 0 behind a host bridge,
//! its configuration space on port 0xcf8 and in ECAM, and virtio devices
//! plugged in as PCI functions — each with BAR 0 in the BAR window (placed
//! as firmware would, moved where the guest programs it), an ioeventfd per
//! queue on its notification address, and its MSI-X vectors routed by KVM.

pub mod msi;

use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::pci::root::{PciConfigIo, PciEcam, PciFunction, PciRoot};
use devices::persist::Persist;
use devices::virtio::pci::{PciTransport, PciTransportState, BAR_SIZE, NOTIFY, NOTIFY_MULTIPLIER};
use devices::virtio::transport::{RestoreError, VirtioTransport};
use devices::virtio::VirtioDevice;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::PciRootInfo;
use crate::arch::x86_64::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_END, PCI_MMIO_START};
use crate::vstate::vm;
use devices::memory::GuestMemoryMmap;

/// Port of configuration mechanism #1's address register (data at 0xcfc).
const CONFIG_IO_PORT: u64 = 0xcf8;

/// Errors plugging functions in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bus refused a window.
    #[error("Cannot place {0} on its bus: {1}")]
    Bus(&'static str, devices::bus::Error),
    /// MSI routing could not be set up.
    #[error(transparent)]
    Msi(#[from] msi::Error),
    /// Every function of bus 0 is taken, or a snapshot's is.
    #[error("{0} Use fewer devices, or a snapshot taken with this device layout.")]
    Slot(devices::pci::root::Error),
    /// The BAR window is full, or a snapshot's BAR is taken.
    #[error("No room for a {BAR_SIZE:#x}-byte BAR at {0:#x} in the PCI window.")]
    Bar(u64),
    /// The transport cannot be built.
    #[error("Cannot set up the PCI function: {0}.")]
    Function(std::io::Error),
    /// A saved transport cannot be restored.
    #[error("{0}")]
    Restore(RestoreError),
    /// A queue notification cannot be connected to KVM.
    #[error("KVM could not connect a queue notification: {0}.")]
    IoEvent(kvm_ioctls::Error),
}

/// What a snapshot keeps of a PCI virtio device: its function number and its
/// transport (BAR 0's address is in the configuration space). The GSIs
/// behind its vectors are the VMM's own and are taken again on restore.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciEntryState {
    /// Device and function on bus 0 (`device << 3 | function`).
    pub devfn: u8,
    /// The transport: virtio registers, configuration space, MSI-X.
    pub transport: PciTransportState,
}

/// Bus 0 and what its functions need from the VM.
pub struct PciSegment {
    root: Arc<Mutex<PciRoot>>,
    /// The virtio functions plugged in, by devfn.
    functions: std::collections::BTreeMap<usize, Arc<Mutex<VirtioFunction>>>,
    router: Arc<msi::MsiRouter>,
    bars: AddressAllocator,
    mmio: Bus,
    vm: Arc<VmFd>,
}

/// A virtio device plugged into bus 0.
pub struct PciPlugged {
    /// The transport, also on the MMIO bus at BAR 0.
    pub transport: Arc<Mutex<PciTransport>>,
    /// Its device and function (`device << 3 | function`).
    pub devfn: usize,
}

impl PciSegment {
    /// Bus 0 with only its host bridge, reachable through port 0xcf8 on
    /// `pio` and ECAM on `mmio`, and the default interrupt routes.
    pub fn new(vm: &vm::Vm, pio: &Bus, mmio: &Bus) -> Result<Self, Error> {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo(root.clone()))),
            CONFIG_IO_PORT,
            8,
        )
        .map_err(|e| Error::Bus("the PCI configuration ports", e))?;
        mmio.insert(
            Arc::new(Mutex::new(PciEcam(root.clone()))),
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
        )
        .map_err(|e| Error::Bus("the PCI ECAM window", e))?;
        let router = Arc::new(msi::MsiRouter::new(vm.shared_fd())?);
        Ok(PciSegment {
            root,
            functions: Default::default(),
            router,
            // A constant range that fits: this cannot fail.
            bars: AddressAllocator::new(PCI_MMIO_START, PCI_MMIO_END - PCI_MMIO_START)
                .expect("the PCI BAR window is a valid range"),
            mmio: mmio.clone(),
            vm: vm.shared_fd(),
        })
    }

    /// What the ACPI tables announce.
    pub fn acpi_info(&self) -> PciRootInfo {
        PciRootInfo {
            ecam: PCI_ECAM_START,
            mmio_start: PCI_MMIO_START,
            mmio_end: PCI_MMIO_END - 1,
        }
    }

    /// Plugs `device` in: the first free function and BAR room, or with
    /// `saved` the function and BAR address of its snapshot, in that state.
    pub fn attach_virtio(
        &mut self,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        saved: Option<&PciEntryState>,
    ) -> Result<PciPlugged, Error> {
        let vectors = Arc::new(msi::FunctionVectors::new(
            &self.router,
            device.queue_max_sizes().len() as u16 + 1,
        )?);
        let transport = match saved {
            Some(s) => PciTransport::restore((device, mem.clone(), vectors), &s.transport)
                .map_err(Error::Restore)?,
            None => PciTransport::new(device, mem.clone(), vectors).map_err(Error::Function)?,
        };
        let bar = match saved {
            Some(_) => {
                let (addr, _) = transport.bar0();
                if addr == 0 || addr.checked_add(BAR_SIZE).is_none() {
                    return Err(Error::Bar(addr));
                }
                // Inside the window it is taken there (a guest may have moved
                // it anywhere: outside, the bus alone checks for overlaps).
                if (PCI_MMIO_START..PCI_MMIO_END).contains(&addr) {
                    let want = RangeInclusive::new(addr, addr + BAR_SIZE - 1)
                        .map_err(|_| Error::Bar(addr))?;
                    self.bars
                        .allocate(BAR_SIZE, BAR_SIZE, AllocPolicy::ExactMatch(want.start()))
                        .map_err(|_| Error::Bar(addr))?;
                }
                addr
            }
            None => {
                let range = self
                    .bars
                    .allocate(BAR_SIZE, BAR_SIZE, AllocPolicy::FirstMatch)
                    .map_err(|_| Error::Bar(PCI_MMIO_START))?;
                range.start()
            }
        };
        let plugged = self.plug(transport, bar, saved.map(|s| usize::from(s.devfn)));
        if plugged.is_err() {
            if let Ok(r) = RangeInclusive::new(bar, bar + BAR_SIZE - 1) {
                // Outside the window nothing was taken: nothing to free.
                let _ = self.bars.free(&r);
            }
        }
        plugged
    }

    /// The rest of [`Self::attach_virtio`]: BAR 0 at `bar` on the MMIO bus
    /// with its ioeventfds, the function at `devfn` (or the first free one).
    fn plug(
        &mut self,
        mut transport: PciTransport,
        bar: u64,
        devfn: Option<usize>,
    ) -> Result<PciPlugged, Error> {
        if devfn.is_none() {
            transport.set_bar0(bar).map_err(Error::Function)?;
        }
        let evts: Vec<Arc<EventFd>> = transport.core().queue_evts().to_vec();
        let transport = Arc::new(Mutex::new(transport));
        let function = VirtioFunction {
            transport: transport.clone(),
            placed: bar,
            allocated: bar,
            evts,
            mmio: self.mmio.clone(),
            vm: self.vm.clone(),
        };
        function.place(bar)?;
        let function = Arc::new(Mutex::new(function));
        let added = {
            let mut root = self.root.lock().unwrap_or_else(|e| e.into_inner());
            match devfn {
                Some(at) => root.add_at(at, function.clone()).map(|()| at),
                None => root.add(function.clone()),
            }
            .map_err(Error::Slot)
        };
        match added {
            Ok(devfn) => {
                self.functions.insert(devfn, function);
                Ok(PciPlugged { transport, devfn })
            }
            Err(e) => {
                let f = function.lock().unwrap_or_else(|e| e.into_inner());
                f.unplace(f.placed, f.evts.len());
                Err(e)
            }
        }
    }

    /// Unplugs the function at `devfn`: off the bus, its BAR off the MMIO
    /// bus with its ioeventfds, its BAR room free again.
    pub fn detach(&mut self, devfn: usize) {
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(devfn);
        if let Some(function) = self.functions.remove(&devfn) {
            let f = function.lock().unwrap_or_else(|e| e.into_inner());
            f.unplace(f.placed, f.evts.len());
            if let Ok(r) = RangeInclusive::new(f.allocated, f.allocated + BAR_SIZE - 1) {
                let _ = self.bars.free(&r);
            }
        }
    }
}

/// A virtio PCI function on bus 0: its configuration space is the
/// transport's, and it follows BAR 0 where the guest moves it.
struct VirtioFunction {
    transport: Arc<Mutex<PciTransport>>,
    /// Where BAR 0 is on the MMIO bus.
    placed: u64,
    /// Where the segment placed it (its room in the BAR window).
    allocated: u64,
    evts: Vec<Arc<EventFd>>,
    mmio: Bus,
    vm: Arc<VmFd>,
}

impl VirtioFunction {
    fn lock(&self) -> std::sync::MutexGuard<'_, PciTransport> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts BAR 0 at `at` on the MMIO bus, with the queues' ioeventfds.
    fn place(&self, at: u64) -> Result<(), Error> {
        self.mmio
            .insert(self.transport.clone(), at, BAR_SIZE)
            .map_err(|e| Error::Bus("a virtio PCI function's BAR", e))?;
        for (i, evt) in self.evts.iter().enumerate() {
            let addr = at + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Err(e) = self
                .vm
                .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            {
                self.unplace(at, i);
                return Err(Error::IoEvent(e));
            }
        }
        Ok(())
    }

    /// Takes BAR 0 off the MMIO bus at `at`, with the first `queues`
    /// ioeventfds.
    fn unplace(&self, at: u64, queues: usize) {
        for (i, evt) in self.evts.iter().enumerate().take(queues) {
            let addr = at + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            let _ = self
                .vm
                .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch);
        }
        self.mmio.remove(at);
    }
}

impl PciFunction for VirtioFunction {
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.lock().read_config(offset, data);
    }

    /// Writes the transport's configuration space; if that enabled memory
    /// decoding with BAR 0 somewhere new, the BAR moves there (unless it
    /// would overlap something: then it stays, and the guest's device does
    /// not answer at the new address).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let (bar, enabled) = {
            let mut t = self.lock();
            t.write_config(offset, data);
            t.bar0()
        };
        if !enabled || bar == self.placed || bar == 0 || bar.checked_add(BAR_SIZE).is_none() {
            return;
        }
        let old = self.placed;
        self.unplace(old, self.evts.len());
        match self.place(bar) {
            Ok(()) => self.placed = bar,
            Err(e) => {
                log::warn!("virtio-pci: BAR 0 stays at {old:#x}, not {bar:#x}: {e}");
                if let Err(e) = self.place(old) {
                    log::error!("virtio-pci: cannot put BAR 0 back at {old:#x}: {e}");
                }
            }
        }
    }
}
