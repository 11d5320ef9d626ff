//! Guest physical memory layout of an x86_64 microVM.
//!
//! Everything the VMM writes into guest memory before the first instruction lives
//! below 1 MiB, at fixed addresses that the kernel does not use as general RAM
//! (they are either in the e820 map as reserved, or below the kernel's load address
//! and handed back to it as RAM only where that is safe).
//!
//! ```text
//! 0x0000_0500  GDT (5 entries)          0x0000_0540  IDT (empty, limit 0)
//! 0x0000_6000  PVH start_info + memmap  0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  initial stack pointer    0x0000_9000  PML4, PDPT, 4 x PD (identity map of 4 GiB)
//! 0x0002_0000  kernel command line      0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first) 0x000f_0000  MP table
//! 0x0010_0000  kernel (HIMEM_START)     0xc000_0000  32-bit MMIO hole up to 4 GiB:
//!   0xc000_0000 boot timer, 0xd000_0000 virtio-mmio windows,
//!   0xe000_0000 PCI ECAM (1 MiB), 0xe100_0000 PCI BARs, 0xfec0_0000 IOAPIC,
//!   0xfee0_0000 local APIC
//! ```

/// Start of the GDT the VMM sets up for the boot CPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT loaded on the boot CPU.
pub const BOOT_IDT_START: u64 = 0x540;
/// PVH `hvm_start_info` structure, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table; the PDPT and the four page directories follow it page by page.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories mapping 0..4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room reserved for the command line (the kernel's own limit is usually smaller).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area; from here to 1 MiB is reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI tables are written; the RSDP comes first (16-byte aligned, in the
/// 0xe0000..0xfffff range that the kernel scans when the boot params do not name it).
pub const ACPI_START: u64 = 0xe0000;
/// Room for the ACPI tables.
pub const ACPI_MAX_SIZE: u64 = 0x10000;
/// Where the MP floating pointer and configuration table are written (scanned by the
/// kernel in the BIOS area 0xf0000..0xfffff).
pub const MPTABLE_START: u64 = 0xf0000;
/// Room for the MP table.
pub const MPTABLE_MAX_SIZE: u64 = 0x10000;
/// First byte above the legacy 1 MiB area; the kernel is loaded here.
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit MMIO hole. RAM above this address continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First address of the window where virtio-mmio devices are placed (one page each).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The boot timer (`--boot-timer`): where Firecracker's guests signal boot completion.
pub const BOOT_TIMER_START: u64 = MMIO_HOLE_START;
/// Size of the boot timer's window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// With `--enable-pci`: bus 0's ECAM configuration space (32 devices × 8
/// functions × 4 KiB), announced by the MCFG table.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of bus 0's ECAM space.
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// With `--enable-pci`: the window where PCI BARs are placed (the PCI root's
/// memory window in the DSDT), up to the IOAPIC.
pub const PCI_MMIO_START: u64 = 0xe100_0000;
/// First address past the BAR window.
pub const PCI_MMIO_END: u64 = IOAPIC_START;
/// The first GSI for MSI routes (0-23 are the IOAPIC's pins).
pub const MSI_GSI_START: u32 = 24;
/// One past the last GSI for MSI routes (KVM allows 4096 routes).
pub const MSI_GSI_END: u32 = 4096;

/// First interrupt line handed to virtio-mmio devices (IRQs 0..4 are legacy ISA devices).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last IOAPIC pin (the in-kernel IOAPIC has 24).
pub const IRQ_MAX: u32 = 23;
/// Last interrupt line handed to virtio-mmio devices (the one after it is
/// the VM generation ID's).
pub const VIRTIO_IRQ_END: u32 = IRQ_MAX - 1;
/// The interrupt line of the generic event device that announces a new VM
/// generation ID.
pub const VMGENID_IRQ: u32 = IRQ_MAX;
/// The 16-byte VM generation ID, in the reserved area below the ACPI tables.
pub const VMGENID_START: u64 = 0xdf000;
/// Default physical address of the IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Default physical address of the local APIC.
pub const APIC_START: u64 = 0xfee0_0000;

/// The COM1 8250 UART.
pub const SERIAL_PORT: u16 = 0x3f8;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 keyboard controller's data port; its command port is 0x64.
pub const I8042_PORT: u16 = 0x60;
/// IRQ of the i8042's keyboard port (announced in the DSDT; no keyboard is attached).
pub const I8042_KBD_IRQ: u32 = 1;
/// ACPI hardware-reduced sleep control register (one byte, port I/O).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI hardware-reduced sleep status register (one byte, port I/O).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// The `SLP_TYP` value the DSDT's `\_S5` object announces for soft-off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// The highest number of vCPUs the boot tables can describe with 8-bit xAPIC IDs
/// (255 is the broadcast ID).
pub const MAX_CPUS: u32 = 254;
