//! ACPI tables for a hardware-reduced x86_64 microVM.
//!
//! The tables are written from [`ACPI_START`] on, each 16-byte aligned:
//!
//! ```text
//! RSDP (revision 2) -> XSDT -> FADT -> DSDT (X_DSDT)
//!                          \-> MADT
//!                          \-> MCFG (with --enable-pci)
//! ```
//!
//! The platform is "hardware-reduced" (ACPI 6.x, section 4.1): there is no PM1 block,
//! no GPE block, no SCI and no FACS. Power-off goes through the sleep control register
//! named in the FADT, and the DSDT declares `\_S5` so that the guest offers it. The
//! DSDT also enumerates the virtio-mmio devices, so the guest needs no
//! `virtio_mmio.device=` command line parameters. With PCI, the DSDT holds
//! the PCI root bridge (`\_SB_.PCI0`) with its bus, port and memory windows,
//! and the MCFG table says where its ECAM configuration space is.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use devices::memory::GuestMemoryMmap;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{
    ACPI_MAX_SIZE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START,
    APIC_START, I8042_KBD_IRQ, I8042_PORT, IOAPIC_START, IRQ_MAX, MAX_CPUS, PCI_ECAM_SIZE,
    SERIAL_IRQ, SERIAL_PORT,
};

/// A virtio-mmio device to announce in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDeviceInfo {
    /// Guest physical address of the device's register window.
    pub addr: u64,
    /// Length of the register window.
    pub len: u64,
    /// IOAPIC pin (GSI) the device interrupts on.
    pub irq: u32,
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, Copy)]
pub struct AcpiConfig<'a> {
    /// Number of vCPUs; vCPU `i` has local APIC ID and ACPI processor UID `i`.
    pub num_cpus: u8,
    /// The virtio-mmio devices, in the order they are named `VR00`, `VR01`, ...
    pub virtio_devices: &'a [VirtioMmioDeviceInfo],
    /// The PCI root bridge, if the VM has one.
    pub pci: Option<PciRootInfo>,
    /// The VM generation ID device, if the VM has one.
    pub vmgenid: Option<VmGenIdInfo>,
}

/// Where the VM generation ID is and the interrupt that announces a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmGenIdInfo {
    /// Guest physical address of the 16-byte ID.
    pub addr: u64,
    /// IOAPIC pin (GSI) of the generic event device that notifies `VGEN`.
    pub gsi: u32,
}

/// Where a PCI root bridge (segment 0, bus 0) has its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciRootInfo {
    /// Guest physical address of bus 0's ECAM configuration space (1 MiB).
    pub ecam: u64,
    /// First address of the window where BARs are placed.
    pub mmio_start: u64,
    /// Last address of that window (inclusive).
    pub mmio_end: u64,
}

