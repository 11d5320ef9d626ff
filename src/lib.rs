//! `vmm`: a KVM microVM monitor.
//!
//! The library is what the `vmm` binary runs, and what programs embed:
//!
//! ```no_run
//! use vmm::{builder, config::VmConfig, runtime::RunOptions};
//! let config = VmConfig::new("vmlinux");
//! let exit = std::sync::Arc::new(vmm::exit::ExitSignal::new()?);
//! let vm = builder::build(&config, Box::new(std::io::stdout()), exit, std::time::Instant::now())?;
//! let stop = vm.stop_handle(); // may be sent to another thread
//! let exit = vm.run(RunOptions::default())?;
//! println!("guest ended: {exit:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Data flows one way: [`config::VmConfig`] → [`builder::build`] → [`builder::MicroVm::run`]
//! → [`exit::VmExit`].

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod allocator;
pub mod api;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod device_kinds;
pub mod device_manager;
pub mod exit;
pub mod loader;
pub mod logger;
pub mod metrics;
pub mod pci;
pub mod run;
pub mod runtime;
pub mod seccomp;
pub mod serial;
pub mod signals;
pub mod smoke;
pub mod snapshot;
pub mod terminal;
pub mod vmm;
pub mod vstate;

/// Process exit status: the guest powered off or rebooted, or the user quit.
pub const EXIT_OK: i32 = 0;
/// Process exit status: the VMM itself failed (KVM or host error).
pub const EXIT_VMM_ERROR: i32 = 1;
/// Process exit status: bad command-line input.
pub const EXIT_USAGE: i32 = 2;
/// Process exit status: the guest crashed (triple fault, KVM internal error).
pub const EXIT_GUEST_CRASH: i32 = 3;
/// Process exit status base for a stop by signal: 128 + the signal number
/// (Firecracker's own codes for the signals it defines: [`signals::exit_code`]).
pub const EXIT_SIGNAL_BASE: i32 = 128;

/// Whether this host's /dev/kvm is PVM, a software KVM whose instruction
/// emulator guests must be steered around (docs/TESTING-ON-PVM.md).
pub fn pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The process exit status for a VM outcome.
pub fn exit_status(exit: &exit::VmExit) -> i32 {
    match exit {
        exit::VmExit::PowerOff | exit::VmExit::Reset | exit::VmExit::Stopped => EXIT_OK,
        exit::VmExit::Crash(_) => EXIT_GUEST_CRASH,
        exit::VmExit::Signal(s) => signals::exit_code(*s).unwrap_or(EXIT_SIGNAL_BASE + s),
    }
}
