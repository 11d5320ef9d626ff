//! A vCPU: its initial state, and the thread that runs it in the KVM_RUN loop,
//! dispatching every exit deliberately.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_run, CpuId, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::vcpu_state::{self, VcpuState as VcpuStateData};
use crate::arch::x86_64::layout::{I8042_PORT, SERIAL_PORT};
use crate::arch::x86_64::{cpuid, regs};
use crate::exit::{CrashKind, CrashReport, ExitSignal, VmExit};
use crate::metrics::METRICS;

/// Microseconds from the VMM's start to vCPU 0's first KVM_RUN (0: not yet),
/// for the smoke mode's report.
pub static FIRST_KVM_RUN_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
    /// KVM restored fewer MSRs than a saved state holds.
    #[error(
        "KVM restored only {set} of {want} MSRs of vCPU {cpu}; the first refused is {first:#x}."
    )]
    MsrsRestored {
        cpu: u32,
        set: usize,
        want: usize,
        first: u32,
    },
    /// The MSR list is too long for one KVM call.
    #[error("KVM lists {0} saveable MSRs, more than one call can hold.")]
    TooManyMsrs(usize),
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
    /// When the VMM process started (for the first-KVM_RUN trace).
    pub started: Instant,
    /// Start in the Paused state (a restored VM that is not resumed yet).
    pub start_paused: bool,
}

/// What the VMM thread asks of a vCPU thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Leave KVM_RUN and wait.
    Pause,
    /// Run again.
    Resume,
    /// Save the vCPU's KVM state (answered only while paused), reading the
    /// MSRs KVM lists as saveable.
    SaveState(Arc<Vec<u32>>),
    /// Leave the loop for good.
    Finish,
}

/// A vCPU thread's answer, sent once it is out of KVM_RUN (or back in it).
#[derive(Debug)]
pub enum VcpuResponse {
    /// The vCPU is paused: it runs no guest code until resumed.
    Paused,
    /// The vCPU runs again.
    Resumed,
    /// The saved state, or why it could not be saved.
    Saved(Box<Result<VcpuStateData, String>>),
}

/// A vCPU thread's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// In (or about to enter) KVM_RUN.
    Running,
    /// Waiting for an event; no guest code runs.
    Paused,
    /// Out of the loop; the thread ends.
    Exited,
}

/// The VMM thread's side of a running vCPU: events in, responses out, and a
/// kick (a signal) that makes KVM_RUN return.
pub struct VcpuHandle {
    index: u32,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Index of the vCPU.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Makes the thread leave KVM_RUN (or return from its next entry at once).
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread_t belongs to a thread this handle spawned and
            // has not joined (join takes the JoinHandle out first).
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Saves the state of this (paused) vCPU on its own thread.
    pub fn save_state(&self, msr_indices: Arc<Vec<u32>>) -> Result<VcpuStateData, String> {
        self.discard_stale_responses();
        self.send(VcpuEvent::SaveState(msr_indices));
        match self.response(Duration::from_secs(5)) {
            Some(VcpuResponse::Saved(r)) => *r,
            _ => Err(format!("vCPU {} did not answer within 5 s", self.index)),
        }
    }

    /// Sends `event` and kicks the thread so that it sees it.
    pub fn send(&self, event: VcpuEvent) -> bool {
        let sent = self.events.send(event).is_ok();
        self.kick();
        sent
    }

    /// Waits up to `timeout` for the thread's answer, kicking it again every
    /// 10 ms (a kick that lands before the thread enters KVM_RUN is lost).
    /// `None` if the thread ended or did not answer.
    pub fn response(&self, timeout: Duration) -> Option<VcpuResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.responses.recv_timeout(Duration::from_millis(10)) {
                Ok(r) => return Some(r),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => return None,
                Err(RecvTimeoutError::Timeout) => self.kick(),
            }
        }
    }

    /// Drops answers to earlier events that came after their wait ended.
    pub fn discard_stale_responses(&self) {
        while self.responses.try_recv().is_ok() {}
    }

    /// Asks the thread to finish and joins it, kicking it until it has ended
    /// (a kick that lands before the thread enters KVM_RUN is lost, and a
    /// vCPU waiting for SIPI would never leave KVM_RUN by itself).
    pub fn finish(mut self) {
        self.send(VcpuEvent::Finish);
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the thread of vCPU {} panicked", self.index);
            }
        }
    }
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
}

