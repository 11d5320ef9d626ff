//! The device manager: the port-I/O and MMIO buses, the legacy devices (COM1,
//! i8042, ACPI sleep registers), the allocation of virtio-mmio windows and
//! interrupt lines or, with `--enable-pci`, the PCI segment, and one entry
//! per virtio device (ID, kind, transport, where the guest finds it) — what
//! the control API and snapshots walk.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::acpi_pm::AcpiSleep;
use devices::boot_timer::BootTimer;
use devices::bus::Bus;
use devices::legacy::i8042::{I8042State, I8042};
use devices::legacy::serial::{SerialDevice, SerialDeviceState};
use devices::persist::Persist;
use devices::virtio::mmio::{
    MmioTransport, MmioTransportState, RestoreError, MMIO_WINDOW_SIZE, REG_QUEUE_NOTIFY,
};
use devices::virtio::pci::PciTransport;
use devices::virtio::transport::VirtioTransport;
use devices::virtio::VirtioDevice;
use kvm_ioctls::IoEventAddress;

use vmm_sys_util::eventfd::EventFd;

use crate::allocator::{DeviceMemoryAllocator, Placement, ResourceAllocator};
use crate::arch::x86_64::acpi::VirtioMmioDeviceInfo;
use crate::arch::x86_64::layout::*;
use crate::exit::ExitSignal;
use crate::pci::{PciEntryState, PciSegment};
use crate::snapshot::{PlacedTransport, VirtioEntryState};
use crate::vstate::vm;
use devices::memory::GuestMemoryMmap;

/// Errors placing devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device cannot be placed on its bus.
    #[error("Cannot place the {0} on its bus: {1}")]
    Bus(&'static str, devices::bus::Error),
    /// An eventfd cannot be created.
    #[error("Cannot create an eventfd: {0}.")]
    EventFd(std::io::Error),
    /// KVM refused an interrupt line.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// No MMIO window or interrupt line is left, or the one a snapshot names is taken.
    #[error("Cannot place virtio device '{id}': {err}")]
    Placement {
        id: String,
        err: crate::allocator::Error,
    },
    /// A virtio device cannot be set up.
    #[error("Cannot set up virtio device '{id}': {err}.")]
    Virtio { id: String, err: std::io::Error },
    /// A saved transport cannot be restored.
    #[error("Cannot restore virtio device '{id}': {err}")]
    Restore { id: String, err: RestoreError },
    /// A queue notification cannot be connected to KVM.
    #[error("KVM could not connect a queue notification of virtio device '{id}': {err}.")]
    IoEvent { id: String, err: kvm_ioctls::Error },
    /// The PCI segment cannot be set up.
    #[error("Cannot set up PCI: {0}")]
    Pci(crate::pci::Error),
    /// A device cannot be plugged into the PCI segment.
    #[error("Cannot plug virtio device '{id}' into PCI: {err}")]
    PciDevice { id: String, err: crate::pci::Error },
    /// A snapshot's device is on another transport than its VM had.
    #[error("The snapshot is inconsistent: its virtio device '{id}' is on {saved}, but its VM {had}; take the snapshot again.")]
    TransportMismatch {
        id: String,
        saved: &'static str,
        had: &'static str,
    },
}

/// What a virtio device is, for the API and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioKind {
    /// virtio-blk: a drive.
    Block,
    /// virtio-net: a network interface.
    Net,
    /// virtio-vsock: the VM's socket device.
    Vsock,
    /// virtio-rng: the entropy device.
    Entropy,
    /// virtio-balloon.
    Balloon,
    /// virtio-pmem: a file in guest-physical memory.
    Pmem,
}

/// One attached virtio device.
pub struct VirtioEntry {
    /// Its ID in the configuration (`drive_id`, `iface_id`).
    pub id: String,
    /// What it is.
    pub kind: VirtioKind,
    /// How the log names it, e.g. "disk rootfs (disk.img)".
    pub label: String,
    /// Its registers and queues, whatever the transport.
    pub transport: Arc<Mutex<dyn VirtioTransport>>,
    /// Where the guest finds it.
    pub place: Place,
    /// Its queues' subscription in the event loop, once watched.
    pub watch: Option<event_manager::SubscriberId>,
    /// The memory slot of its device memory (virtio-pmem), if it has any.
    pub memory: Option<MemorySlot>,
}

