//! A vCPU's complete KVM state, saved and restored for snapshots (groundwork
//! for issue 9): registers, special registers, XSAVE area and XCRs, debug
//! registers, LAPIC, every MSR KVM lists as saveable, MP state, pending
//! events, CPUID and TSC frequency. Where this host's KVM cannot read a piece,
//! the state says so by name (`unavailable`) instead of carrying a made-up
//! value.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::VcpuFd;

/// IA32_TSC_DEADLINE: the LAPIC timer's deadline in TSC-deadline mode.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
use serde::{Deserialize, Serialize};

use super::vcpu::{kvm_err, Error};

/// Everything KVM holds about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index.
    pub index: u32,
    /// CPUID as the guest sees it.
    pub cpuid: CpuId,
    /// Every saveable MSR KVM could read, with its value.
    pub msrs: Msrs,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// The TSC frequency the guest was running with, in kHz.
    pub tsc_khz: Option<u32>,
    /// Pieces this host's KVM could not read, by name.
    pub unavailable: Vec<String>,
}

/// Reads the MSRs of `indices` that this vCPU can read; KVM stops a batch at
/// the first one it refuses, which is then left out.
fn read_msrs(fd: &VcpuFd, cpu: u32, indices: &[u32]) -> Result<Msrs, Error> {
    if indices.len() > KVM_MAX_MSR_ENTRIES {
        return Err(Error::TooManyMsrs(indices.len()));
    }
    let mut readable = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooManyMsrs(rest.len()))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err("read the MSRs", cpu))?;
        readable.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n (if any) was refused: skip it.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Msrs::from_entries(&readable).map_err(|_| Error::TooManyMsrs(readable.len()))
}

/// Saves vCPU `cpu`'s state; `msr_indices` are the MSRs KVM lists as saveable.
/// Must run while the vCPU is out of KVM_RUN (paused, on its own thread).
pub fn save(fd: &VcpuFd, cpu: u32, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let mut unavailable = Vec::new();
    // MP state first: reading it makes KVM settle pending APIC events.
    let mp_state = fd
        .get_mp_state()
        .map_err(kvm_err("read the MP state", cpu))?;
    let regs = fd.get_regs().map_err(kvm_err("read the registers", cpu))?;
    let sregs = fd
        .get_sregs()
        .map_err(kvm_err("read the special registers", cpu))?;
    let xsave = fd.get_xsave().ok();
    if xsave.is_none() {
        unavailable.push("xsave".to_string());
    }
    let xcrs = fd.get_xcrs().ok();
    if xcrs.is_none() {
        unavailable.push("xcrs".to_string());
    }
    let debug_regs = fd
        .get_debug_regs()
        .map_err(kvm_err("read the debug registers", cpu))?;
    let lapic = fd.get_lapic().map_err(kvm_err("read the LAPIC", cpu))?;
    let msrs = read_msrs(fd, cpu, msr_indices)?;
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(kvm_err("read the pending events", cpu))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read the CPUID", cpu))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    if tsc_khz.is_none() {
        unavailable.push("tsc_khz".to_string());
    }
    Ok(VcpuState {
        index: cpu,
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        mp_state,
        vcpu_events,
        tsc_khz,
        unavailable,
    })
}

/// Restores `state` into a fresh vCPU, in the order KVM needs: CPUID before
/// anything that depends on it, the MP state before the registers, the LAPIC
/// before the MSRs (the TSC deadline timer), the events last.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
    let cpu = state.index;
    fd.set_cpuid2(&state.cpuid)
        .map_err(kvm_err("set the CPUID", cpu))?;
    if let Some(khz) = state.tsc_khz {
        // The guest calibrated its timers against this rate: within 250 ppm
        // nothing is needed, beyond it the host must scale the TSC or the
        // restore fails (a guest whose clock runs at the wrong rate is worse).
        let host = fd.get_tsc_khz().ok();
        let close = host.is_some_and(|h| u64::from(h.abs_diff(khz)) * 4000 <= u64::from(khz));
        if !close {
            fd.set_tsc_khz(khz)
                .map_err(kvm_err("scale the TSC to the snapshot's frequency", cpu))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err("set the MP state", cpu))?;
    fd.set_regs(&state.regs)
        .map_err(kvm_err("set the registers", cpu))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err("set the special registers", cpu))?;
    if let Some(xsave) = &state.xsave {
        // SAFETY: KVM_SET_XSAVE reads more than the 4 KiB legacy area only
        // for XSTATE features a process enabled with
        // arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM); the VMM never does, so KVM
        // reads exactly the `kvm_xsave` given.
        unsafe { fd.set_xsave(xsave) }.map_err(kvm_err("set the XSAVE area", cpu))?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(kvm_err("set the XCRs", cpu))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm_err("set the debug registers", cpu))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err("set the LAPIC", cpu))?;
    // The TSC deadline is written after every other MSR (the TSC itself
    // first), whatever order the state lists them in: a deadline set against
    // the old TSC value would fire at the wrong time or never.
    let (deadline, others): (Vec<_>, Vec<_>) = state
        .msrs
        .as_slice()
        .iter()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    for batch in [others, deadline] {
        if batch.is_empty() {
            continue;
        }
        let msrs = Msrs::from_entries(&batch).map_err(|_| Error::TooManyMsrs(batch.len()))?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("set the MSRs", cpu))?;
        if set != batch.len() {
            return Err(Error::MsrsRestored {
                cpu,
                set,
                want: batch.len(),
                first: batch.get(set).map_or(0, |m| m.index),
            });
        }
    }
    // KVM reports pending NMIs and the SIPI vector without their "valid"
    // flags; without them KVM_SET_VCPU_EVENTS would leave them out.
    let mut events = state.vcpu_events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events)
        .map_err(kvm_err("set the pending events", cpu))?;
    Ok(())
}