pub(crate) fn kvm_err(what: &'static str, cpu: u32) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |err| Error::Kvm { what, cpu, err }
}

impl Vcpu {
    /// Wraps vCPU `index`.
    pub fn new(fd: VcpuFd, index: u32) -> Self {
        Vcpu { fd, index }
    }

    /// The CPUID this host gives this vCPU when booted with `base_cpuid`
    /// (set, then read back: some hosts report other than what was set).
    /// Only before the vCPU runs; a restore sets the saved CPUID after it.
    pub fn offered_cpuid(&self, base_cpuid: &CpuId, cpu_count: u32) -> Result<CpuId, Error> {
        self.set_boot_cpuid(base_cpuid, cpu_count)?;
        self.fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read the CPUID", self.index))
    }

    /// Sets `base_cpuid` made consistent with this vCPU's APIC ID and the
    /// VM's topology.
    fn set_boot_cpuid(&self, base_cpuid: &CpuId, cpu_count: u32) -> Result<(), Error> {
        let mut cpuid = base_cpuid.clone();
        cpuid::normalize(cpuid.as_mut_slice(), self.index, cpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(kvm_err("set the CPUID", self.index))
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
        self.set_boot_cpuid(base_cpuid, cpu_count)?;

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

    /// Starts the vCPU's thread, named `fc_vcpu N` as Firecracker names them
    /// (tools find vCPU threads by that prefix), in the Running state.
    pub fn start(self, ctx: VcpuContext) -> Result<VcpuHandle, Error> {
        install_kick_handler()?;
        let cpu = self.index;
        let (event_tx, event_rx) = mpsc::channel();
        let (response_tx, response_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("fc_vcpu {cpu}"))
            .spawn(move || {
                // Before the first KVM_RUN: a guest that takes this thread
                // over can make only the vCPU role's calls.
                if let Err(e) = crate::seccomp::apply(crate::seccomp::Role::Vcpu) {
                    ctx.exit.raise(Err(e.to_string()));
                    return;
                }
                let mut vcpu = self;
                vcpu.run_loop(&ctx, &event_rx, &response_tx);
            })
            .map_err(|err| Error::Spawn { cpu, err })?;
        Ok(VcpuHandle {
            index: cpu,
            events: event_tx,
            responses: response_rx,
            thread: Some(thread),
        })
    }

    /// The vCPU's state machine: Running (KVM_RUN, events checked whenever a
    /// kick interrupts it), Paused (blocked on the event channel: no guest
    /// code, no CPU), Exited.
    fn run_loop(
        &mut self,
        ctx: &VcpuContext,
        events: &Receiver<VcpuEvent>,
        responses: &Sender<VcpuResponse>,
    ) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        let mut first = true;
        // An event sent (and its kick lost) before the pointer was published
        // is seen here, before the first KVM_RUN.
        let initial = if ctx.start_paused {
            VcpuState::Paused
        } else {
            VcpuState::Running
        };
        let mut state = match events.try_recv() {
            Ok(e) => self.handle_event(e, initial, responses),
            Err(TryRecvError::Disconnected) => VcpuState::Exited,
            Err(TryRecvError::Empty) => initial,
        };
        while state != VcpuState::Exited {
            let event = match state {
                VcpuState::Running => {
                    if first && self.index == 0 {
                        let us = ctx.started.elapsed().as_micros() as u64;
                        log::debug!("first KVM_RUN {us} us after VMM start");
                        FIRST_KVM_RUN_US.store(us.max(1), std::sync::atomic::Ordering::Relaxed);
                        first = false;
                    }
                    match self.run_once(ctx) {
                        Step::Continue => continue,
                        Step::Interrupted => match events.try_recv() {
                            Ok(e) => e,
                            Err(TryRecvError::Empty) => continue,
                            Err(TryRecvError::Disconnected) => VcpuEvent::Finish,
                        },
                        Step::Exit(outcome) => {
                            ctx.exit.raise(outcome);
                            VcpuEvent::Finish
                        }
                    }
                }
                VcpuState::Paused => events.recv().unwrap_or(VcpuEvent::Finish),
                VcpuState::Exited => VcpuEvent::Finish,
            };
            state = self.handle_event(event, state, responses);
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Applies one event in `state`; returns the next state.
    fn handle_event(
        &self,
        event: VcpuEvent,
        state: VcpuState,
        responses: &Sender<VcpuResponse>,
    ) -> VcpuState {
        match event {
            VcpuEvent::Pause => {
                let _ = responses.send(VcpuResponse::Paused);
                VcpuState::Paused
            }
            VcpuEvent::Resume => {
                let _ = responses.send(VcpuResponse::Resumed);
                VcpuState::Running
            }
            VcpuEvent::SaveState(msrs) => {
                let saved = if state == VcpuState::Paused {
                    vcpu_state::save(&self.fd, self.index, &msrs).map_err(|e| e.to_string())
                } else {
                    Err(format!(
                        "vCPU {} is not paused; pause the VM first",
                        self.index
                    ))
                };
                let _ = responses.send(VcpuResponse::Saved(Box::new(saved)));
                state
            }
            VcpuEvent::Finish => VcpuState::Exited,
        }
    }

    /// Saves the state of this vCPU, which is not running (not started yet):
    /// on the calling thread.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuStateData, Error> {
        vcpu_state::save(&self.fd, self.index, msr_indices)
    }

    /// Restores a saved state into this (fresh, not yet started) vCPU.
    pub fn restore_state(&self, state: &VcpuStateData) -> Result<(), Error> {
        vcpu_state::restore(&self.fd, state)
    }

    fn run_once(&mut self, ctx: &VcpuContext) -> Step {
        let cpu = self.index;
        let crash = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    count_pio(port, false);
                    if !ctx.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    return Step::Continue;
                }
                VcpuExit::IoOut(port, data) => {
                    count_pio(port, true);
                    if !ctx.pio.write(u64::from(port), data) {
                        log::trace!("vCPU {cpu}: write to unhandled port {port:#x}");
                    }
                    return Step::Continue;
                }
                VcpuExit::MmioRead(addr, data) => {
                    METRICS.vcpu.exit_mmio_read.inc();
                    if !ctx.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    return Step::Continue;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    METRICS.vcpu.exit_mmio_write.inc();
                    if !ctx.mmio.write(addr, data) {
                        log::trace!("vCPU {cpu}: write to unhandled MMIO {addr:#x}");
                    }
                    return Step::Continue;
                }
                VcpuExit::Intr => return Step::Interrupted,
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
                return Step::Interrupted;
            }
            Err(e) => return Step::Exit(Err(format!("KVM_RUN failed on vCPU {cpu}: {e}."))),
        };
        METRICS.vcpu.failures.inc();
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

/// Counts a port-I/O exit, and the serial or i8042 access it is.
fn count_pio(port: u16, write: bool) {
    let m = &METRICS;
    let serial = (SERIAL_PORT..SERIAL_PORT + 8).contains(&port);
    let i8042 = port == I8042_PORT || port == I8042_PORT + 4;
    match (write, serial, i8042) {
        (true, true, _) => m.uart.write_count.inc(),
        (false, true, _) => m.uart.read_count.inc(),
        (true, _, true) => m.i8042.write_count.inc(),
        (false, _, true) => m.i8042.read_count.inc(),
        _ => {}
    }
    if write {
        m.vcpu.exit_io_out.inc();
    } else {
        m.vcpu.exit_io_in.inc();
    }
}

enum Step {
    Continue,
    /// A kick (or a signal) made KVM_RUN return: look for events.
    Interrupted,
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