/// A device's memory as the guest sees it: a KVM slot at an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    /// The KVM memory slot.
    pub slot: u32,
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Where the guest finds a virtio device, with its transport's own type (for
/// snapshots).
pub enum Place {
    /// A virtio-mmio window and interrupt line.
    Mmio {
        transport: Arc<Mutex<MmioTransport>>,
        info: VirtioMmioDeviceInfo,
    },
    /// A function on PCI bus 0.
    Pci {
        transport: Arc<Mutex<PciTransport>>,
        /// `device << 3 | function` on bus 0.
        devfn: usize,
    },
}

/// Every device of a VM and the buses that route vCPU exits to them.
pub struct DeviceManager {
    /// Port-I/O bus: COM1, i8042, ACPI sleep registers.
    pub pio: Bus,
    /// MMIO bus: the virtio-mmio windows.
    pub mmio: Bus,
    /// COM1, for console input.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The i8042, for Ctrl-Alt-Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// The virtio devices, in attachment order.
    pub virtio: Vec<VirtioEntry>,
    /// Free register pages and interrupt lines.
    allocator: ResourceAllocator,
    /// With `--enable-pci`: bus 0, where every virtio device goes.
    pci: Option<PciSegment>,
    /// Guest-physical room and memory slots for device memory, from the
    /// first device that has some.
    device_memory: Option<DeviceMemoryAllocator>,
    /// The VM generation ID, if the VM has one.
    pub vmgenid: Option<devices::vmgenid::VmGenId>,
}

