//! The `vmm` command: parse the command line, run the VM, map the outcome to an
//! exit status. See the README for the exit statuses.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use vmm::cli::Cli;
use vmm::exit::{ExitSignal, VmExit};
use vmm::runtime::{self, EventLoop, RunOptions};
use vmm::vmm::Vmm;
use vmm::{exit_status, logger, terminal, EXIT_USAGE, EXIT_VMM_ERROR};

fn usage_exit(msg: impl std::fmt::Display) -> ! {
    eprintln!("vmm: error: {msg}");
    std::process::exit(EXIT_USAGE);
}

fn main() {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            // clap's first line names the bad input; the rest is usage.
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.trim_start_matches("error: ");
            usage_exit(format_args!("{first}; run 'vmm --help' for usage."));
        }
    };
    let level = cli.log_level.as_deref().unwrap_or("warn");
    logger::init(level.parse().unwrap_or(log::LevelFilter::Warn));
    let plan = cli.plan().unwrap_or_else(|e| usage_exit(e));
    let Some(vm_config) = plan.boot else {
        usage_exit("--api-sock is not implemented yet; give --kernel.")
    };

    let exit = match ExitSignal::new() {
        Ok(e) => Arc::new(e),
        Err(e) => fail(format_args!("Cannot create an eventfd: {e}.")),
    };
    // Raw mode only while the guest runs; the guard restores the terminal on
    // every return path below.
    let raw = match terminal::RawMode::enable(libc::STDIN_FILENO) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("cannot put the terminal in raw mode: {e}");
            None
        }
    };
    let opts = RunOptions {
        console_in: Some(libc::STDIN_FILENO),
        console_is_terminal: raw.is_some(),
        handle_signals: true,
    };
    let mut el = EventLoop::new(exit.clone(), opts).unwrap_or_else(|e| fail(e));
    let mut vmm = Vmm::new(vm_config, exit, Box::new(std::io::stdout()), started);
    if let Err(e) = vmm.start(&mut el) {
        drop(raw);
        match e {
            vmm::vmm::Error::Build(e) if e.is_usage_error() => usage_exit(e),
            e => fail(e),
        }
    }
    let result = runtime::run(&mut vmm, &mut el, |_, _| {});
    drop(raw);
    match result {
        Ok(exit) => {
            match &exit {
                VmExit::Crash(report) => eprintln!("vmm: guest crashed: {report}"),
                VmExit::Signal(s) => log::info!("stopped by signal {s}"),
                other => log::info!("guest ended: {other:?}"),
            }
            std::process::exit(exit_status(&exit));
        }
        Err(e) => fail(e),
    }
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("vmm: error: {msg}");
    std::process::exit(EXIT_VMM_ERROR);
}
