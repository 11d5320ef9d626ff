//! The recipe that assembles a VM from a [`VmConfig`], one step per function:
//! KVM VM → guest memory → irqchip → devices → kernel, initrd, cmdline → boot
//! tables → vCPUs.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use devices::memory::GuestMemoryMmap;
use devices::mmds::{Mmds, SharedMmds};
use devices::virtio::vsock::muxer::Muxer;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::regs::EntryProtocol;
use crate::arch::x86_64::{acpi, bootparams, gdt, mptable, paging};
use crate::config::{BootSource, VmConfig};
use crate::device_kinds;
use crate::device_manager::{self, DeviceManager};
use crate::exit::ExitSignal;
use crate::loader::{self, LoadedKernel};
use crate::snapshot::{self, MicrovmState};
use crate::vstate::vcpu::{self, BootEntry, Vcpu};
use crate::vstate::{memory, vm};

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The VM generation ID cannot be set.
    #[error(transparent)]
    VmGenId(#[from] devices::vmgenid::Error),
    /// The kernel, initrd or command line cannot be loaded.
    #[error(transparent)]
    Loader(#[from] loader::Error),
    /// Guest memory cannot be mapped.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// KVM VM set-up failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// vCPU set-up failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// ACPI tables cannot be written.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// The MP table cannot be written.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    /// Page tables cannot be written.
    #[error(transparent)]
    Paging(#[from] paging::Error),
    /// Boot information cannot be written.
    #[error(transparent)]
    BootParams(#[from] bootparams::Error),
    /// A device cannot be placed.
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
    /// An eventfd cannot be created.
    #[error("Cannot create an eventfd: {0}.")]
    EventFd(std::io::Error),
    /// The GDT cannot be written.
    #[error("Cannot write the boot GDT into guest memory.")]
    Gdt,
    /// A device's host side cannot be opened.
    #[error(transparent)]
    Device(#[from] device_kinds::Error),
    /// A snapshot cannot be restored.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
}

impl Error {
    /// Whether the error is in what the user gave (as opposed to a host or VMM failure).
    pub fn is_usage_error(&self) -> bool {
        if let Error::Device(e) = self {
            return e.is_usage_error();
        }
        matches!(
            self,
            Error::Config(_)
                | Error::Loader(_)
                | Error::Memory(_)
                | Error::Snapshot(_)
                | Error::Vm(vm::Error::TooManyCpus { .. })
                | Error::Vm(vm::Error::NoRealtimeClock)
                | Error::Devices(
                    device_manager::Error::Restore { .. }
                        | device_manager::Error::Placement { .. }
                        | device_manager::Error::PciDevice { .. }
                        | device_manager::Error::TransportMismatch { .. }
                )
        )
    }
}

/// A built VM, ready to run.
pub struct MicroVm {
    pub(crate) config: VmConfig,
    pub(crate) vm: vm::Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) devices: DeviceManager,
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) started: Instant,
    /// The userfaultfd behind guest memory restored with the Uffd backend
    /// (kept open for the VM's life, as Firecracker keeps its copy).
    pub(crate) uffd: Option<std::os::fd::OwnedFd>,
}

/// Builds a VM whose console output goes to `serial_out`. `started` is when the
/// VMM started, for timing traces.
pub fn build(
    config: &VmConfig,
    serial_out: Box<dyn Write + Send>,
    exit: Arc<ExitSignal>,
    started: Instant,
) -> Result<MicroVm, Error> {
    let mmds = Arc::new(std::sync::Mutex::new(Mmds::new(DEFAULT_MMDS_LIMIT)));
    build_with(config, serial_out, exit, started, None, &mmds)
}

/// Largest metadata store by default: the API's largest request body, as in
/// Firecracker.
pub const DEFAULT_MMDS_LIMIT: usize = 51_200;

/// As [`build`], with the vsock backend already bound (at `PUT /vsock`, as
/// Firecracker binds it; used if it is the one `config` asks for), and the
/// metadata store the API fills.
pub fn build_with(
    config: &VmConfig,
    serial_out: Box<dyn Write + Send>,
    exit: Arc<ExitSignal>,
    started: Instant,
    vsock: Option<Muxer>,
    mmds: &SharedMmds,
) -> Result<MicroVm, Error> {
    config.validate()?;
    config.machine_config.check_buildable()?;
    let boot = config
        .boot_source
        .as_ref()
        .ok_or(crate::config::Error::NoBootSource)?;
    let machine = &config.machine_config;
    if machine.smt {
        log::warn!(
            "machine-config smt is stored but not enforced: the guest sees one thread per core"
        );
    }
    // Validated: 1..=MAX_CPUS.
    let cpus = machine.vcpu_count as u32;
    let vm = vm::Vm::new()?;
    vm.check_vcpu_count(cpus)?;
    let mem = memory::create_guest_memory(machine.mem_bytes(), backing(machine))?;
    vm.register_memory(&mem)?;
    vm.setup_irqchip()?;

    let mut devices = DeviceManager::new(&vm, exit.clone(), serial_out)?;
    if config.pci {
        devices.enable_pci(&vm)?;
    }
    let mut opening = device_kinds::Opening {
        config,
        mmds,
        vsock,
    };
    for (names, device) in device_kinds::open_all(&mut opening)? {
        devices.attach_virtio(&vm, &mem, names, device, None)?;
    }
    if !config.no_vmgenid {
        devices.add_vmgenid(&vm)?;
    }
    if let Some(g) = &devices.vmgenid {
        g.write_new(&mem)?;
    }
    let virtio_info = devices.virtio_info();
    let kernel = load_boot_images(config, boot, &mem, &virtio_info)?;
    let tables = BootTables {
        virtio: &virtio_info,
        pci: devices.pci_info(),
        vmgenid: devices.vmgenid_info(),
    };
    let entry = write_boot_tables(cpus, &mem, &kernel, &tables)?;
    let vcpus = create_vcpus(&vm, cpus, &entry)?;
    Ok(MicroVm {
        config: config.clone(),
        vm,
        mem,
        vcpus,
        devices,
        exit,
        started,
        uffd: None,
    })
}

/// How the machine configuration wants guest memory backed.
fn backing(machine: &crate::config::MachineConfig) -> memory::Backing {
    memory::Backing {
        track_dirty_pages: machine.track_dirty_pages,
        huge_pages: machine.huge_pages,
    }
}

/// Builds a VM from a snapshot's state and memory file: the guest memory is
/// the file mapped privately, and the irqchip, PIT, clock, COM1, i8042 and
/// every vCPU are in their saved state. Disk images are reopened (and
/// locked) by path and TAP devices by name first, so a clone that cannot have
/// its devices fails before anything else is set up; started virtio devices
/// start again with their saved queues. Boot set-up (kernel, tables, entry
/// registers) is not done: the guest is already past it.
pub fn build_from_snapshot(
    state: &MicrovmState,
    clock_realtime: bool,
    mem_source: &snapshot::MemorySource,
    serial_out: Box<dyn Write + Send>,
    exit: Arc<ExitSignal>,
    started: Instant,
    mmds: &SharedMmds,
) -> Result<MicroVm, Error> {
    // The state file is checksummed, not trusted: its configuration passes
    // the same checks as one given over the API. Its devices come back on
    // the transport they were saved on.
    let pci = state.pci;
    let mut config = state.config.clone();
    config.pci = pci;
    config.validate()?;
    state.check()?;
    let reopened = device_kinds::reopen_all(&device_kinds::Reopening { state, mmds })?;
    let cpus = state.vcpus.len() as u32;
    let vm = vm::Vm::new()?;
    vm.check_vcpu_count(cpus)?;
    let (mem, uffd) =
        snapshot::guest_memory(mem_source, &state.memory, backing(&config.machine_config))?;
    vm.register_memory(&mem)?;
    vm.setup_irqchip()?;
    vm.restore_state(&state.vm, clock_realtime)?;
    let mut devices = DeviceManager::with_legacy_state(
        &vm,
        exit.clone(),
        serial_out,
        Some((&state.serial, &state.i8042)),
    )?;
    if pci {
        devices.enable_pci(&vm)?;
    }
    for (saved, ((names, device), resized)) in state.virtio.iter().zip(reopened) {
        devices.attach_virtio(&vm, &mem, names, device, Some(&saved.placed))?;
        if resized {
            if let Some(entry) = devices.virtio.last() {
                // The image changed size since the snapshot: the driver rereads it.
                let mut t = entry.transport.lock().unwrap_or_else(|e| e.into_inner());
                t.core_mut().config_changed();
            }
        }
    }
    let vcpus = state
        .vcpus
        .iter()
        .map(|saved| Ok(Vcpu::new(vm.create_vcpu(saved.index)?, saved.index)))
        .collect::<Result<Vec<_>, Error>>()?;
    check_host_supports(&vm, state, &vcpus[0])?;
    for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
        vcpu.restore_state(saved)?;
    }
    if state.vmgenid {
        devices.add_vmgenid(&vm)?;
        // A new generation, announced once the irqchip and the local APICs
        // hold their saved state (else the restore would drop the interrupt):
        // the guest reseeds its RNG as it resumes. With --no-vmgenid the
        // clone keeps the snapshot's ID.
        if let (Some(g), false) = (&devices.vmgenid, config.no_vmgenid) {
            g.regenerate(&mem)?;
        }
    }
    Ok(MicroVm {
        config,
        vm,
        mem,
        vcpus,
        devices,
        exit,
        started,
        uffd,
    })
}

/// Refuses a snapshot whose vCPUs need what this host's KVM lacks: CPU
/// features the guest was given, or MSRs KVM cannot restore. The
/// differences are named. The features are compared with what this host
/// gives a guest booted here, as `probe` (a fresh vCPU) reads it back: on
/// most hosts KVM's supported CPUID, but some (PVM) pass the host CPU's
/// own features through.
fn check_host_supports(vm: &vm::Vm, state: &MicrovmState, probe: &Vcpu) -> Result<(), Error> {
    let host_cpuid = probe.offered_cpuid(&vm.supported_cpuid()?, state.vcpus.len() as u32)?;
    let host_msrs = vm.saveable_msrs()?;
    let mut lacking = Vec::new();
    for v in &state.vcpus {
        let features =
            crate::arch::x86_64::cpuid::missing_features(host_cpuid.as_slice(), v.cpuid.as_slice());
        if !features.is_empty() {
            lacking.push(format!(
                "CPU features of vCPU {}: {}",
                v.index,
                features.join(", ")
            ));
        }
        let msrs: Vec<String> = v
            .msrs
            .as_slice()
            .iter()
            .filter(|m| !host_msrs.contains(&m.index))
            .map(|m| format!("{:#x}", m.index))
            .collect();
        if !msrs.is_empty() {
            lacking.push(format!("MSRs of vCPU {}: {}", v.index, msrs.join(", ")));
        }
        if !lacking.is_empty() {
            // The first vCPU that differs says it: they were all set up alike.
            return Err(Error::Snapshot(snapshot::Error::State(format!(
                "This host's KVM lacks what the snapshot's guest uses ({}); restore it on a host that has them.",
                lacking.join("; ")
            ))));
        }
    }
    Ok(())
}

/// Balloon pages (4 KiB) in a MiB.
pub use crate::device_kinds::balloon::MIB_PAGES;

/// Command-line entries announcing virtio-mmio devices to kernels that find them
/// there (ACPI kernels find them in the DSDT).
fn virtio_cmdline_entries(devices: &[acpi::VirtioMmioDeviceInfo]) -> Vec<String> {
    devices
        .iter()
        .map(|d| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                d.len / 1024,
                d.addr,
                d.irq
            )
        })
        .collect()
}

