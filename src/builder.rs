//! The recipe that assembles a VM from a [`VmConfig`], one step per function:
//! KVM VM → guest memory → irqchip → devices → kernel, initrd, cmdline → boot
//! tables → vCPUs.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::acpi_pm::AcpiSleep;
use devices::bus::Bus;
use devices::legacy::i8042::I8042;
use devices::legacy::serial::SerialDevice;
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, REG_QUEUE_NOTIFY};
use devices::virtio::net::Net;
use devices::virtio::tap::Tap;
use devices::virtio::{Interrupt, VirtioDevice};
use kvm_ioctls::IoEventAddress;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::regs::EntryProtocol;
use crate::arch::x86_64::{acpi, bootparams, gdt, mptable, paging};
use crate::config::VmConfig;
use crate::exit::ExitSignal;
use crate::loader::{self, LoadedKernel};
use crate::vstate::vcpu::{self, BootEntry, Vcpu};
use crate::vstate::{memory, vm};

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
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
    /// A device cannot be placed on its bus.
    #[error("Cannot place the {0} on its bus: {1}")]
    Bus(&'static str, devices::bus::Error),
    /// An eventfd cannot be created.
    #[error("Cannot create an eventfd: {0}.")]
    EventFd(std::io::Error),
    /// The GDT cannot be written.
    #[error("Cannot write the boot GDT into guest memory.")]
    Gdt,
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::Error),
    /// A TAP device cannot be used.
    #[error(transparent)]
    Tap(#[from] devices::virtio::tap::Error),
    /// A virtio device cannot be set up.
    #[error("Cannot set up virtio device {index}: {err}.")]
    Virtio { index: usize, err: std::io::Error },
    /// A queue notification cannot be connected to KVM.
    #[error("KVM could not connect a queue notification of virtio device {index}: {err}.")]
    IoEvent {
        index: usize,
        err: kvm_ioctls::Error,
    },
}

impl Error {
    /// Whether the error is in what the user gave (as opposed to a host or VMM failure).
    pub fn is_usage_error(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::Loader(_)
                | Error::Memory(_)
                | Error::Disk(_)
                | Error::Tap(_)
                | Error::Vm(vm::Error::TooManyCpus { .. })
        )
    }
}

/// A built VM, ready to run.
pub struct MicroVm {
    pub(crate) vm: vm::Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) virtio: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) virtio_names: Vec<String>,
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) started: Instant,
}

/// Builds a VM whose console output goes to `serial_out`. `started` is when the
/// VMM started, for timing traces.
pub fn build(
    config: &VmConfig,
    serial_out: Box<dyn Write + Send>,
    started: Instant,
) -> Result<MicroVm, Error> {
    config.validate()?;
    let vm = vm::Vm::new()?;
    vm.check_vcpu_count(config.cpus)?;
    let mem = memory::create_guest_memory(config.memory)?;
    vm.register_memory(&mem)?;
    vm.setup_irqchip()?;

    let exit = Arc::new(ExitSignal::new().map_err(Error::EventFd)?);
    let (pio, serial) = legacy_devices(&vm, exit.clone(), serial_out)?;
    let mut mmio = Bus::new();
    let devices = open_devices(config)?;
    let virtio_names = devices.iter().map(|(name, _)| name.clone()).collect();
    let (virtio, virtio_info) = virtio_devices(&vm, &mem, &mut mmio, devices)?;

    let kernel = load_boot_images(config, &mem, &virtio_info)?;
    let entry = write_boot_tables(config, &mem, &kernel, &virtio_info)?;
    let vcpus = create_vcpus(&vm, config.cpus, &entry)?;
    Ok(MicroVm {
        vm,
        mem,
        vcpus,
        pio,
        mmio,
        serial,
        virtio,
        virtio_names,
        exit,
        stop: Arc::new(AtomicBool::new(false)),
        started,
    })
}

type LegacyDevices = (Bus, Arc<Mutex<SerialDevice>>);

/// COM1, the i8042 and the ACPI sleep registers on a port-I/O bus.
fn legacy_devices(
    vm: &vm::Vm,
    exit: Arc<ExitSignal>,
    serial_out: Box<dyn Write + Send>,
) -> Result<LegacyDevices, Error> {
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        Arc::new(serial_irq),
        serial_out,
    )));
    pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)
        .map_err(|e| Error::Bus("serial port", e))?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        u64::from(I8042_PORT),
        5,
    )
    .map_err(|e| Error::Bus("i8042", e))?;
    pio.insert(
        Arc::new(Mutex::new(AcpiSleep::new(exit, ACPI_S5_SLEEP_TYPE))),
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        2,
    )
    .map_err(|e| Error::Bus("ACPI sleep registers", e))?;
    Ok((pio, serial))
}

