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

/// The feature registers a snapshot's CPUID is checked on, with the bits
/// that are not host features: set by [`normalize`] (HYPERVISOR, HTT) or
/// mirroring the guest's CR4 (OSXSAVE, OSPKE).
const FEATURE_REGISTERS: [(u32, u32, usize, &str, u32); 9] = [
    (1, 0, 2, "ECX", LEAF1_ECX_HYPERVISOR | (1 << 27)),
    (1, 0, 3, "EDX", LEAF1_EDX_HTT),
    (7, 0, 1, "EBX", 0),
    (7, 0, 2, "ECX", 1 << 4),
    (7, 0, 3, "EDX", 0),
    (7, 1, 0, "EAX", 0),
    (0xd, 1, 0, "EAX", 0),
    (0x8000_0001, 0, 2, "ECX", 0),
    (0x8000_0001, 0, 3, "EDX", 0),
];

fn register(e: &kvm_cpuid_entry2, r: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][r]
}

/// The CPU feature bits `saved` (a snapshot's CPUID) gives the guest that
/// `host` (KVM's supported CPUID here) does not, each named as
/// "leaf 0x7.0 EBX bit 9": a guest restored without them would fault on
/// instructions it already chose to use.
pub fn missing_features(host: &[kvm_cpuid_entry2], saved: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut missing = Vec::new();
    for (function, index, reg, name, ignored) in FEATURE_REGISTERS {
        let find = |t: &[kvm_cpuid_entry2]| {
            t.iter()
                .find(|e| e.function == function && e.index == index)
                .copied()
        };
        let Some(want) = find(saved) else { continue };
        let have = find(host).map_or(0, |e| register(&e, reg));
        let lacking = register(&want, reg) & !have & !ignored;
        for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
            missing.push(format!("leaf {function:#x}.{index} {name} bit {bit}"));
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_a_host_lacks_are_named_and_the_rest_pass() {
        let mut host = table();
        host[1].ecx = 1 << 20; // SSE4.2
        let mut l7 = entry(7, 0);
        l7.ebx = 1 << 9; // ERMS
        host.push(l7);
        let mut saved = host.clone();
        normalize(&mut saved, 0, 1);
        saved[1].ecx |= 1 << 27; // OSXSAVE: the guest's CR4, not a host feature
        assert!(missing_features(&host, &saved).is_empty());
        saved[1].ecx |= 1 << 25; // AES
        let l7 = saved.iter_mut().find(|e| e.function == 7).unwrap();
        l7.ebx |= 1 << 5; // AVX2
        let mut amd = entry(0x8000_0001, 0);
        amd.edx = 1 << 29; // long mode, on a host that reports no such leaf
        saved.push(amd);
        assert_eq!(
            missing_features(&host, &saved),
            [
                "leaf 0x1.0 ECX bit 25",
                "leaf 0x7.0 EBX bit 5",
                "leaf 0x80000001.0 EDX bit 29"
            ]
        );
    }

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
