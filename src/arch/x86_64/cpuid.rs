//! CPUID as the guest sees it: what KVM supports, made consistent per vCPU with
//! its APIC ID and with the VM's topology (every vCPU one core of one socket).

use kvm_bindings::kvm_cpuid_entry2;

/// ECX bit 31 of leaf 1: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// EDX bit 28 of leaf 1: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// "AuthenticAMD" starts with "Auth" in EBX of leaf 0.
const AMD_EBX: u32 = u32::from_le_bytes(*b"Auth");

const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of bits needed to hold the IDs `0..count`.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Adjusts KVM's supported CPUID for vCPU `apic_id` of `cpu_count`.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], apic_id: u32, cpu_count: u32) {
    let is_amd = entries.iter().any(|e| e.function == 0 && e.ebx == AMD_EBX);
    let core_bits = id_bits(cpu_count);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (cpu_count.min(255) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if cpu_count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package in 31:26, logical
                // processors sharing the cache in 25:14 (L3 shared, L1/L2 per core).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpu_count - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3fff) | ((cpu_count.min(64) - 1) << 26) | (sharing.min(0xfff) << 14);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = cpu_count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 if is_amd => {
                // NC: number of cores minus one; ApicIdSize in 15:12.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (cpu_count - 1).min(255);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn table() -> Vec<kvm_cpuid_entry2> {
        let mut leaf1 = entry(1, 0);
        leaf1.ebx = 0xff00_0800; // stale host APIC ID, CLFLUSH size 8
        leaf1.edx = LEAF1_EDX_HTT;
        let mut l3 = entry(4, 3);
        l3.eax = (3 << 5) | 0x3;
        vec![
            entry(0, 0),
            leaf1,
            entry(4, 0),
            l3,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ]
    }

    fn find(t: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *t.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn leaf1_carries_the_vcpus_apic_id_and_hypervisor_bit() {
        let mut t = table();
        normalize(&mut t, 3, 4);
        let l1 = find(&t, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "low bits are kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn single_cpu_clears_htt() {
        let mut t = table();
        normalize(&mut t, 0, 1);
        assert_eq!(find(&t, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&t, 0xb, 1).eax, 0);
    }

    #[test]
    fn extended_topology_matches_cpu_count() {
        let mut t = table();
        normalize(&mut t, 5, 6);
        let smt = find(&t, 0xb, 0);
        let core = find(&t, 0xb, 1);
        let end = find(&t, 0xb, 2);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_TYPE_SMT, 5)
        );
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (3, 6, LEVEL_TYPE_CORE, 5)
        );
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }

    #[test]
    fn cache_leaf_reports_cores_and_sharing() {
        let mut t = table();
        normalize(&mut t, 0, 4);
        assert_eq!(find(&t, 4, 0).eax >> 26, 3);
        assert_eq!((find(&t, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&t, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&t, 4, 3).eax & 0x3fff, (3 << 5) | 0x3);
    }

    #[test]
    fn id_bits_covers_counts() {
        assert_eq!([1, 2, 3, 4, 5, 64, 65].map(id_bits), [0, 1, 2, 2, 3, 6, 7]);
    }
}