/// Errors while building or writing the ACPI tables.
#[derive(Debug, Error)]
pub enum Error {
    /// The vCPU count is zero or larger than the tables can describe.
    #[error("The ACPI tables cannot describe {0} vCPUs; between 1 and {MAX_CPUS} are supported.")]
    InvalidCpuCount(u8),
    /// More virtio-mmio devices than the DSDT has names for.
    #[error(
        "The DSDT can name at most {MAX_VIRTIO_DEVICES} virtio-mmio devices, but {0} were given."
    )]
    TooManyDevices(usize),
    /// A virtio-mmio window is empty or does not fit a 32-bit memory descriptor.
    #[error(
        "Virtio-mmio device {index} has window {addr:#x} with length {len:#x}; it must be non-empty and end at or below 4 GiB."
    )]
    InvalidDeviceWindow {
        /// Position of the device in [`AcpiConfig::virtio_devices`].
        index: usize,
        /// Start of the window.
        addr: u64,
        /// Length of the window.
        len: u64,
    },
    /// A virtio-mmio device names an interrupt the IOAPIC does not have.
    #[error(
        "Virtio-mmio device {index} uses IRQ {irq}, but the IOAPIC only has pins 0 to {IRQ_MAX}."
    )]
    InvalidDeviceIrq {
        /// Position of the device in [`AcpiConfig::virtio_devices`].
        index: usize,
        /// The requested interrupt.
        irq: u32,
    },
    /// The tables do not fit in the area reserved for them.
    #[error("The ACPI tables need {size} bytes but only {max} bytes are reserved for them.")]
    TooLarge {
        /// Bytes the tables need, alignment padding included.
        size: u64,
        /// Bytes reserved at `ACPI_START`.
        max: u64,
    },
    /// Guest memory rejected a write.
    #[error("Failed to write the {table} table to guest memory.")]
    WriteMemory {
        /// Signature of the table being written.
        table: &'static str,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// OEM ID in the RSDP and every table header.
const OEM_ID: [u8; 6] = *b"VMMRS ";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// Hypervisor vendor identity in the FADT.
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"VMMRUST\0";

/// Every table starts on a 16-byte boundary.
const TABLE_ALIGNMENT: u64 = 16;
/// Size of the common table header (ACPI 6.x, section 5.2.6).
const TABLE_HEADER_SIZE: usize = 36;
/// The XSDT lists the FADT and the MADT (the DSDT is reached through the FADT).
const XSDT_ENTRIES: usize = 2;

/// MADT revision of ACPI 6.3 and later.
const MADT_REVISION: u8 = 5;
/// MADT flag: the system also has dual 8259 PICs (which KVM's in-kernel irqchip emulates).
const MADT_FLAG_PCAT_COMPAT: u32 = 1 << 0;
/// MADT interrupt controller structure type of a Local APIC NMI entry.
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// Length of a Local APIC NMI entry.
const MADT_LOCAL_APIC_NMI_LEN: u8 = 6;
/// ACPI processor UID meaning "all processors" in a Local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;
/// MPS INTI flags of the NMI entry: active high (polarity 01), edge-triggered (trigger
/// mode 01 in bits 2..3).
const NMI_INTI_FLAGS: u16 = 0b01 | (0b01 << 2);
/// The local APIC input the NMI arrives on.
const NMI_LINT: u8 = 1;

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// ACPI hardware ID that Linux's virtio-mmio driver binds to.
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Device names are `VR` followed by two hex digits.
const MAX_VIRTIO_DEVICES: usize = 0x100;

/// IA-PC boot architecture flag: the system has an 8042 keyboard controller.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: VGA is not present, so the guest must not probe it.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

// The layout constants below are narrowed with `as`; these checks make that lossless.
const _: () = assert!(
    APIC_START <= u32::MAX as u64,
    "the local APIC must be below 4 GiB"
);
const _: () = assert!(
    IOAPIC_START <= u32::MAX as u64,
    "the IOAPIC must be below 4 GiB"
);

/// Writes the RSDP, XSDT, FADT, MADT and DSDT for `cfg` from [`ACPI_START`] on and
/// returns the address of the RSDP (which is `ACPI_START`).
///
/// Nothing is written when the configuration is invalid or the tables would not fit.
///
/// The virtio-mmio interrupts are declared edge-triggered and active-high. The VMM
/// injects them through KVM irqfds, and an irqfd without a resample fd raises and
/// lowers the IOAPIC pin in one go: the guest only ever sees a rising edge. Declared
/// level-triggered, the pin would already be low again by the time the guest's
/// handler returns, so the level semantics would not hold anyway; edge matches what
/// the IOAPIC actually receives. The virtio-mmio interrupt status register keeps the
/// cause until the driver acknowledges it, so no notification is lost to an edge.
pub fn create_acpi_tables(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<GuestAddress, Error> {
    let num_cpus = cfg.num_cpus;
    if num_cpus == 0 || u32::from(num_cpus) > MAX_CPUS {
        return Err(Error::InvalidCpuCount(num_cpus));
    }

    // Tables whose contents do not depend on where the others are placed.
    let dsdt = build_dsdt(cfg.virtio_devices, cfg.pci.as_ref(), cfg.vmgenid.as_ref())?;
    let madt = build_madt(num_cpus);
    let mcfg = cfg.pci.map(|pci| {
        let mut mcfg = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
        mcfg.add_ecam(pci.ecam, 0, 0, 0);
        to_bytes(&mcfg)
    });

    let rsdp_addr = ACPI_START;
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64);
    let xsdt_entries = XSDT_ENTRIES + usize::from(mcfg.is_some());
    let xsdt_len = TABLE_HEADER_SIZE + xsdt_entries * std::mem::size_of::<u64>();
    let fadt_addr = align_up(xsdt_addr + xsdt_len as u64);
    let madt_addr = align_up(fadt_addr + FADT::len() as u64);
    let dsdt_addr = align_up(madt_addr + madt.len() as u64);
    let mcfg_addr = align_up(dsdt_addr + dsdt.len() as u64);
    let end = mcfg_addr + mcfg.as_ref().map_or(0, |t| t.len() as u64);

    let size = end - ACPI_START;
    if size > ACPI_MAX_SIZE {
        return Err(Error::TooLarge {
            size,
            max: ACPI_MAX_SIZE,
        });
    }

    let fadt = build_fadt(dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if mcfg.is_some() {
        xsdt.add_entry(mcfg_addr);
    }
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), xsdt_len);

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (table, addr, bytes) in [
        ("RSDP", rsdp_addr, rsdp.as_slice()),
        ("XSDT", xsdt_addr, xsdt.as_slice()),
        ("FACP", fadt_addr, fadt.as_slice()),
        ("APIC", madt_addr, madt.as_slice()),
        ("DSDT", dsdt_addr, dsdt.as_slice()),
        ("MCFG", mcfg_addr, mcfg.as_deref().unwrap_or_default()),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::WriteMemory { table, source })?;
    }

    Ok(GuestAddress(rsdp_addr))
}

