//! The KVM VM: its file descriptor, memory slots, in-kernel interrupt controllers.

use devices::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_clock_data, kvm_enable_cap, kvm_irqchip, kvm_pit_config, kvm_pit_state2,
    kvm_userspace_memory_region, CpuId, KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Address of the three pages KVM needs for the TSS on Intel (inside the MMIO hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors setting up the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm cannot be opened.
    #[error("Cannot open /dev/kvm: {0}. Check that KVM is enabled and that you may use it (kvm group or root).")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A capability the VMM relies on is missing.
    #[error("This host's KVM lacks {0}; a KVM with an in-kernel irqchip is required.")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM could not {what}: {err}.")]
    Kvm {
        what: &'static str,
        #[source]
        err: kvm_ioctls::Error,
    },
    /// More vCPUs than KVM allows.
    #[error("vcpu_count {given} (--cpus) is more than this host's KVM allows ({max}); give at most {max}.")]
    TooManyCpus { given: u32, max: usize },
    /// clock_realtime asked of a snapshot without a wall-clock reference.
    #[error("The snapshot's kvmclock was saved without a wall-clock reference (the host that took it gave none), so clock_realtime cannot advance it; load it without clock_realtime.")]
    NoRealtimeClock,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |err| Error::Kvm { what, err }
}

/// The VM-wide KVM state of a snapshot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmKvmState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT's channels.
    pub pit: kvm_pit_state2,
    /// The kvmclock.
    pub clock: kvm_clock_data,
}

/// A VM with its in-kernel irqchip (PIC, IOAPIC, local APICs) and PIT.
pub struct Vm {
    kvm: Kvm,
    /// Shared with what changes the VM while it runs (MSI routes, moved
    /// BARs' ioeventfds).
    fd: std::sync::Arc<VmFd>,
    /// KVM_CAP_READONLY_MEM, asked once (a hotplug runs under seccomp).
    readonly_mem: bool,
}