/// Kernel, initrd and command line into guest memory.
fn load_boot_images(
    config: &VmConfig,
    boot: &BootSource,
    mem: &GuestMemoryMmap,
    virtio: &[acpi::VirtioMmioDeviceInfo],
) -> Result<(LoadedKernel, bootparams::BootInfo), Error> {
    let mem_size = config.machine_config.mem_bytes();
    // End of the RAM below the 32-bit MMIO hole.
    let low_end = mem_size.min(MMIO_HOLE_START);
    let kernel = loader::load_kernel(mem, &boot.kernel_image_path, low_end)?;
    let initrd = match &boot.initrd_path {
        Some(path) => Some(loader::load_initrd(mem, path, &kernel, low_end)?),
        None => None,
    };
    let mut entries = virtio_cmdline_entries(virtio);
    let user_root = boot
        .boot_args
        .as_deref()
        .is_some_and(|c| c.split_whitespace().any(|a| a.starts_with("root=")));
    if let Some(root) = config.drives.iter().find(|d| d.is_root_device) {
        if !user_root {
            entries.push(match &root.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".into(),
            });
            entries.push(if root.is_read_only { "ro" } else { "rw" }.into());
        }
    }
    if let Some((index, root)) = config.root_pmem() {
        if !user_root {
            entries.push(format!("root=/dev/pmem{index}"));
            entries.push(if root.read_only { "ro" } else { "rw" }.into());
        }
    }
    if boot.boot_args.is_none() && crate::pvm_host() {
        log::info!(
            "PVM host: the default kernel command line adds the parameters this host's instruction emulator needs (docs/TESTING-ON-PVM.md)"
        );
    }
    let cmdline = loader::build_cmdline(boot.boot_args.as_deref(), &entries);
    let cmdline = loader::write_cmdline(mem, &cmdline, kernel.cmdline_max)?;
    let info = bootparams::BootInfo {
        cmdline,
        initrd,
        rsdp: 0,
        mem_size,
    };
    Ok((kernel, info))
}