impl DeviceManager {
    /// Places COM1, the i8042 and the ACPI sleep registers, each with its
    /// interrupt line connected through an irqfd.
    pub fn new(
        vm: &vm::Vm,
        exit: Arc<ExitSignal>,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Self, Error> {
        Self::with_legacy_state(vm, exit, serial_out, None)
    }

    /// As [`DeviceManager::new`], with COM1 and the i8042 in a saved state.
    pub fn with_legacy_state(
        vm: &vm::Vm,
        exit: Arc<ExitSignal>,
        serial_out: Box<dyn Write + Send>,
        saved: Option<(&SerialDeviceState, &I8042State)>,
    ) -> Result<Self, Error> {
        let pio = Bus::new();
        let serial_irq = irq_line(vm, SERIAL_IRQ)?;
        let kbd_irq = irq_line(vm, I8042_KBD_IRQ)?;
        let (serial, i8042) = match saved {
            Some((s, k)) => {
                let Ok(serial) = SerialDevice::restore((serial_irq, serial_out), s);
                let Ok(i8042) = I8042::restore((exit.clone(), kbd_irq), k);
                (serial, i8042)
            }
            None => (
                SerialDevice::new(serial_irq, serial_out),
                I8042::new(exit.clone(), kbd_irq),
            ),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)
            .map_err(|e| Error::Bus("serial port", e))?;
        let i8042 = Arc::new(Mutex::new(i8042));
        pio.insert(i8042.clone(), u64::from(I8042_PORT), 5)
            .map_err(|e| Error::Bus("i8042", e))?;
        pio.insert(
            Arc::new(Mutex::new(AcpiSleep::new(exit, ACPI_S5_SLEEP_TYPE))),
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            2,
        )
        .map_err(|e| Error::Bus("ACPI sleep registers", e))?;
        Ok(DeviceManager {
            pio,
            mmio: Bus::new(),
            serial,
            i8042,
            virtio: Vec::new(),
            allocator: ResourceAllocator::new(),
            pci: None,
            device_memory: None,
            vmgenid: None,
        })
    }

    /// Adds the VM generation ID device: its ID at [`VMGENID_START`] and the
    /// interrupt line of the event device that announces a new one.
    pub fn add_vmgenid(&mut self, vm: &vm::Vm) -> Result<(), Error> {
        let line: Arc<dyn devices::InterruptLine> = irq_line(vm, VMGENID_IRQ)?;
        self.vmgenid = Some(devices::vmgenid::VmGenId::new(
            vm_memory::GuestAddress(VMGENID_START),
            line,
        ));
        Ok(())
    }

    /// What ACPI announces of the VM generation ID, if the VM has one.
    pub fn vmgenid_info(&self) -> Option<crate::arch::x86_64::acpi::VmGenIdInfo> {
        self.vmgenid
            .as_ref()
            .map(|g| crate::arch::x86_64::acpi::VmGenIdInfo {
                addr: g.addr().0,
                gsi: VMGENID_IRQ,
            })
    }

    /// Adds the PCI segment: from now on virtio devices are PCI functions.
    pub fn enable_pci(&mut self, vm: &vm::Vm) -> Result<(), Error> {
        if self.pci.is_none() {
            self.pci = Some(PciSegment::new(vm, &self.pio, &self.mmio).map_err(Error::Pci)?);
        }
        Ok(())
    }

    /// What ACPI announces of the PCI segment, if there is one.
    pub fn pci_info(&self) -> Option<crate::arch::x86_64::acpi::PciRootInfo> {
        self.pci.as_ref().map(PciSegment::acpi_info)
    }

    /// Whether virtio devices are on PCI.
    pub fn pci_enabled(&self) -> bool {
        self.pci.is_some()
    }

    /// Attaches `device` in the first free virtio-mmio window with the first
    /// free interrupt line (the allocator's): an irqfd for its interrupt and
    /// an ioeventfd per queue, so neither interrupts nor notifications wait
    /// on a vCPU exit handler. With `saved`, the transport is restored in
    /// that state (the device started again if it was), at exactly the
    /// window and line saved with it.
    /// A device with memory of its own (virtio-pmem) gets it mapped first,
    /// past guest RAM (at the address it had, for a restored device).
    pub fn attach_virtio(
        &mut self,
        vm: &vm::Vm,
        mem: &GuestMemoryMmap,
        names: (String, VirtioKind, String),
        mut device: Box<dyn VirtioDevice>,
        saved: Option<&PlacedTransport>,
    ) -> Result<(), Error> {
        let memory = self.map_device_memory(vm, mem, &names.0, device.as_mut())?;
        let attached = self.attach_transport(vm, mem, names, device, saved);
        match (attached, memory) {
            (Ok(()), Some(m)) => {
                if let Some(e) = self.virtio.last_mut() {
                    e.memory = Some(m);
                }
                Ok(())
            }
            (Err(e), Some(m)) => {
                self.unmap_device_memory(vm, m);
                Err(e)
            }
            (r, None) => r,
        }
    }

    /// Maps `device`'s own memory, if it has any, and tells it where.
    fn map_device_memory(
        &mut self,
        vm: &vm::Vm,
        mem: &GuestMemoryMmap,
        id: &str,
        device: &mut dyn VirtioDevice,
    ) -> Result<Option<MemorySlot>, Error> {
        use vm_memory::{Address, GuestMemoryBackend};
        let Some(m) = device.device_memory() else {
            return Ok(None);
        };
        let ram_end = mem.last_addr().unchecked_add(1).raw_value();
        let space = self
            .device_memory
            .get_or_insert_with(|| DeviceMemoryAllocator::new(ram_end));
        let (slot, guest_addr) = space
            .place(
                m.len,
                devices::virtio::DEVICE_MEMORY_ALIGNMENT,
                m.guest_addr,
            )
            .map_err(|err| Error::Placement {
                id: id.to_string(),
                err,
            })?;
        if m.read_only && !vm.has_readonly_memory() {
            log::warn!("pmem '{id}': KVM has no read-only memory slots here; the guest's writes stay in private memory, the file is not changed");
        }
        // SAFETY: the device keeps its mapping for as long as it lives, and
        // it lives in this manager's entry until detach removes the slot
        // before dropping it (or the VM goes with the process).
        let mapped =
            unsafe { vm.map_device_memory(slot, guest_addr, m.len, m.host_addr, m.read_only) };
        if let Err(e) = mapped {
            space.release(slot, guest_addr, m.len);
            return Err(e.into());
        }
        device.set_device_memory_address(guest_addr);
        Ok(Some(MemorySlot {
            slot,
            guest_addr,
            len: m.len,
        }))
    }

    /// Removes a device's memory slot and gives its room back.
    fn unmap_device_memory(&mut self, vm: &vm::Vm, m: MemorySlot) {
        if let Err(e) = vm.unmap_device_memory(m.slot, m.guest_addr) {
            log::warn!("{e}");
        }
        if let Some(space) = self.device_memory.as_mut() {
            space.release(m.slot, m.guest_addr, m.len);
        }
    }

    /// [`Self::attach_virtio`] once device memory is mapped.
    fn attach_transport(
        &mut self,
        vm: &vm::Vm,
        mem: &GuestMemoryMmap,
        (id, kind, label): (String, VirtioKind, String),
        device: Box<dyn VirtioDevice>,
        saved: Option<&PlacedTransport>,
    ) -> Result<(), Error> {
        let mismatch = |saved: &'static str| Error::TransportMismatch {
            id: id.clone(),
            saved,
            had: if self.pci.is_some() {
                "had a PCI segment (--enable-pci)"
            } else {
                "had no PCI segment"
            },
        };
        let saved = match (saved, self.pci.is_some()) {
            (None, false) => None,
            (None, true) => return self.attach_pci(mem, (id, kind, label), device, None),
            (Some(PlacedTransport::Pci { pci }), true) => {
                return self.attach_pci(mem, (id, kind, label), device, Some(pci))
            }
            (Some(PlacedTransport::Mmio { .. }), true) => return Err(mismatch("virtio-mmio")),
            (Some(PlacedTransport::Pci { .. }), false) => return Err(mismatch("PCI")),
            (
                Some(PlacedTransport::Mmio {
                    mmio_base,
                    irq,
                    transport,
                }),
                false,
            ) => Some((transport, *mmio_base, *irq)),
        };
        let placement = match saved {
            Some((_, base, irq)) => {
                let want = Placement { base, irq };
                self.allocator.claim(want).map_err(|err| Error::Placement {
                    id: id.clone(),
                    err,
                })?;
                want
            }
            None => self.allocator.place().map_err(|err| Error::Placement {
                id: id.clone(),
                err,
            })?,
        };
        let state = saved.map(|(state, _, _)| state);
        let attached = self.place_virtio(vm, mem, (id, kind, label), device, state, placement);
        if attached.is_err() {
            self.allocator.release(placement);
        }
        attached
    }

