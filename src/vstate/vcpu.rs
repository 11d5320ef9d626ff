//! A vCPU: its initial state, and the thread that runs it in the KVM_RUN loop,
//! dispatching every exit deliberately.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use devices::bus::Bus;
use kvm_bindings::{
    kvm_run, CpuId, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86_64::{cpuid, regs};
use crate::exit::{CrashKind, CrashReport, ExitSignal, VmExit};

/// Errors configuring or starting a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM vCPU ioctl failed during set-up.
    #[error("KVM could not {what} of vCPU {cpu}: {err}.")]
    Kvm {
        what: &'static str,
        cpu: u32,
        #[source]
        err: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set only {set} of {want} boot MSRs of vCPU {cpu}.")]
    Msrs { cpu: u32, set: usize, want: usize },
    /// The vCPU thread could not be started.
    #[error("Cannot start the thread of vCPU {cpu}: {err}.")]
    Spawn { cpu: u32, err: std::io::Error },
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler: {0}.")]
    Signal(vmm_sys_util::errno::Error),
}

/// Where and how the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// Entry protocol.
    pub protocol: regs::EntryProtocol,
    /// First instruction.
    pub entry: u64,
    /// Zero page (Linux64) or start info (PVH).
    pub boot_info: u64,
    /// CR3 for the Linux 64-bit protocol.
    pub cr3: u64,
}

/// Shared by all vCPUs of a VM.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port-I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Guest memory, for crash reports.
    pub mem: GuestMemoryMmap,
    /// Where outcomes are reported.
    pub exit: Arc<ExitSignal>,
    /// Set when every vCPU must leave its loop.
    pub stop: Arc<AtomicBool>,
    /// When the VMM process started (for the first-KVM_RUN trace).
    pub started: Instant,
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
}

fn kvm_err(what: &'static str, cpu: u32) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |err| Error::Kvm { what, cpu, err }
}

impl Vcpu {
    /// Wraps vCPU `index`.
    pub fn new(fd: VcpuFd, index: u32) -> Self {
        Vcpu { fd, index }
    }