/// Builds the FADT of a hardware-reduced platform whose DSDT is at `dsdt_addr`.
fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.sleep_control_reg = io_port_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_register(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    to_bytes(&fadt.finalize())
}

/// A one-byte register at I/O port `port`.
fn io_port_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Builds the MADT: one enabled local APIC per vCPU, the IOAPIC, and NMI on LINT1.
fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    // The IOAPIC takes the first ID after the local APICs and serves GSIs 0..=23.
    IoApic::new(num_cpus, IOAPIC_START as u32, 0).to_aml_bytes(&mut entries);
    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, MADT_LOCAL_APIC_NMI_LEN, ALL_PROCESSORS]);
    entries.extend_from_slice(&NMI_INTI_FLAGS.to_le_bytes());
    entries.push(NMI_LINT);

    // The MADT header is the common header followed by the local APIC address and the
    // flags, 44 bytes in all.
    let mut madt = Sdt::new(
        *b"APIC",
        (TABLE_HEADER_SIZE + 8) as u32,
        MADT_REVISION,
        OEM_ID,
        oem_table_id(b"APIC"),
        OEM_REVISION,
    );
    madt.write_u32(TABLE_HEADER_SIZE, APIC_START as u32);
    madt.write_u32(TABLE_HEADER_SIZE + 4, MADT_FLAG_PCAT_COMPAT);
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