/// What the ACPI tables announce besides the CPUs.
struct BootTables<'a> {
    virtio: &'a [acpi::VirtioMmioDeviceInfo],
    pci: Option<acpi::PciRootInfo>,
    vmgenid: Option<acpi::VmGenIdInfo>,
}

/// GDT, page tables, MP table, ACPI tables and the zero page or PVH start info.
fn write_boot_tables(
    cpus: u32,
    mem: &GuestMemoryMmap,
    (kernel, mut info): &(LoadedKernel, bootparams::BootInfo),
    tables: &BootTables,
) -> Result<BootEntry, Error> {
    let gdt: Vec<u8> = gdt::BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_START))
        .map_err(|_| Error::Gdt)?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| Error::Gdt)?;
    let cr3 = paging::setup_identity_map(mem)?;
    // Validated: 1..=MAX_CPUS, which fits a u8.
    let cpus = cpus as u8;
    mptable::setup_mptable(mem, cpus)?;
    let rsdp = acpi::create_acpi_tables(
        mem,
        &acpi::AcpiConfig {
            num_cpus: cpus,
            virtio_devices: tables.virtio,
            pci: tables.pci,
            vmgenid: tables.vmgenid,
        },
    )?;
    info.rsdp = rsdp.0;
    let boot_info = match kernel.protocol {
        EntryProtocol::Linux64 => bootparams::write_zero_page(mem, kernel.setup_header, &info)?,
        EntryProtocol::Pvh => bootparams::write_pvh_start_info(mem, &info)?,
    };
    log::debug!(
        "kernel entry {:#x} ({:?}), boot info at {boot_info:#x}, cmdline {} bytes",
        kernel.entry,
        kernel.protocol,
        info.cmdline.1
    );
    Ok(BootEntry {
        protocol: kernel.protocol,
        entry: kernel.entry,
        boot_info,
        cr3,
    })
}

/// Creates and configures every vCPU.
fn create_vcpus(vm: &vm::Vm, cpus: u32, entry: &BootEntry) -> Result<Vec<Vcpu>, Error> {
    let cpuid = vm.supported_cpuid()?;
    (0..cpus)
        .map(|i| {
            let vcpu = Vcpu::new(vm.create_vcpu(i)?, i);
            vcpu.configure(&cpuid, cpus, entry)?;
            Ok(vcpu)
        })
        .collect()
}