    /// The rest of [`Self::attach_virtio`], at `placement`.
    fn place_virtio(
        &mut self,
        vm: &vm::Vm,
        mem: &GuestMemoryMmap,
        (id, kind, label): (String, VirtioKind, String),
        device: Box<dyn VirtioDevice>,
        saved: Option<&MmioTransportState>,
        Placement { base, irq }: Placement,
    ) -> Result<(), Error> {
        let virtio_err = |err| Error::Virtio {
            id: id.clone(),
            err,
        };
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(virtio_err)?;
        vm.register_irqfd(&irq_evt, irq)?;
        let line: Arc<dyn devices::InterruptLine> = Arc::new(irq_evt);
        let transport = match saved {
            Some(state) => {
                MmioTransport::restore((device, mem.clone(), line), state).map_err(|err| {
                    Error::Restore {
                        id: id.clone(),
                        err,
                    }
                })?
            }
            None => MmioTransport::new(device, mem.clone(), line).map_err(virtio_err)?,
        };
        for (queue, evt) in transport.core().queue_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    queue as u32,
                )
                .map_err(|err| Error::IoEvent {
                    id: id.clone(),
                    err,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)
            .map_err(|e| Error::Bus("virtio device", e))?;
        self.virtio.push(VirtioEntry {
            id,
            kind,
            label,
            transport: transport.clone(),
            watch: None,
            memory: None,
            place: Place::Mmio {
                transport,
                info: VirtioMmioDeviceInfo {
                    addr: base,
                    len: VIRTIO_MMIO_SIZE,
                    irq,
                },
            },
        });
        Ok(())
    }

    /// [`Self::attach_virtio`] on the PCI segment.
    fn attach_pci(
        &mut self,
        mem: &GuestMemoryMmap,
        (id, kind, label): (String, VirtioKind, String),
        device: Box<dyn VirtioDevice>,
        saved: Option<&PciEntryState>,
    ) -> Result<(), Error> {
        let Some(pci) = self.pci.as_mut() else {
            return Err(Error::Pci(crate::pci::Error::Function(
                std::io::Error::other("the VM has no PCI segment"),
            )));
        };
        let plugged = pci
            .attach_virtio(mem, device, saved)
            .map_err(|err| Error::PciDevice {
                id: id.clone(),
                err,
            })?;
        self.virtio.push(VirtioEntry {
            id,
            kind,
            label,
            transport: plugged.transport.clone(),
            watch: None,
            memory: None,
            place: Place::Pci {
                transport: plugged.transport,
                devfn: plugged.devfn,
            },
        });
        Ok(())
    }

    /// Places the boot timer at the start of the MMIO hole, where Firecracker's
    /// guests write 123 when they have booted.
    pub fn add_boot_timer(&mut self, started: std::time::Instant) -> Result<(), Error> {
        self.mmio
            .insert(
                Arc::new(Mutex::new(BootTimer::new(started))),
                BOOT_TIMER_START,
                BOOT_TIMER_SIZE,
            )
            .map_err(|e| Error::Bus("boot timer", e))
    }

    /// Where the guest finds each virtio-mmio device, in attachment order.
    pub fn virtio_info(&self) -> Vec<VirtioMmioDeviceInfo> {
        self.virtio
            .iter()
            .filter_map(|e| match &e.place {
                Place::Mmio { info, .. } => Some(*info),
                Place::Pci { .. } => None,
            })
            .collect()
    }

