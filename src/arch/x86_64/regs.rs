//! Initial register state of a vCPU: general registers, segments and control
//! registers for the chosen entry protocol, FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};

use super::gdt::{segment, CODE32_INDEX, CODE64_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER};

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryProtocol {
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, RBX = `hvm_start_info`.
    Pvh,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// General registers at the kernel entry point.
pub fn boot_regs(protocol: EntryProtocol, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        EntryProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info;
        }
        EntryProtocol::Pvh => regs.rbx = boot_info,
    }
    regs
}

/// Updates the special registers taken from the vCPU for the entry protocol.
pub fn set_boot_sregs(sregs: &mut kvm_sregs, protocol: EntryProtocol, cr3: u64) {
    let gdt_limit = (super::gdt::BOOT_GDT.len() * 8 - 1) as u16;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 0;
    let data = segment(DATA_INDEX);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_INDEX);
    match protocol {
        EntryProtocol::Linux64 => {
            sregs.cs = segment(CODE64_INDEX);
            sregs.cr3 = cr3;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryProtocol::Pvh => {
            sregs.cs = segment(CODE32_INDEX);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// FPU state after reset: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// MSR values at boot.
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    // A fixed list of ten entries is far below the FAM wrapper's capacity.
    Msrs::from_entries(&entries).expect("ten MSR entries fit the MSR list")
}

/// Number of MSRs [`boot_msrs`] sets.
pub const BOOT_MSR_COUNT: usize = 10;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as firmware does.
pub fn set_lint_pins(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_enters_long_mode_with_zero_page_in_rsi() {
        let regs = boot_regs(EntryProtocol::Linux64, 0x100_0000, 0x7000);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
        let mut sregs = kvm_sregs::default();
        set_boot_sregs(&mut sregs, EntryProtocol::Linux64, 0x9000);
        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!(sregs.ds.selector, 0x18);
        assert_eq!(sregs.cr3, 0x9000);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn pvh_enters_protected_mode_without_paging() {
        let regs = boot_regs(EntryProtocol::Pvh, 0x100_0200, 0x6000);
        assert_eq!((regs.rip, regs.rbx), (0x100_0200, 0x6000));
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        set_boot_sregs(&mut sregs, EntryProtocol::Pvh, 0x9000);
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cs.selector), (1, 0, 0x08));
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT0, 0x0001_0000); // masked, fixed
        set_lint_pins(&mut lapic);
        assert_eq!(get_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&lapic, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn msr_list_is_complete() {
        assert_eq!(boot_msrs().as_slice().len(), BOOT_MSR_COUNT);
    }
}
