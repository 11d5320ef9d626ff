//! Intel MultiProcessor Specification 1.4 tables.
//!
//! A guest that boots with `acpi=off` (or with a kernel built without ACPI) finds its
//! CPUs and its interrupt routing through the MP table instead of the MADT. The VMM
//! writes, at [`MPTABLE_START`]:
//!
//! ```text
//! +0   MP floating pointer structure (16 bytes, "_MP_")
//! +16  MP configuration table header (44 bytes, "PCMP")
//! +60  base table entries: processors, ISA bus, IOAPIC, I/O and local interrupts
//! ```
//!
//! Interrupt routing mirrors the default routing of KVM's in-kernel irqchip: ISA IRQ
//! `n` arrives on IOAPIC pin `n`, with no override for the timer.

use devices::memory::GuestMemoryMmap;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{APIC_START, IOAPIC_START, IRQ_MAX, MAX_CPUS, MPTABLE_MAX_SIZE, MPTABLE_START};

/// Errors while writing the MP table.
#[derive(Debug, Error)]
pub enum Error {
    /// The vCPU count is zero or larger than the tables can describe.
    #[error("The MP table cannot describe {0} vCPUs; between 1 and {MAX_CPUS} are supported.")]
    InvalidCpuCount(u8),
    /// The table does not fit in the area reserved for it.
    #[error("The MP table needs {size} bytes but only {max} bytes are reserved for it.")]
    TooLarge {
        /// Bytes the table needs, floating pointer included.
        size: usize,
        /// Bytes reserved at `MPTABLE_START`.
        max: u64,
    },
    /// Guest memory rejected the write.
    #[error("Failed to write the MP table to guest memory.")]
    WriteMemory(#[source] GuestMemoryError),
}

/// MP specification revision 1.4.
const SPEC_REVISION: u8 = 4;
/// Size of the floating pointer structure; its `length` field counts 16-byte units.
const FLOATING_POINTER_SIZE: usize = 16;
/// Size of the configuration table header.
const HEADER_SIZE: usize = 44;
/// Offset of the checksum byte in the floating pointer structure.
const FLOATING_POINTER_CHECKSUM_OFFSET: usize = 10;
/// Offset of the checksum byte in the configuration table header.
const HEADER_CHECKSUM_OFFSET: usize = 7;

const OEM_ID: [u8; 8] = *b"VMMRS   ";
const PRODUCT_ID: [u8; 12] = *b"MICROVM     ";

// Entry types and their sizes.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const OTHER_ENTRY_SIZE: usize = 8;

/// Version of an integrated xAPIC, as KVM's local APIC reports it.
const LAPIC_VERSION: u8 = 0x14;
/// Version of KVM's in-kernel IOAPIC (24 redirection entries).
const IOAPIC_VERSION: u8 = 0x11;

const CPU_FLAG_ENABLED: u8 = 1 << 0;
const CPU_FLAG_BOOT_PROCESSOR: u8 = 1 << 1;
/// CPUID signature: family 6, model 0, stepping 0. The guest reads the real one with
/// CPUID; this field only has to be plausible.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX feature flags: FPU (bit 0) and on-chip APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const IOAPIC_FLAG_ENABLED: u8 = 1 << 0;

const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: [u8; 6] = *b"ISA   ";

// Interrupt types of I/O and local interrupt entries.
const INTERRUPT_TYPE_INT: u8 = 0;
const INTERRUPT_TYPE_NMI: u8 = 1;
const INTERRUPT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode both "conform to the specification of the bus"; for ISA
/// that is active-high, edge-triggered.
const INTERRUPT_FLAGS_CONFORMING: u16 = 0;
/// Destination local APIC ID meaning "every local APIC".
const ALL_LOCAL_APICS: u8 = 0xff;

// The layout constants below are narrowed with `as`; these checks make that lossless.
const _: () = assert!(
    IRQ_MAX <= u8::MAX as u32,
    "IOAPIC pin numbers are single bytes"
);
const _: () = assert!(
    IOAPIC_START <= u32::MAX as u64,
    "the IOAPIC must be below 4 GiB"
);
const _: () = assert!(
    APIC_START <= u32::MAX as u64,
    "the local APIC must be below 4 GiB"
);
const _: () = assert!(
    MPTABLE_START + MPTABLE_MAX_SIZE <= u32::MAX as u64,
    "the MP table must be below 4 GiB"
);

/// Writes the MP floating pointer and configuration table for `num_cpus` vCPUs at
/// [`MPTABLE_START`].
///
/// vCPU `i` gets local APIC ID `i`; vCPU 0 is the bootstrap processor. The single
/// IOAPIC takes the first ID after the local APICs (`num_cpus`).
///
/// I/O interrupt entries map source IRQ `n` on the ISA bus to IOAPIC pin `n` for every
/// pin, `0..=IRQ_MAX`, not only for the 16 ISA IRQs: virtio-mmio devices use pins up
/// to [`IRQ_MAX`], and Linux only programs IOAPIC pins that the MP table names. The
/// entries above 15 borrow the ISA bus, whose conforming polarity and trigger mode
/// (active-high, edge) are what KVM's irqfd injection delivers.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), Error> {
    if num_cpus == 0 || u32::from(num_cpus) > MAX_CPUS {
        return Err(Error::InvalidCpuCount(num_cpus));
    }
    let bytes = build_mptable(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(Error::WriteMemory)
}

/// Builds the floating pointer followed by the configuration table, both checksummed.
fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, Error> {
    let ioapic_id = num_cpus;
    // The IOAPIC has IRQ_MAX + 1 (24) pins.
    let last_pin = IRQ_MAX as u8;

    let processor_entries = usize::from(num_cpus);
    // The ISA bus, the IOAPIC, one I/O interrupt per IOAPIC pin, LINT0 and LINT1.
    let other_entries = 2 + (usize::from(last_pin) + 1) + 2;
    let entries_len = processor_entries * PROCESSOR_ENTRY_SIZE + other_entries * OTHER_ENTRY_SIZE;
    let table_len = HEADER_SIZE + entries_len;
    let total_len = FLOATING_POINTER_SIZE + table_len;
    let too_large = || Error::TooLarge {
        size: total_len,
        max: MPTABLE_MAX_SIZE,
    };
    if total_len as u64 > MPTABLE_MAX_SIZE {
        return Err(too_large());
    }
    // The header's length and count fields are 16 bits wide.
    let base_table_length = u16::try_from(table_len).map_err(|_| too_large())?;
    let entry_count = u16::try_from(processor_entries + other_entries).map_err(|_| too_large())?;
    let table_address = (MPTABLE_START + FLOATING_POINTER_SIZE as u64) as u32;
    let lapic_address = APIC_START as u32;

    let mut entries = Vec::with_capacity(entries_len);
    for cpu in 0..num_cpus {
        let mut flags = CPU_FLAG_ENABLED;
        if cpu == 0 {
            flags |= CPU_FLAG_BOOT_PROCESSOR;
        }
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }

    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(&ISA_BUS_TYPE);

    let ioapic_address = IOAPIC_START as u32;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_FLAG_ENABLED]);
    entries.extend_from_slice(&ioapic_address.to_le_bytes());

    for pin in 0..=last_pin {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_TYPE_INT]);
        entries.extend_from_slice(&INTERRUPT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, pin, ioapic_id, pin]);
    }

    // Virtual wire mode: the 8259 output reaches the CPUs through LINT0, NMIs through
    // LINT1 of every local APIC.
    for (interrupt_type, lint) in [(INTERRUPT_TYPE_EXTINT, 0u8), (INTERRUPT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, interrupt_type]);
        entries.extend_from_slice(&INTERRUPT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
    }

    debug_assert_eq!(entries.len(), entries_len);

    let mut out = Vec::with_capacity(total_len);

    // MP floating pointer structure.
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_address.to_le_bytes());
    // Length in 16-byte paragraphs, spec revision, checksum (filled in below).
    out.extend_from_slice(&[1, SPEC_REVISION, 0]);
    // Feature byte 1 = 0: a configuration table is present. Feature byte 2 = 0: IMCR
    // absent, the system runs in virtual wire mode. Bytes 3..5 are reserved.
    out.extend_from_slice(&[0; 5]);
    out[FLOATING_POINTER_CHECKSUM_OFFSET] = checksum(&out[..FLOATING_POINTER_SIZE]);

    // Configuration table header.
    let header_start = out.len();
    out.extend_from_slice(b"PCMP");
    out.extend_from_slice(&base_table_length.to_le_bytes());
    out.extend_from_slice(&[SPEC_REVISION, 0]);
    out.extend_from_slice(&OEM_ID);
    out.extend_from_slice(&PRODUCT_ID);
    // No OEM table: pointer and size are zero.
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&entry_count.to_le_bytes());
    out.extend_from_slice(&lapic_address.to_le_bytes());
    // No extended table: length, checksum and the reserved byte are zero.
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&entries);
    out[header_start + HEADER_CHECKSUM_OFFSET] = checksum(&out[header_start..]);

    Ok(out)
}

