//! The boot GDT and the KVM segment registers derived from it.

use kvm_bindings::kvm_segment;

/// Builds a segment descriptor from its access/flags word (bits 0..7 access byte,
/// bits 12..15 the G/DB/L/AVL nibble), base and 20-bit limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Index of the 32-bit flat code segment (PVH entry).
pub const CODE32_INDEX: u16 = 1;
/// Index of the 64-bit code segment; selector 0x10 is `__BOOT_CS` of the Linux
/// 64-bit boot protocol.
pub const CODE64_INDEX: u16 = 2;
/// Index of the flat data segment; selector 0x18 is `__BOOT_DS`.
pub const DATA_INDEX: u16 = 3;
/// Index of the TSS descriptor.
pub const TSS_INDEX: u16 = 4;

/// The boot GDT: null, code32, code64, data, TSS.
pub const BOOT_GDT: [u64; 5] = [
    0,
    descriptor(0xc09b, 0, 0xfffff), // 32-bit code, present, exec/read, 4 GiB
    descriptor(0xa09b, 0, 0xfffff), // 64-bit code (L=1), present, exec/read
    descriptor(0xc093, 0, 0xfffff), // data, present, read/write, 4 GiB
    descriptor(0x808b, 0, 0xfffff), // 32-bit busy TSS
];

/// The KVM view of GDT entry `index`.
pub fn segment(index: u16) -> kvm_segment {
    let entry = BOOT_GDT[index as usize];
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode_flat() {
        let s = segment(CODE64_INDEX);
        assert_eq!(s.selector, 0x10);
        assert_eq!(
            (s.l, s.db, s.g, s.present, s.s, s.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!((s.base, s.limit), (0, 0xffff_ffff));
    }

    #[test]
    fn data_and_code32_segments_are_flat_4g() {
        let d = segment(DATA_INDEX);
        assert_eq!(
            (d.selector, d.type_, d.db, d.l, d.limit),
            (0x18, 3, 1, 0, 0xffff_ffff)
        );
        let c = segment(CODE32_INDEX);
        assert_eq!((c.selector, c.type_, c.db, c.l), (0x08, 0xb, 1, 0));
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let e = descriptor(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(
            (e >> 16) & 0xff_ffff | ((e >> 32) & 0xff00_0000),
            0x1234_5678
        );
        assert_eq!(((e >> 32) & 0xf_0000) | (e & 0xffff), 0xabcde);
    }
}