    /// The state of every virtio device and its transport, in attachment
    /// order (the VM is paused: no queue pass runs meanwhile).
    pub fn save_virtio(&self) -> Result<Vec<VirtioEntryState>, crate::snapshot::Error> {
        self.virtio
            .iter()
            .map(|e| {
                let t = e.transport.lock().unwrap_or_else(|e| e.into_inner());
                let device = t
                    .core()
                    .with_device(|d| crate::device_kinds::of(e.kind)?.save(d));
                drop(t);
                let device = device.ok_or_else(|| {
                    crate::snapshot::Error::State(format!(
                        "Virtio device '{}' is not the kind it was attached as.",
                        e.id
                    ))
                })?;
                let placed = match &e.place {
                    Place::Mmio { transport, info } => PlacedTransport::Mmio {
                        mmio_base: info.addr,
                        irq: info.irq,
                        transport: transport.lock().unwrap_or_else(|e| e.into_inner()).save(),
                    },
                    Place::Pci { transport, devfn } => PlacedTransport::Pci {
                        pci: PciEntryState {
                            // A devfn of bus 0: below 256.
                            devfn: *devfn as u8,
                            transport: transport.lock().unwrap_or_else(|e| e.into_inner()).save(),
                        },
                    },
                };
                Ok(VirtioEntryState {
                    id: e.id.clone(),
                    placed,
                    device,
                })
            })
            .collect()
    }

    /// After a restore: raises interrupts the driver had not acknowledged,
    /// looks at every queue once, and tells a vsock driver that its
    /// connections are gone.
    pub fn kick_restored(&self) {
        for e in &self.virtio {
            let t = e.transport.lock().unwrap_or_else(|e| e.into_inner());
            t.core().with_device(|d| {
                if let Some(kind) = crate::device_kinds::of(e.kind) {
                    kind.after_restore(d)
                }
            });
            t.kick_after_restore();
        }
    }

    /// Takes the PCI device of `kind` with `id` off the bus: its function,
    /// BAR and queue notifications go; the entry is returned (dropping it,
    /// once the event loop no longer watches it, releases its vectors and
    /// host side). A device a guest driver still holds stays.
    pub fn detach_pci(
        &mut self,
        vm: &vm::Vm,
        kind: VirtioKind,
        id: &str,
    ) -> Result<VirtioEntry, String> {
        let Some(at) = self
            .virtio
            .iter()
            .position(|e| e.kind == kind && e.id == id)
        else {
            return Err(format!(
                "Device not found: no {} '{id}' is attached.",
                kind_noun(kind)
            ));
        };
        let Place::Pci { devfn, .. } = self.virtio[at].place else {
            return Err("PCI is not enabled: devices on virtio-mmio cannot be unplugged; start vmm with --enable-pci for hotplug.".into());
        };
        let status = {
            let t = self.virtio[at]
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            t.core().status()
        };
        // A driver that let go reset the device (Linux then acknowledges
        // it again): no driver, no negotiated features, not running.
        use devices::virtio::status::{DRIVER, DRIVER_OK, FEATURES_OK};
        if status & (DRIVER | DRIVER_OK | FEATURES_OK) != 0 {
            return Err(format!(
                "The guest still uses {} '{id}': remove it in the guest first (echo 1 > /sys/bus/pci/devices/0000:00:{:02x}.{}/remove), then DELETE it again.",
                kind_noun(kind),
                devfn >> 3,
                devfn & 7
            ));
        }
        if let Some(pci) = self.pci.as_mut() {
            pci.detach(devfn);
        }
        let entry = self.virtio.remove(at);
        if let Some(m) = entry.memory {
            self.unmap_device_memory(vm, m);
        }
        Ok(entry)
    }

    /// The virtio device of `kind` with `id`.
    pub fn find(&self, kind: VirtioKind, id: &str) -> Option<&VirtioEntry> {
        self.virtio.iter().find(|e| e.kind == kind && e.id == id)
    }
}

/// How messages name a device of `kind`.
fn kind_noun(kind: VirtioKind) -> &'static str {
    match kind {
        VirtioKind::Block => "drive",
        VirtioKind::Net => "network interface",
        VirtioKind::Vsock => "vsock device",
        VirtioKind::Entropy => "entropy device",
        VirtioKind::Balloon => "balloon",
        VirtioKind::Pmem => "pmem device",
    }
}

/// An eventfd connected to guest interrupt line `gsi`.
fn irq_line(vm: &vm::Vm, gsi: u32) -> Result<Arc<EventFd>, Error> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&evt, gsi)?;
    Ok(Arc::new(evt))
}
