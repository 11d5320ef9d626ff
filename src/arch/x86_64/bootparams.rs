//! The memory map and the boot information the kernel reads at entry: the Linux
//! zero page (`boot_params`) or the PVH `hvm_start_info` with its memory map.

use devices::memory::GuestMemoryMmap;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::layout::{
    EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Errors writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The memory map has more entries than the zero page holds.
    #[error("The memory map has {0} entries, more than the zero page holds.")]
    TooManyE820Entries(usize),
    /// Guest memory write failed.
    #[error("Cannot write the boot information into guest memory.")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Guest RAM regions for `mem_size` bytes: below the 32-bit MMIO hole, and the
/// rest from 4 GiB up.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (mem_size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// The e820 map of a guest with `mem_size` bytes of RAM. The entries partition
/// the RAM exactly: their sizes add up to `mem_size`. The legacy area from the
/// EBDA to 1 MiB (boot tables, MP table, ACPI) is reserved.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: mem_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

/// What the boot information points the kernel at.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// Guest address and length (without NUL) of the command line.
    pub cmdline: (u64, usize),
    /// Guest address and length of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Guest address of the ACPI RSDP.
    pub rsdp: u64,
    /// Total guest RAM in bytes.
    pub mem_size: u64,
}

/// Writes the zero page for the Linux 64-bit boot protocol. `header` is the setup
/// header of a bzImage; an ELF vmlinux has none and gets a minimal one.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    info: &BootInfo,
) -> Result<u64, Error> {
    let hdr = match header {
        Some(h) => h,
        None => setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448, // "HdrS"
            kernel_alignment: 0x100_0000,
            ..Default::default()
        },
    };
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    const LOADER_UNDEFINED: u8 = 0xff;
    const CAN_USE_HEAP: u8 = 0x80;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = info.cmdline.0 as u32;
    params.hdr.cmdline_size = info.cmdline.1 as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = info.rsdp;
    let map = e820_map(info.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(Error::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(Error::Write)?;
    Ok(ZERO_PAGE_START)
}

/// `hvm_start_info` as a plain byte-valued value.
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct StartInfo(hvm_start_info);
// SAFETY: hvm_start_info is a repr(C) struct of integers with no padding holes
// that matter for reading (the layout is asserted by linux-loader); any byte
// pattern is a valid value.
unsafe impl ByteValued for StartInfo {}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: a repr(C) struct of two u64 and two u32 fields, no padding; any byte
// pattern is a valid value.
unsafe impl ByteValued for MemmapEntry {}

/// Magic value of `hvm_start_info` ("xEn3" with the high bit set).
pub const PVH_START_MAGIC: u32 = 0x336e_c578;

/// Writes the PVH start info, its memory map and module list; returns its address.
pub fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<u64, Error> {
    let map = e820_map(info.mem_size);
    let header_size = std::mem::size_of::<StartInfo>() as u64;
    let memmap_addr = PVH_INFO_START + header_size;
    let entry_size = std::mem::size_of::<MemmapEntry>() as u64;
    let modlist_addr = memmap_addr + entry_size * map.len() as u64;
    let mut start = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: info.cmdline.0,
        rsdp_paddr: info.rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    for (i, e) in map.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        });
        mem.write_obj(entry, GuestAddress(memmap_addr + i as u64 * entry_size))
            .map_err(Error::Write)?;
    }
    if let Some((addr, size)) = info.initrd {
        // hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
        for (i, v) in [addr, size, 0, 0].into_iter().enumerate() {
            mem.write_obj(v, GuestAddress(modlist_addr + i as u64 * 8))
                .map_err(Error::Write)?;
        }
        start.nr_modules = 1;
        start.modlist_paddr = modlist_addr;
    }
    mem.write_obj(StartInfo(start), GuestAddress(PVH_INFO_START))
        .map_err(Error::Write)?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ZERO_PAGE_START;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn total(map: &[E820Entry]) -> u64 {
        map.iter().map(|e| e.size).sum()
    }

    fn assert_sorted_disjoint(map: &[E820Entry]) {
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{map:?}");
        }
    }

    #[test]
    fn e820_adds_up_to_memory_below_the_hole() {
        for size in [16 * MIB, 128 * MIB, 3 * GIB] {
            let map = e820_map(size);
            assert_eq!(total(&map), size);
            assert_sorted_disjoint(&map);
            assert!(map.iter().all(|e| e.addr + e.size <= MMIO_HOLE_START));
        }
    }

    #[test]
    fn e820_splits_ram_around_the_mmio_hole() {
        let map = e820_map(6 * GIB);
        assert_eq!(total(&map), 6 * GIB);
        assert_sorted_disjoint(&map);
        let high = map.last().unwrap();
        assert_eq!(
            (high.addr, high.size, high.kind),
            (4 * GIB, 3 * GIB, E820_RAM)
        );
        assert!(!map
            .iter()
            .any(|e| e.addr < MMIO_HOLE_END && e.addr + e.size > MMIO_HOLE_START));
    }

    #[test]
    fn e820_reserves_the_legacy_area() {
        let map = e820_map(128 * MIB);
        assert!(map.contains(&E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED
        }));
    }

    #[test]
    fn ram_regions_match_the_map() {
        assert_eq!(
            ram_regions(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
        let r = ram_regions(5 * GIB);
        assert_eq!(r[1], (GuestAddress(4 * GIB), (2 * GIB) as usize));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, 5 * GIB);
    }

    fn mem() -> GuestMemoryMmap {
        devices::memory::anonymous(&[(GuestAddress(0), (2 * MIB) as usize)], false).unwrap()
    }

    #[test]
    fn zero_page_points_at_cmdline_initrd_rsdp_and_map() {
        let m = mem();
        let info = BootInfo {
            cmdline: (0x20000, 42),
            initrd: Some((0x700_0000, 0x1234)),
            rsdp: 0xe0000,
            mem_size: 128 * MIB,
        };
        let addr = write_zero_page(&m, None, &info).unwrap();
        assert_eq!(addr, ZERO_PAGE_START);
        let p: boot_params = m.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, e820_map(128 * MIB).len());
        let sum: u64 = p.e820_table[..p.e820_entries as usize]
            .iter()
            .map(|e| e.size)
            .sum();
        assert_eq!(sum, 128 * MIB);
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let m = mem();
        let hdr = setup_header {
            version: 0x20f,
            xloadflags: 1,
            setup_sects: 27,
            ..Default::default()
        };
        write_zero_page(
            &m,
            Some(hdr),
            &BootInfo {
                mem_size: 64 * MIB,
                ..Default::default()
            },
        )
        .unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(
            (
                { p.hdr.version },
                { p.hdr.setup_sects },
                p.hdr.type_of_loader
            ),
            (0x20f, 27, 0xff)
        );
    }

    #[test]
    fn pvh_start_info_carries_memmap_and_module() {
        let m = mem();
        let info = BootInfo {
            cmdline: (0x20000, 10),
            initrd: Some((0x100_0000, 0x2000)),
            rsdp: 0xe0000,
            mem_size: 256 * MIB,
        };
        let addr = write_pvh_start_info(&m, &info).unwrap();
        let s: StartInfo = m.read_obj(GuestAddress(addr)).unwrap();
        let s = s.0;
        assert_eq!(
            (s.magic, s.version, s.cmdline_paddr, s.rsdp_paddr),
            (PVH_START_MAGIC, 1, 0x20000, 0xe0000)
        );
        assert_eq!(s.memmap_entries as usize, e820_map(256 * MIB).len());
        let mut sum = 0;
        for i in 0..s.memmap_entries as u64 {
            let e: MemmapEntry = m.read_obj(GuestAddress(s.memmap_paddr + i * 24)).unwrap();
            sum += e.0.size;
        }
        assert_eq!(sum, 256 * MIB);
        assert_eq!(s.nr_modules, 1);
        let paddr: u64 = m.read_obj(GuestAddress(s.modlist_paddr)).unwrap();
        let size: u64 = m.read_obj(GuestAddress(s.modlist_paddr + 8)).unwrap();
        assert_eq!((paddr, size), (0x100_0000, 0x2000));
    }
}