/// Builds the DSDT: `\_S5`, the legacy devices, and one `\_SB_.VRxx` device per
/// virtio-mmio device.
fn build_dsdt(
    devices: &[VirtioMmioDeviceInfo],
    pci: Option<&PciRootInfo>,
    vmgenid: Option<&VmGenIdInfo>,
) -> Result<Vec<u8>, Error> {
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(Error::TooManyDevices(devices.len()));
    }

    let mut body = Vec::new();

    // Name (_S5, Package () { SLP_TYPa, SLP_TYPb, Reserved, Reserved }). In
    // hardware-reduced mode only SLP_TYPa matters: the guest writes
    // SLP_TYPa << 2 | SLP_EN to the sleep control register.
    let zero: u8 = 0;
    let s5_values: [&dyn Aml; 4] = [&ACPI_S5_SLEEP_TYPE, &zero, &zero, &zero];
    aml::Name::new("_S5_".into(), &aml::Package::new(s5_values.to_vec())).to_aml_bytes(&mut body);

    let mut system_bus = Vec::new();
    legacy_devices_aml(&mut system_bus);
    for (index, device) in devices.iter().enumerate() {
        virtio_device_aml(index, device, &mut system_bus)?;
    }
    if let Some(pci) = pci {
        pci_root_aml(pci, &mut system_bus);
    }
    if let Some(v) = vmgenid {
        vmgenid_aml(v, &mut system_bus);
    }
    body.extend_from_slice(&aml::Scope::raw("\\_SB_".into(), system_bus));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        TABLE_HEADER_SIZE as u32,
        DSDT_REVISION,
        OEM_ID,
        oem_table_id(b"DSDT"),
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// Appends the VM generation ID device and the generic event device that
/// notifies it:
///
/// ```text
/// Device (VGEN) {
///     Name (_HID, "VMGENCTR")          // Linux's vmgenid driver binds to it
///     Name (_CID, "VM_Gen_Counter")    // the name Microsoft's spec gives
///     Name (_DDN, "VM_Gen_Counter")
///     Name (ADDR, Package () { addr & 0xffffffff, addr >> 32 })
/// }
/// Device (GED0) {                     // hardware-reduced ACPI's event source
///     Name (_HID, "ACPI0013")
///     Name (_UID, 0)
///     Name (_CRS, ResourceTemplate () { Interrupt (edge, active high) { gsi } })
///     Method (_EVT, 1) { If (Arg0 == gsi) { Notify (\_SB_.VGEN, 0x80) } }
/// }
/// ```
fn vmgenid_aml(v: &VmGenIdInfo, sink: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &"VMGENCTR");
    let cid = aml::Name::new("_CID".into(), &"VM_Gen_Counter");
    let ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
    let (low, high) = (v.addr as u32, (v.addr >> 32) as u32);
    let addr = aml::Name::new("ADDR".into(), &aml::Package::new(vec![&low, &high]));
    aml::Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]).to_aml_bytes(sink);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let zero: u8 = 0;
    let uid = aml::Name::new("_UID".into(), &zero);
    let irq = aml::Interrupt::new(true, true, false, false, v.gsi);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let vgen = aml::Path::new("\\_SB_.VGEN");
    let notify_value: u8 = 0x80;
    let notify = aml::Notify::new(&vgen, &notify_value);
    let is_ours = aml::Equal::new(&aml::Arg(0), &v.gsi);
    let when = aml::If::new(&is_ours, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    aml::Device::new("GED0".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(sink);
}

/// Appends the PCI root bridge `PCI0` (PNP0A08, compatible with PNP0A03) of
/// segment 0 with bus 0, the configuration ports 0xcf8-0xcff and the BAR
/// window, and a motherboard resource (PNP0C02) holding the ECAM window, so
/// Linux accepts the MCFG's area as reserved.
fn pci_root_aml(pci: &PciRootInfo, sink: &mut Vec<u8>) {
    let zero: u8 = 0;
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &zero);
    let seg = aml::Name::new("_SEG".into(), &zero);
    let uid = aml::Name::new("_UID".into(), &zero);
    let bbn = aml::Name::new("_BBN".into(), &zero);
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    // The window is below 4 GiB: the layout checks it.
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio_start as u32,
        pci.mmio_end as u32,
        None,
    );
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&buses, &ports, &window]),
    );
    aml::Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    )
    .to_aml_bytes(sink);

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let uid = aml::Name::new("_UID".into(), &zero);
    let ecam = aml::Memory32Fixed::new(false, pci.ecam as u32, PCI_ECAM_SIZE as u32);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ecam]));
    aml::Device::new("MRES".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// Appends COM1 (PNP0501) and the i8042 (PNP0303) with their ports and interrupts.
///
/// In hardware-reduced ACPI mode the guest has no legacy PIC and no legacy ISA IRQ
/// numbers: an ISA device's interrupt is usable only when a device object names its
/// GSI. Without this, Linux registers COM1 at legacy IRQ 4, cannot request that IRQ
/// when the console is opened, and every write from user space fails with EIO.
fn legacy_devices_aml(sink: &mut Vec<u8>) {
    let com1_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let uid: u8 = 0;
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &com1_hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(sink);

    let data = aml::IO::new(I8042_PORT, I8042_PORT, 1, 1);
    let command = aml::IO::new(I8042_PORT + 4, I8042_PORT + 4, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, I8042_KBD_IRQ);
    let kbd_crs = aml::ResourceTemplate::new(vec![&data, &command, &kbd_irq]);
    let kbd_hid = aml::EISAName::new("PNP0303");
    aml::Device::new(
        "PS2K".into(),
        vec![
            &aml::Name::new("_HID".into(), &kbd_hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &kbd_crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// Appends the AML of device `VR<index>` to `sink`:
///
/// ```text
/// Device (VRxx) {
///     Name (_HID, "LNRO0005")
///     Name (_UID, index)
///     Name (_CRS, ResourceTemplate () {
///         Memory32Fixed (ReadWrite, addr, len)
///         Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq }
///     })
/// }
/// ```
fn virtio_device_aml(
    index: usize,
    device: &VirtioMmioDeviceInfo,
    sink: &mut Vec<u8>,
) -> Result<(), Error> {
    let invalid_window = || Error::InvalidDeviceWindow {
        index,
        addr: device.addr,
        len: device.len,
    };
    let base = u32::try_from(device.addr).map_err(|_| invalid_window())?;
    let len = u32::try_from(device.len).map_err(|_| invalid_window())?;
    if len == 0 || base.checked_add(len - 1).is_none() {
        return Err(invalid_window());
    }
    if device.irq > IRQ_MAX {
        return Err(Error::InvalidDeviceIrq {
            index,
            irq: device.irq,
        });
    }
    // Bounded by MAX_VIRTIO_DEVICES, checked by the caller.
    let uid = u32::try_from(index).map_err(|_| Error::TooManyDevices(index))?;
    let name = format!("VR{uid:02X}");

    let memory = aml::Memory32Fixed::new(true, base, len);
    let interrupt = aml::Interrupt::new(true, true, false, false, device.irq);
    let resources = aml::ResourceTemplate::new(vec![&memory, &interrupt]);
    let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &resources);
    aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    Ok(())
}

/// OEM table ID of the table with `signature`: `VMMR` followed by the signature.
fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"VMMR    ";
    id[4..].copy_from_slice(signature);
    id
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn align_up(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGNMENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};

    fn guest_memory() -> GuestMemoryMmap {
        devices::memory::anonymous(&[(GuestAddress(0), 2 << 20)], false).unwrap()
    }

    fn virtio_devices(count: u32) -> Vec<VirtioMmioDeviceInfo> {
        (0..count)
            .map(|i| VirtioMmioDeviceInfo {
                addr: VIRTIO_MMIO_START + u64::from(i) * VIRTIO_MMIO_SIZE,
                len: VIRTIO_MMIO_SIZE,
                irq: VIRTIO_IRQ_START + i,
            })
            .collect()
    }

    /// The whole ACPI area after `create_acpi_tables`, plus the address of the RSDP.
    struct Tables {
        area: Vec<u8>,
        rsdp: u64,
    }

    impl Tables {
        fn create(num_cpus: u8, devices: &[VirtioMmioDeviceInfo]) -> Self {
            Self::create_with_pci(num_cpus, devices, None)
        }

        fn create_with_pci(
            num_cpus: u8,
            devices: &[VirtioMmioDeviceInfo],
            pci: Option<PciRootInfo>,
        ) -> Self {
            let mem = guest_memory();
            let cfg = AcpiConfig {
                num_cpus,
                virtio_devices: devices,
                pci,
                vmgenid: None,
            };
            let rsdp = create_acpi_tables(&mem, &cfg).unwrap().0;
            let mut area = vec![0u8; ACPI_MAX_SIZE as usize];
            mem.read_slice(&mut area, GuestAddress(ACPI_START)).unwrap();
            Tables { area, rsdp }
        }

        fn bytes(&self, addr: u64, len: usize) -> &[u8] {
            assert!(addr >= ACPI_START, "{addr:#x} is below the ACPI area");
            let offset = (addr - ACPI_START) as usize;
            assert!(
                offset + len <= self.area.len(),
                "{addr:#x} + {len} leaves the ACPI area"
            );
            &self.area[offset..offset + len]
        }

        fn rsdp(&self) -> &[u8] {
            self.bytes(self.rsdp, 36)
        }

        /// The whole table at `addr`, with the length from its header.
        fn table(&self, addr: u64) -> &[u8] {
            let len = u32_at(self.bytes(addr, TABLE_HEADER_SIZE), 4) as usize;
            self.bytes(addr, len)
        }

        fn xsdt_entries(&self) -> Vec<u64> {
            let xsdt = self.table(u64_at(self.rsdp(), 24));
            xsdt[TABLE_HEADER_SIZE..]
                .chunks(8)
                .map(|entry| u64_at(entry, 0))
                .collect()
        }

        /// The table listed in the XSDT with `signature`.
        fn find(&self, signature: &[u8; 4]) -> &[u8] {
            let mut found = self
                .xsdt_entries()
                .into_iter()
                .map(|addr| self.table(addr))
                .filter(|table| &table[0..4] == signature);
            let table = found.next().expect("table listed in the XSDT");
            assert!(found.next().is_none(), "table listed twice");
            table
        }

        fn fadt(&self) -> &[u8] {
            self.find(b"FACP")
        }

        fn dsdt(&self) -> &[u8] {
            self.table(u64_at(self.fadt(), FADT_X_DSDT))
        }

        /// The MADT's interrupt controller structures.
        fn madt_entries(&self) -> Vec<&[u8]> {
            let madt = self.find(b"APIC");
            let mut entries = Vec::new();
            let mut offset = TABLE_HEADER_SIZE + 8;
            while offset < madt.len() {
                let len = usize::from(madt[offset + 1]);
                assert!(len >= 2, "MADT entry at {offset} has length {len}");
                entries.push(&madt[offset..offset + len]);
                offset += len;
            }
            assert_eq!(offset, madt.len());
            entries
        }
    }

    // Field offsets in the FADT (ACPI 6.x, table 5.9).
    const FADT_IAPC_BOOT_ARCH: usize = 109;
    const FADT_FLAGS: usize = 112;
    const FADT_DSDT: usize = 40;
    const FADT_X_DSDT: usize = 140;
    const FADT_SLEEP_CONTROL_REG: usize = 244;
    const FADT_SLEEP_STATUS_REG: usize = 256;
    const FADT_HYPERVISOR_VENDOR_ID: usize = 268;
    const FADT_FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;

    fn byte_sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn rsdp_has_signature_and_valid_checksums() {
        let tables = Tables::create(2, &[]);
        assert_eq!(tables.rsdp, ACPI_START);
        let rsdp = tables.rsdp();
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(rsdp, 20), 36, "length");
        assert_eq!(byte_sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(byte_sum(rsdp), 0, "extended checksum");
        assert_eq!(&rsdp[9..15], &OEM_ID);
    }

    #[test]
    fn xsdt_lists_fadt_and_madt_with_valid_checksums() {
        let tables = Tables::create(2, &[]);
        let xsdt = tables.table(u64_at(tables.rsdp(), 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(byte_sum(xsdt), 0);

        let signatures: Vec<&[u8]> = tables
            .xsdt_entries()
            .into_iter()
            .map(|addr| {
                let table = tables.table(addr);
                assert_eq!(byte_sum(table), 0, "checksum of table at {addr:#x}");
                assert_eq!(addr % TABLE_ALIGNMENT, 0);
                &table[0..4]
            })
            .collect();
        assert_eq!(signatures, [b"FACP", b"APIC"]);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_registers() {
        let tables = Tables::create(1, &[]);
        let fadt = tables.fadt();
        assert_eq!(fadt[8], 6, "FADT major revision");
        assert_eq!(fadt.len(), 276);
        assert_ne!(u32_at(fadt, FADT_FLAGS) & FADT_FLAG_HW_REDUCED_ACPI, 0);
        assert_eq!(
            u16_at(fadt, FADT_IAPC_BOOT_ARCH),
            IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT
        );
        for (offset, port) in [
            (FADT_SLEEP_CONTROL_REG, ACPI_SLEEP_CONTROL_PORT),
            (FADT_SLEEP_STATUS_REG, ACPI_SLEEP_STATUS_PORT),
        ] {
            let gas = &fadt[offset..offset + 12];
            assert_eq!(gas[0], 1, "SystemIO address space");
            assert_eq!(gas[1], 8, "register bit width");
            assert_eq!(gas[2], 0, "register bit offset");
            assert_eq!(gas[3], 1, "byte access");
            assert_eq!(u64_at(gas, 4), u64::from(port));
        }
        assert_eq!(
            &fadt[FADT_HYPERVISOR_VENDOR_ID..FADT_HYPERVISOR_VENDOR_ID + 8],
            &HYPERVISOR_VENDOR_ID
        );
    }

    #[test]
    fn fadt_x_dsdt_points_to_valid_dsdt() {
        let tables = Tables::create(1, &virtio_devices(2));
        let fadt = tables.fadt();
        assert_eq!(
            u32_at(fadt, FADT_DSDT),
            0,
            "only the 64-bit pointer is used"
        );
        let dsdt = tables.dsdt();
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(dsdt[8], DSDT_REVISION);
        assert_eq!(byte_sum(dsdt), 0);
    }

    #[test]
    fn madt_lists_one_local_apic_per_cpu() {
        for num_cpus in [1u8, 2, 5, 64] {
            let tables = Tables::create(num_cpus, &[]);
            let madt = tables.find(b"APIC");
            assert_eq!(u64::from(u32_at(madt, 36)), APIC_START);
            assert_eq!(
                u32_at(madt, 40) & MADT_FLAG_PCAT_COMPAT,
                MADT_FLAG_PCAT_COMPAT
            );

            let entries = tables.madt_entries();
            let local_apics: Vec<_> = entries.iter().filter(|e| e[0] == 0).collect();
            assert_eq!(local_apics.len(), usize::from(num_cpus));
            for (index, lapic) in local_apics.iter().enumerate() {
                assert_eq!(lapic.len(), 8);
                assert_eq!(usize::from(lapic[2]), index, "processor UID");
                assert_eq!(usize::from(lapic[3]), index, "APIC ID");
                assert_eq!(u32_at(lapic, 4), 1, "enabled");
            }
        }
    }

    #[test]
    fn madt_has_ioapic_and_lint1_nmi() {
        let tables = Tables::create(3, &[]);
        let entries = tables.madt_entries();

        let ioapics: Vec<_> = entries.iter().filter(|e| e[0] == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0];
        assert_eq!(ioapic.len(), 12);
        assert_eq!(ioapic[2], 3, "IOAPIC ID follows the local APIC IDs");
        assert_eq!(u64::from(u32_at(ioapic, 4)), IOAPIC_START);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");

        let nmis: Vec<_> = entries.iter().filter(|e| e[0] == 4).collect();
        assert_eq!(nmis.len(), 1);
        let nmi = nmis[0];
        assert_eq!(nmi.len(), 6);
        assert_eq!(nmi[2], 0xff, "all processors");
        assert_eq!(nmi[5], 1, "LINT1");
    }

    #[test]
    fn dsdt_declares_com1_and_the_i8042_with_their_interrupts() {
        let t = Tables::create(1, &[]);
        let dsdt = t.dsdt();
        // EisaId("PNP0501") and EisaId("PNP0303") as encoded dwords.
        assert_eq!(count(dsdt, &[0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(count(dsdt, &[0x41, 0xd0, 0x03, 0x03]), 1);
        // IO descriptor: decode16, min = max = 0x3f8, alignment 1, length 8.
        assert_eq!(
            count(dsdt, &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]),
            1
        );
        // Extended interrupt descriptor for GSI 4: consumer, edge, active high.
        assert_eq!(
            count(
                dsdt,
                &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]
            ),
            1
        );
    }

    #[test]
    fn dsdt_declares_s5() {
        let tables = Tables::create(1, &[]);
        let dsdt = tables.dsdt();
        // NameOp "_S5_" PackageOp PkgLength NumElements BytePrefix SLP_TYPa.
        let s5 = [
            &[0x08][..],
            b"_S5_",
            &[0x12, 0x07, 0x04, 0x0a, ACPI_S5_SLEEP_TYPE, 0x00, 0x00, 0x00],
        ]
        .concat();
        assert_eq!(count(dsdt, &s5), 1);
        assert_eq!(count(dsdt, b"LNRO0005"), 0);
    }

    #[test]
    fn with_pci_the_mcfg_names_the_ecam_and_the_dsdt_the_root_bridge() {
        let pci = PciRootInfo {
            ecam: 0xe000_0000,
            mmio_start: 0xe100_0000,
            mmio_end: 0xfebf_ffff,
        };
        let tables = Tables::create_with_pci(1, &[], Some(pci));
        assert_eq!(tables.xsdt_entries().len(), 3);
        let mcfg = tables.find(b"MCFG");
        assert_eq!(byte_sum(mcfg), 0, "MCFG checksum");
        // Header, 8 reserved bytes, one allocation: base, segment 0, buses 0-0.
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(u64_at(mcfg, 44), pci.ecam);
        assert_eq!(u16_at(mcfg, 52), 0);
        assert_eq!((mcfg[54], mcfg[55]), (0, 0));
        let dsdt = tables.dsdt();
        assert_eq!(count(dsdt, b"PCI0"), 1);
        // EisaId("PNP0A08"), EisaId("PNP0A03") and EisaId("PNP0C02").
        for id in [0x080a_d041u32, 0x030a_d041, 0x020c_d041] {
            assert_eq!(count(dsdt, &id.to_le_bytes()), 1, "{id:#x}");
        }
        // DWordMemory window: min and max fixed, read-write, the window's ends.
        let window = [
            &pci.mmio_start.to_le_bytes()[..4],
            &pci.mmio_end.to_le_bytes()[..4],
        ]
        .concat();
        assert_eq!(count(dsdt, &window), 1);
        // Memory32Fixed (read-only) over the ECAM window.
        let ecam = [
            &[0x86, 0x09, 0x00, 0x00][..],
            &(pci.ecam as u32).to_le_bytes(),
            &(1u32 << 20).to_le_bytes(),
        ]
        .concat();
        assert_eq!(count(dsdt, &ecam), 1);
        // Without PCI neither is there.
        let plain = Tables::create(1, &[]);
        assert_eq!(plain.xsdt_entries().len(), 2);
        assert_eq!(count(plain.dsdt(), b"PCI0"), 0);
    }

    #[test]
    fn dsdt_declares_one_virtio_device_per_entry() {
        let devices = virtio_devices(12);
        let tables = Tables::create(2, &devices);
        let dsdt = tables.dsdt();
        assert_eq!(count(dsdt, b"_S5_"), 1);
        assert_eq!(count(dsdt, b"LNRO0005"), devices.len());
        for (index, device) in devices.iter().enumerate() {
            let name = format!("VR{index:02X}");
            assert_eq!(count(dsdt, name.as_bytes()), 1, "{name}");

            // Memory32Fixed (ReadWrite, addr, len).
            let memory = [
                &[0x86, 0x09, 0x00, 0x01][..],
                &(device.addr as u32).to_le_bytes(),
                &(device.len as u32).to_le_bytes(),
            ]
            .concat();
            assert_eq!(count(dsdt, &memory), 1, "{name} memory");

            // Extended interrupt: consumer, edge, active high, exclusive, one interrupt.
            let interrupt = [
                &[0x89, 0x06, 0x00, 0x03, 0x01][..],
                &device.irq.to_le_bytes(),
            ]
            .concat();
            assert_eq!(count(dsdt, &interrupt), 1, "{name} interrupt");
        }
    }

    #[test]
    fn tables_fit_in_acpi_area_for_max_cpus() {
        let max_cpus = u8::try_from(MAX_CPUS).unwrap();
        let devices = virtio_devices(IRQ_MAX - VIRTIO_IRQ_START + 1);
        let tables = Tables::create(max_cpus, &devices);
        // `Tables::bytes` checks that every table lies inside the ACPI area.
        let mut addrs = tables.xsdt_entries();
        addrs.push(u64_at(tables.rsdp(), 24));
        addrs.push(u64_at(tables.fadt(), FADT_X_DSDT));
        for addr in addrs {
            assert_eq!(byte_sum(tables.table(addr)), 0);
        }
        let local_apics = tables.madt_entries().iter().filter(|e| e[0] == 0).count();
        assert_eq!(local_apics, MAX_CPUS as usize);
        assert_eq!(count(tables.dsdt(), b"LNRO0005"), devices.len());
    }

    #[test]
    fn rejects_invalid_cpu_counts() {
        let mem = guest_memory();
        for num_cpus in [0, u8::try_from(MAX_CPUS + 1).unwrap()] {
            let cfg = AcpiConfig {
                num_cpus,
                virtio_devices: &[],
                pci: None,
                vmgenid: None,
            };
            assert!(matches!(
                create_acpi_tables(&mem, &cfg),
                Err(Error::InvalidCpuCount(n)) if n == num_cpus
            ));
        }
    }

    #[test]
    fn rejects_virtio_window_above_4_gib() {
        let mem = guest_memory();
        let mut devices = virtio_devices(2);
        devices[1].addr = 0xffff_f800;
        let cfg = AcpiConfig {
            num_cpus: 1,
            virtio_devices: &devices,
            pci: None,
            vmgenid: None,
        };
        assert!(matches!(
            create_acpi_tables(&mem, &cfg),
            Err(Error::InvalidDeviceWindow { index: 1, .. })
        ));
    }

    #[test]
    fn rejects_virtio_irq_beyond_ioapic_pins() {
        let mem = guest_memory();
        let mut devices = virtio_devices(1);
        devices[0].irq = IRQ_MAX + 1;
        let cfg = AcpiConfig {
            num_cpus: 1,
            virtio_devices: &devices,
            pci: None,
            vmgenid: None,
        };
        assert!(matches!(
            create_acpi_tables(&mem, &cfg),
            Err(Error::InvalidDeviceIrq { index: 0, irq }) if irq == IRQ_MAX + 1
        ));
    }

    #[test]
    fn rejects_more_devices_than_names() {
        let mem = guest_memory();
        let devices = vec![virtio_devices(1)[0]; MAX_VIRTIO_DEVICES + 1];
        let cfg = AcpiConfig {
            num_cpus: 1,
            virtio_devices: &devices,
            pci: None,
            vmgenid: None,
        };
        assert!(matches!(
            create_acpi_tables(&mem, &cfg),
            Err(Error::TooManyDevices(n)) if n == MAX_VIRTIO_DEVICES + 1
        ));
    }

    #[test]
    fn reports_memory_that_does_not_cover_the_tables() {
        let mem = devices::memory::anonymous(&[(GuestAddress(0), 0x1000)], false).unwrap();
        let cfg = AcpiConfig {
            num_cpus: 1,
            virtio_devices: &[],
            pci: None,
            vmgenid: None,
        };
        assert!(matches!(
            create_acpi_tables(&mem, &cfg),
            Err(Error::WriteMemory { table: "RSDP", .. })
        ));
    }

    #[test]
    fn the_vm_generation_id_device_and_its_event_device_are_in_the_dsdt() {
        let mem = guest_memory();
        let cfg = AcpiConfig {
            num_cpus: 1,
            virtio_devices: &[],
            pci: None,
            vmgenid: Some(VmGenIdInfo {
                addr: 0xdf000,
                gsi: 23,
            }),
        };
        let rsdp = create_acpi_tables(&mem, &cfg).unwrap().0;
        let mut area = vec![0u8; ACPI_MAX_SIZE as usize];
        mem.read_slice(&mut area, GuestAddress(ACPI_START)).unwrap();
        let t = Tables { area, rsdp };
        let dsdt = t.dsdt();
        for needle in [
            &b"VGEN"[..],
            b"VMGENCTR\0",
            b"VM_Gen_Counter\0",
            b"ADDR",
            b"GED0",
            b"ACPI0013\0",
            b"_EVT",
        ] {
            // VGEN: the device and Notify's path; VM_Gen_Counter: _CID and _DDN.
            let want = if needle == b"VGEN" || needle == b"VM_Gen_Counter\0" {
                2
            } else {
                1
            };
            assert_eq!(count(dsdt, needle), want, "{needle:?}");
        }
        // ADDR's package holds the address's two halves as DWords.
        assert!(
            count(dsdt, &[0x0c, 0x00, 0xf0, 0x0d, 0x00]) >= 1,
            "DWordPrefix 0xdf000"
        );
        // The event device interrupts on GSI 23, edge-triggered, active high.
        assert_eq!(count(dsdt, &[0x89, 6, 0, 0b0011, 1, 23, 0, 0, 0]), 1);
    }
}