impl Vm {
    /// Opens /dev/kvm and creates an empty VM.
    pub fn new() -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        let readonly_mem = kvm.check_extension(Cap::ReadonlyMem);
        Ok(Vm {
            kvm,
            fd: std::sync::Arc::new(fd),
            readonly_mem,
        })
    }

    /// The most vCPUs this VM may have.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Checks `cpus` against KVM's limit.
    pub fn check_vcpu_count(&self, cpus: u32) -> Result<(), Error> {
        let max = self.max_vcpus();
        if cpus as usize > max {
            return Err(Error::TooManyCpus { given: cpus, max });
        }
        Ok(())
    }

    /// Registers every guest memory region as a KVM memory slot (slot i for
    /// region i), with KVM's dirty log on each when the memory tracks dirty
    /// pages ([`devices::memory::is_tracked`]).
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), Error> {
        let flags = if devices::memory::is_tracked(mem) {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| Error::MissingCap("a host mapping of guest memory"))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range belongs to `mem`, a live mapping of exactly
            // `memory_size` bytes that the VMM keeps mapped for the VM's lifetime
            // (the VM holds a clone of the GuestMemoryMmap's Arc'ed regions).
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(kvm_err("register guest memory"))?;
        }
        Ok(())
    }

    /// The pages the guest wrote in each guest RAM region since the last
    /// call (or since [`Self::register_memory`]), one bit per 4 KiB page,
    /// 64 pages per word; KVM clears its log as it hands it over. Only for
    /// memory registered with tracking on.
    pub fn dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, Error> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                self.fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(kvm_err("read the dirty page log"))
            })
            .collect()
    }

    /// Whether KVM can give the guest read-only memory (writes exit to the VMM).
    pub fn has_readonly_memory(&self) -> bool {
        self.readonly_mem
    }

    /// Puts `len` bytes of host memory at `host_addr` at guest-physical
    /// `guest_addr`, in memory slot `slot` (a device's memory, outside RAM),
    /// read-only to the guest when `read_only` and KVM can do it.
    ///
    /// # Safety
    /// The host range must be a live mapping of at least `len` bytes that
    /// stays mapped until [`Vm::unmap_device_memory`] removes the slot.
    pub unsafe fn map_device_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        len: u64,
        host_addr: u64,
        read_only: bool,
    ) -> Result<(), Error> {
        let flags = if read_only && self.has_readonly_memory() {
            kvm_bindings::KVM_MEM_READONLY
        } else {
            0
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: guest_addr,
            memory_size: len,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped while
        // the slot exists.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err("map device memory"))
    }

    /// Removes the memory slot `slot` that [`Vm::map_device_memory`] made.
    pub fn unmap_device_memory(&self, slot: u32, guest_addr: u64) -> Result<(), Error> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a size of 0 deletes the slot; no host memory is handed to KVM.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err("unmap device memory"))
    }

    /// Creates the in-kernel PIC + IOAPIC + local APICs and the PIT.
    pub fn setup_irqchip(&self) -> Result<(), Error> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(kvm_err("create the PIT"))?;
        // Emulation failures then carry the instruction bytes; optional.
        if self
            .fd
            .check_extension_raw(KVM_CAP_EXIT_ON_EMULATION_FAILURE.into())
            > 0
        {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
                args: [1, 0, 0, 0],
                ..Default::default()
            };
            if let Err(e) = self.fd.enable_cap(&cap) {
                log::debug!("cannot enable KVM_CAP_EXIT_ON_EMULATION_FAILURE: {e}");
            }
        }
        Ok(())
    }

    /// CPUID leaves KVM can give a guest on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, Error> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report its supported CPUID"))
    }

    /// Connects `evt` to interrupt line `gsi`: each write raises an edge.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("connect an interrupt eventfd"))
    }

    /// Creates vCPU `index`.
    pub fn create_vcpu(&self, index: u32) -> Result<VcpuFd, Error> {
        self.fd
            .create_vcpu(index as u64)
            .map_err(kvm_err("create a vCPU"))
    }

    /// The MSRs KVM lists as saveable for this VM's vCPUs.
    pub fn saveable_msrs(&self) -> Result<Vec<u32>, Error> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("list its saveable MSRs"))?;
        Ok(list.as_slice().to_vec())
    }

    /// Saves the in-kernel irqchip (both PICs, the IOAPIC), the PIT and the
    /// kvmclock.
    pub fn save_state(&self) -> Result<VmKvmState, Error> {
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("read the interrupt controllers"))?;
            Ok::<_, Error>(c)
        };
        Ok(VmKvmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("read the PIT"))?,
            clock: self.fd.get_clock().map_err(kvm_err("read the kvmclock"))?,
        })
    }

    /// Restores a saved irqchip, PIT and kvmclock (after `setup_irqchip`).
    /// The clock continues from its saved value, or with `clock_realtime`
    /// (Firecracker's option of that name) advances by the wall-clock time
    /// since the snapshot, which needs a clock saved with its wall-clock
    /// reference.
    pub fn restore_state(&self, state: &VmKvmState, clock_realtime: bool) -> Result<(), Error> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("set the interrupt controllers"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("set the PIT"))?;
        let mut clock = kvm_clock_data {
            clock: state.clock.clock,
            // KVM refuses the other flags it reports on a read.
            flags: 0,
            ..Default::default()
        };
        if clock_realtime {
            if state.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME == 0 {
                return Err(Error::NoRealtimeClock);
            }
            clock.flags = kvm_bindings::KVM_CLOCK_REALTIME;
            clock.realtime = state.clock.realtime;
        }
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("set the kvmclock"))
    }

    /// The VM file descriptor (for device set-up such as ioeventfds).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM file descriptor, for what changes the VM while it runs.
    pub fn shared_fd(&self) -> std::sync::Arc<VmFd> {
        self.fd.clone()
    }
}