/// The byte that makes `bytes` (whose checksum byte is still zero) sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_memory() -> GuestMemoryMmap {
        devices::memory::anonymous(&[(GuestAddress(0), 2 << 20)], false).unwrap()
    }

    fn byte_sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    /// The floating pointer as written to guest memory.
    fn floating_pointer(mem: &GuestMemoryMmap) -> [u8; FLOATING_POINTER_SIZE] {
        let mut fp = [0u8; FLOATING_POINTER_SIZE];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        fp
    }

    /// The configuration table (header and entries) that the floating pointer names.
    fn config_table(mem: &GuestMemoryMmap) -> Vec<u8> {
        let address = u64::from(u32_at(&floating_pointer(mem), 4));
        let mut header = [0u8; HEADER_SIZE];
        mem.read_slice(&mut header, GuestAddress(address)).unwrap();
        let mut table = vec![0u8; usize::from(u16_at(&header, 4))];
        mem.read_slice(&mut table, GuestAddress(address)).unwrap();
        table
    }

    /// The base table entries, split by their type-dependent sizes.
    fn entries(table: &[u8]) -> Vec<&[u8]> {
        let mut entries = Vec::new();
        let mut offset = HEADER_SIZE;
        while offset < table.len() {
            let len = match table[offset] {
                ENTRY_PROCESSOR => PROCESSOR_ENTRY_SIZE,
                ENTRY_BUS | ENTRY_IOAPIC | ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => {
                    OTHER_ENTRY_SIZE
                }
                other => panic!("unknown MP table entry type {other}"),
            };
            entries.push(&table[offset..offset + len]);
            offset += len;
        }
        assert_eq!(entries.len(), usize::from(u16_at(table, 34)));
        entries
    }

    fn entries_of_type(table: &[u8], entry_type: u8) -> Vec<&[u8]> {
        entries(table)
            .into_iter()
            .filter(|e| e[0] == entry_type)
            .collect()
    }

    #[test]
    fn floating_pointer_is_found_with_valid_checksum() {
        let mem = guest_memory();
        setup_mptable(&mem, 2).unwrap();
        let fp = floating_pointer(&mem);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(byte_sum(&fp), 0);
        assert_eq!(fp[8], 1, "length is one 16-byte paragraph");
        assert_eq!(fp[9], SPEC_REVISION);
        assert_eq!(fp[11], 0, "a configuration table is present");
        assert_eq!(
            u64::from(u32_at(&fp, 4)),
            MPTABLE_START + FLOATING_POINTER_SIZE as u64
        );
    }

    #[test]
    fn config_table_has_signature_and_valid_checksum() {
        let mem = guest_memory();
        setup_mptable(&mem, 4).unwrap();
        let table = config_table(&mem);
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(table[6], SPEC_REVISION);
        assert_eq!(byte_sum(&table), 0);
        assert_eq!(u64::from(u32_at(&table, 36)), APIC_START);
    }

    #[test]
    fn one_processor_entry_per_cpu_with_bsp_only_on_cpu_0() {
        let mem = guest_memory();
        let num_cpus = 7;
        setup_mptable(&mem, num_cpus).unwrap();
        let table = config_table(&mem);
        let cpus = entries_of_type(&table, ENTRY_PROCESSOR);
        assert_eq!(cpus.len(), usize::from(num_cpus));
        for (index, cpu) in cpus.iter().enumerate() {
            assert_eq!(usize::from(cpu[1]), index, "APIC ID equals vCPU index");
            assert_ne!(cpu[3] & CPU_FLAG_ENABLED, 0);
            assert_eq!(cpu[3] & CPU_FLAG_BOOT_PROCESSOR != 0, index == 0);
        }
    }

    #[test]
    fn ioapic_entry_follows_the_local_apic_ids() {
        let mem = guest_memory();
        setup_mptable(&mem, 3).unwrap();
        let table = config_table(&mem);
        let ioapics = entries_of_type(&table, ENTRY_IOAPIC);
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0];
        assert_eq!(ioapic[1], 3);
        assert_eq!(ioapic[2], IOAPIC_VERSION);
        assert_eq!(ioapic[3], IOAPIC_FLAG_ENABLED);
        assert_eq!(u64::from(u32_at(ioapic, 4)), IOAPIC_START);

        let buses = entries_of_type(&table, ENTRY_BUS);
        assert_eq!(buses.len(), 1);
        assert_eq!(&buses[0][2..8], b"ISA   ");
    }

    #[test]
    fn io_interrupts_map_each_irq_to_the_same_ioapic_pin() {
        let mem = guest_memory();
        setup_mptable(&mem, 1).unwrap();
        let table = config_table(&mem);
        let irqs = entries_of_type(&table, ENTRY_IO_INTERRUPT);
        assert_eq!(irqs.len(), IRQ_MAX as usize + 1);
        for (pin, irq) in irqs.iter().enumerate() {
            assert_eq!(irq[1], INTERRUPT_TYPE_INT);
            assert_eq!(u16_at(irq, 2), INTERRUPT_FLAGS_CONFORMING);
            assert_eq!(irq[4], ISA_BUS_ID);
            assert_eq!(usize::from(irq[5]), pin, "source IRQ");
            assert_eq!(irq[6], 1, "destination is the IOAPIC");
            assert_eq!(usize::from(irq[7]), pin, "destination pin");
        }
    }

    #[test]
    fn local_interrupts_are_extint_on_lint0_and_nmi_on_lint1() {
        let mem = guest_memory();
        setup_mptable(&mem, 2).unwrap();
        let table = config_table(&mem);
        let lints = entries_of_type(&table, ENTRY_LOCAL_INTERRUPT);
        assert_eq!(lints.len(), 2);
        assert_eq!(
            (lints[0][1], lints[0][6], lints[0][7]),
            (INTERRUPT_TYPE_EXTINT, 0xff, 0)
        );
        assert_eq!(
            (lints[1][1], lints[1][6], lints[1][7]),
            (INTERRUPT_TYPE_NMI, 0xff, 1)
        );
    }

    #[test]
    fn rejects_zero_cpus() {
        let mem = guest_memory();
        assert!(matches!(
            setup_mptable(&mem, 0),
            Err(Error::InvalidCpuCount(0))
        ));
    }

    #[test]
    fn rejects_more_than_max_cpus() {
        let mem = guest_memory();
        let too_many = u8::try_from(MAX_CPUS + 1).unwrap();
        assert!(matches!(
            setup_mptable(&mem, too_many),
            Err(Error::InvalidCpuCount(n)) if n == too_many
        ));
    }

    #[test]
    fn max_cpus_fits() {
        let mem = guest_memory();
        let max = u8::try_from(MAX_CPUS).unwrap();
        setup_mptable(&mem, max).unwrap();
        let table = config_table(&mem);
        assert!((FLOATING_POINTER_SIZE + table.len()) as u64 <= MPTABLE_MAX_SIZE);
        assert_eq!(byte_sum(&table), 0);
        assert_eq!(
            entries_of_type(&table, ENTRY_PROCESSOR).len(),
            MAX_CPUS as usize
        );
    }

    #[test]
    fn reports_memory_that_does_not_cover_the_table() {
        let mem = devices::memory::anonymous(&[(GuestAddress(0), 0x1000)], false).unwrap();
        assert!(matches!(setup_mptable(&mem, 1), Err(Error::WriteMemory(_))));
    }
}