/// A virtio device with the name the log uses for it.
type NamedDevice = (String, Box<dyn VirtioDevice>);

/// Opens (and locks) every disk image and attaches every TAP device before
/// anything is placed, so bad input fails the start without side effects. Disks
/// come first (vda, vdb, ...), then network interfaces (eth0, ...).
fn open_devices(config: &VmConfig) -> Result<Vec<NamedDevice>, Error> {
    let mut devices: Vec<NamedDevice> = Vec::new();
    for (i, d) in config.disks.iter().enumerate() {
        let block = Block::open(&d.path, d.read_only, d.id.as_deref())?;
        devices.push((format!("disk{i} ({})", d.path.display()), Box::new(block)));
    }
    for (i, n) in config.nets.iter().enumerate() {
        let mut net = Net::new(Tap::open(&n.tap)?, n.mac).with_mrg_rxbuf(n.mrg_rxbuf);
        if let Some(mtu) = n.mtu {
            net = net.with_mtu(mtu);
        }
        devices.push((format!("net{i} ({})", n.tap), Box::new(net)));
    }
    Ok(devices)
}

/// The attached virtio devices and where the guest finds them.
type VirtioSet = (
    Vec<Arc<Mutex<MmioTransport>>>,
    Vec<acpi::VirtioMmioDeviceInfo>,
);

/// Places each device's virtio-mmio window on the MMIO bus, with an irqfd for its
/// interrupt and an ioeventfd per queue, so neither interrupts nor notifications
/// wait on a vCPU exit handler.
fn virtio_devices(
    vm: &vm::Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    devices: Vec<NamedDevice>,
) -> Result<VirtioSet, Error> {
    let mut transports = Vec::new();
    let mut info = Vec::new();
    for (index, (_, device)) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_START + index as u32;
        let virtio_err = |err| Error::Virtio { index, err };
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(virtio_err)?;
        vm.register_irqfd(&irq_evt, irq)?;
        let interrupt = Interrupt::new(Arc::new(irq_evt));
        let transport = MmioTransport::new(device, mem.clone(), interrupt).map_err(virtio_err)?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    queue as u32,
                )
                .map_err(|err| Error::IoEvent { index, err })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_WINDOW_SIZE)
            .map_err(|e| Error::Bus("virtio device", e))?;
        transports.push(transport);
        info.push(acpi::VirtioMmioDeviceInfo {
            addr: base,
            len: VIRTIO_MMIO_SIZE,
            irq,
        });
    }
    Ok((transports, info))
}

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

/// End of the RAM below the 32-bit MMIO hole.
fn low_ram_end(config: &VmConfig) -> u64 {
    config.memory.min(MMIO_HOLE_START)
}

/// Kernel, initrd and command line into guest memory.
fn load_boot_images(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    virtio: &[acpi::VirtioMmioDeviceInfo],
) -> Result<(LoadedKernel, bootparams::BootInfo), Error> {
    let low_end = low_ram_end(config);
    let kernel = loader::load_kernel(mem, &config.kernel, low_end)?;
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(mem, path, &kernel, low_end)?),
        None => None,
    };
    let mut entries = virtio_cmdline_entries(virtio);
    let user_root = config
        .cmdline
        .as_deref()
        .is_some_and(|c| c.split_whitespace().any(|a| a.starts_with("root=")));
    if config.root_is_first_disk && !user_root {
        entries.push("root=/dev/vda".into());
        entries.push("rw".into());
    }
    let cmdline = loader::build_cmdline(config.cmdline.as_deref(), &entries);
    let cmdline = loader::write_cmdline(mem, &cmdline, kernel.cmdline_max)?;
    let info = bootparams::BootInfo {
        cmdline,
        initrd,
        rsdp: 0,
        mem_size: config.memory,
    };
    Ok((kernel, info))
}

/// GDT, page tables, MP table, ACPI tables and the zero page or PVH start info.
fn write_boot_tables(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    (kernel, mut info): &(LoadedKernel, bootparams::BootInfo),
    virtio: &[acpi::VirtioMmioDeviceInfo],
) -> Result<BootEntry, Error> {
    let gdt: Vec<u8> = gdt::BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_START))
        .map_err(|_| Error::Gdt)?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| Error::Gdt)?;
    let cr3 = paging::setup_identity_map(mem)?;
    // Validated: 1..=MAX_CPUS, which fits a u8.
    let cpus = config.cpus as u8;
    mptable::setup_mptable(mem, cpus)?;
    let rsdp = acpi::create_acpi_tables(
        mem,
        &acpi::AcpiConfig {
            num_cpus: cpus,
            virtio_devices: virtio,
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