    /// Sets CPUID, MSRs, FPU and LAPIC; the boot vCPU (index 0) also gets the entry
    /// state. The others wait for INIT/SIPI from the guest, as on hardware.
    pub fn configure(
        &self,
        base_cpuid: &CpuId,
        cpu_count: u32,
        boot: &BootEntry,
    ) -> Result<(), Error> {
        let cpu = self.index;
        let mut cpuid = base_cpuid.clone();
        cpuid::normalize(cpuid.as_mut_slice(), cpu, cpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(kvm_err("set the CPUID", cpu))?;

        let msrs = regs::boot_msrs();
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(kvm_err("set the MSRs", cpu))?;
        if set != msrs.as_slice().len() {
            return Err(Error::Msrs {
                cpu,
                set,
                want: msrs.as_slice().len(),
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(kvm_err("set the FPU", cpu))?;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(kvm_err("read the LAPIC", cpu))?;
        regs::set_lint_pins(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(kvm_err("set the LAPIC", cpu))?;

        if cpu == 0 {
            let mut sregs = self
                .fd
                .get_sregs()
                .map_err(kvm_err("read the special registers", cpu))?;
            regs::set_boot_sregs(&mut sregs, boot.protocol, boot.cr3);
            self.fd
                .set_sregs(&sregs)
                .map_err(kvm_err("set the special registers", cpu))?;
            let r = regs::boot_regs(boot.protocol, boot.entry, boot.boot_info);
            self.fd
                .set_regs(&r)
                .map_err(kvm_err("set the registers", cpu))?;
        }
        Ok(())
    }

    /// Starts the vCPU's thread.
    pub fn start(self, ctx: VcpuContext) -> Result<JoinHandle<()>, Error> {
        install_kick_handler()?;
        let cpu = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{cpu}"))
            .spawn(move || {
                let mut vcpu = self;
                vcpu.run_loop(&ctx);
            })
            .map_err(|err| Error::Spawn { cpu, err })
    }

    fn run_loop(&mut self, ctx: &VcpuContext) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        let mut first = true;
        while !ctx.stop.load(Ordering::SeqCst) {
            if first && self.index == 0 {
                log::debug!(
                    "first KVM_RUN {} us after VMM start",
                    ctx.started.elapsed().as_micros()
                );
                first = false;
            }
            match self.run_once(ctx) {
                Step::Continue => {}
                Step::Exit(outcome) => {
                    ctx.exit.raise(outcome);
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    fn run_once(&mut self, ctx: &VcpuContext) -> Step {
        let cpu = self.index;
        let crash = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !ctx.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    return Step::Continue;
                }
                VcpuExit::IoOut(port, data) => {
                    if !ctx.pio.write(u64::from(port), data) {
                        log::trace!("vCPU {cpu}: write to unhandled port {port:#x}");
                    }
                    return Step::Continue;
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    return Step::Continue;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !ctx.mmio.write(addr, data) {
                        log::trace!("vCPU {cpu}: write to unhandled MMIO {addr:#x}");
                    }
                    return Step::Continue;
                }
                VcpuExit::Intr => return Step::Continue,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => return Step::Exit(Ok(VmExit::PowerOff)),
                    KVM_SYSTEM_EVENT_RESET => return Step::Exit(Ok(VmExit::Reset)),
                    KVM_SYSTEM_EVENT_CRASH => CrashKind::GuestReported,
                    other => {
                        return Step::Exit(Err(format!(
                            "vCPU {cpu} reported unknown system event {other}."
                        )))
                    }
                },
                VcpuExit::Shutdown => CrashKind::TripleFault,
                VcpuExit::FailEntry(reason, _) => CrashKind::EntryFailure(reason),
                VcpuExit::InternalError => CrashKind::InternalError { suberror: 0 },
                // With the in-kernel LAPIC, HLT is handled by KVM and never exits; a
                // halt exit means the irqchip is missing, which set-up prevents.
                other => {
                    return Step::Exit(Err(format!(
                        "vCPU {cpu} stopped with an unexpected KVM exit: {other:?}."
                    )))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Step::Continue;
            }
            Err(e) => return Step::Exit(Err(format!("KVM_RUN failed on vCPU {cpu}: {e}."))),
        };
        Step::Exit(Ok(VmExit::Crash(self.crash_report(crash, &ctx.mem))))
    }

    fn crash_report(&mut self, mut kind: CrashKind, mem: &GuestMemoryMmap) -> CrashReport {
        let mut instruction = Vec::new();
        if let CrashKind::InternalError { .. } = kind {
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal`
            // member of the exit union is the one KVM filled in.
            let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
            kind = CrashKind::InternalError {
                suberror: internal.suberror,
            };
            let ndata = (internal.ndata as usize).min(internal.data.len());
            let data = &internal.data[..ndata];
            if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
                && ndata >= 2
                && data[0] & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
            {
                let len = (data[1] as usize).min(15).min((ndata - 2) * 8);
                instruction = data[2..]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .take(len)
                    .collect();
            }
        }
        let rip = self.fd.get_regs().ok().map(|r| r.rip);
        if instruction.is_empty() {
            if let Some(rip) = rip {
                instruction = self.read_guest_code(mem, rip);
            }
        }
        CrashReport {
            kind,
            cpu: self.index,
            rip,
            instruction,
        }
    }

    /// Up to 15 bytes at guest-virtual `rip`, through the vCPU's own translation.
    fn read_guest_code(&self, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut bytes = vec![0u8; 15];
        // Stop at the page end: the next page may translate elsewhere.
        let in_page = (0x1000 - (t.physical_address & 0xfff)) as usize;
        bytes.truncate(in_page);
        match mem.read_slice(&mut bytes, GuestAddress(t.physical_address)) {
            Ok(()) => bytes,
            Err(_) => Vec::new(),
        }
    }
}

enum Step {
    Continue,
    Exit(Result<VmExit, String>),
}

thread_local! {
    /// The running vCPU's kvm_run area, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a thread-local read and a volatile store: async-signal-safe.
    let _ = KVM_RUN_PTR.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own vCPU's kvm_run
            // mapping, which stays mapped while the loop runs, and cleared before
            // the VcpuFd is dropped. Setting immediate_exit makes the current or
            // next KVM_RUN return EINTR.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), Error> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler))
        .map_err(Error::Signal)
}
