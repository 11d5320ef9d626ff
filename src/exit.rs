//! How a VM ends, and the one-shot signal through which vCPUs, devices and the
//! host (signals, the embedder) report that it should end.

use std::sync::Mutex;

use devices::{ExitRequester, GuestExitRequest};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a guest crashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// The vCPU hit a triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not continue, e.g. its instruction emulator failed.
    InternalError {
        /// KVM's suberror (1 = emulation failure).
        suberror: u32,
    },
    /// VM entry failed with a hardware reason code.
    EntryFailure(u64),
    /// The guest reported a crash through a system event.
    GuestReported,
}

/// A crashed vCPU's state, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrashReport {
    /// What happened.
    pub kind: CrashKind,
    /// Index of the vCPU.
    pub cpu: u32,
    /// Instruction pointer, if it could be read.
    pub rip: Option<u64>,
    /// Bytes at the instruction pointer, if they could be read.
    pub instruction: Vec<u8>,
}

impl std::fmt::Display for CrashReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            CrashKind::TripleFault => write!(f, "triple fault")?,
            CrashKind::InternalError { suberror: 1 } => {
                write!(f, "KVM internal error: instruction emulation failure")?
            }
            CrashKind::InternalError { suberror } => {
                write!(f, "KVM internal error (suberror {suberror})")?
            }
            CrashKind::EntryFailure(r) => write!(f, "VM entry failure (hardware reason {r:#x})")?,
            CrashKind::GuestReported => write!(f, "crash reported by the guest")?,
        }
        write!(f, " on vCPU {}", self.cpu)?;
        match self.rip {
            Some(rip) => write!(f, ", RIP {rip:#x}")?,
            None => write!(f, ", RIP unknown")?,
        }
        match self.instruction_hex() {
            Some(hex) => write!(f, ", instruction bytes {hex}"),
            None => write!(f, ", instruction bytes unavailable"),
        }
    }
}

impl CrashReport {
    /// The instruction bytes as hex pairs ("0f 01 ca"), if any were read.
    fn instruction_hex(&self) -> Option<String> {
        let hex: Vec<String> = self
            .instruction
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (!hex.is_empty()).then(|| hex.join(" "))
    }

    /// What the host may have to do with it: on PVM (a software KVM, see
    /// docs/TESTING-ON-PVM.md) an emulation failure is the host's emulator
    /// lacking an instruction, which kernel parameters avoid.
    pub fn host_hint(&self) -> Option<&'static str> {
        let emulation = self.kind == CrashKind::InternalError { suberror: 1 };
        (emulation && crate::pvm_host()).then_some(
            "this host's /dev/kvm is PVM, a software KVM whose instruction emulator lacks some instructions; \
             boot the guest with the kernel parameters in docs/TESTING-ON-PVM.md (noxsave nofsgsbase clearcpuid=...), \
             which vmm's default command line has and a command line given is used without",
        )
    }

    /// The report as data (smoke mode's `guest_exit`).
    pub fn to_json(&self) -> serde_json::Value {
        let kind = match &self.kind {
            CrashKind::TripleFault => "triple_fault".to_string(),
            CrashKind::InternalError { suberror: 1 } => "emulation_failure".to_string(),
            CrashKind::InternalError { suberror } => format!("internal_error_{suberror}"),
            CrashKind::EntryFailure(_) => "entry_failure".to_string(),
            CrashKind::GuestReported => "guest_reported".to_string(),
        };
        serde_json::json!({
            "kind": "crash",
            "crash": kind,
            "vcpu": self.cpu,
            "rip": self.rip.map(|r| format!("{r:#x}")),
            "instruction": self.instruction_hex(),
            "message": self.to_string(),
        })
    }
}

impl VmExit {
    /// The outcome as data: `{"kind": "power_off" | "reset" | "signal" |
    /// "stopped" | "crash", ...}` (smoke mode's report).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            VmExit::PowerOff => serde_json::json!({"kind": "power_off"}),
            VmExit::Reset => serde_json::json!({"kind": "reset"}),
            VmExit::Stopped => serde_json::json!({"kind": "stopped"}),
            VmExit::Signal(s) => serde_json::json!({"kind": "signal", "signal": s}),
            VmExit::Crash(r) => r.to_json(),
        }
    }
}

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (the VMM does not restart it).
    Reset,
    /// The guest crashed.
    Crash(CrashReport),
    /// The host sent this signal (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
    /// The embedder or the console escape asked the VM to stop.
    Stopped,
}

/// The first reported outcome wins; later reports are logged and dropped.
pub struct ExitSignal {
    outcome: Mutex<Option<Result<VmExit, String>>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            outcome: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Reports an outcome; an `Err` is a VMM failure described in one sentence.
    pub fn raise(&self, outcome: Result<VmExit, String>) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot wake the event loop to stop the VM: {e}");
            }
        } else {
            log::debug!("VM already ending; ignoring {outcome:?}");
        }
    }

    /// Whether an outcome was reported.
    pub fn is_raised(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The reported outcome, if any.
    pub fn outcome(&self) -> Option<Result<VmExit, String>> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable once an outcome is reported.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl ExitRequester for ExitSignal {
    fn request_exit(&self, reason: GuestExitRequest) {
        self.raise(Ok(match reason {
            GuestExitRequest::PowerOff => VmExit::PowerOff,
            GuestExitRequest::Reset => {
                crate::metrics::METRICS.i8042.reset_count.inc();
                VmExit::Reset
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_is_reported_as_data_with_the_rip_in_hex() {
        let r = CrashReport {
            kind: CrashKind::InternalError { suberror: 1 },
            cpu: 1,
            rip: Some(0xffff_ffff_8100_0000),
            instruction: vec![0x0f, 0xae],
        };
        let v = VmExit::Crash(r.clone()).to_json();
        assert_eq!(v["kind"], "crash");
        assert_eq!(v["crash"], "emulation_failure");
        assert_eq!(v["vcpu"], 1);
        assert_eq!(v["rip"], "0xffffffff81000000");
        assert_eq!(v["instruction"], "0f ae");
        assert_eq!(VmExit::PowerOff.to_json()["kind"], "power_off");
        let on_pvm = crate::pvm_host();
        assert_eq!(
            r.host_hint().is_some(),
            on_pvm,
            "the hint names PVM only on PVM"
        );
        let triple = CrashReport {
            kind: CrashKind::TripleFault,
            ..r
        };
        assert_eq!(triple.host_hint(), None);
    }

    #[test]
    fn first_outcome_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.is_raised());
        s.request_exit(GuestExitRequest::Reset);
        s.raise(Ok(VmExit::PowerOff));
        assert_eq!(s.outcome(), Some(Ok(VmExit::Reset)));
        assert_eq!(s.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn crash_report_names_reason_rip_and_bytes() {
        let r = CrashReport {
            kind: CrashKind::InternalError { suberror: 1 },
            cpu: 1,
            rip: Some(0xffff_ffff_8100_0000),
            instruction: vec![0x0f, 0x01, 0xca],
        };
        assert_eq!(
            r.to_string(),
            "KVM internal error: instruction emulation failure on vCPU 1, RIP 0xffffffff81000000, instruction bytes 0f 01 ca"
        );
    }
}
