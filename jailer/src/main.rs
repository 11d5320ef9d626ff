//! `vmm-jailer`: starts the vmm binary in a jail with Firecracker's jailer
//! flags and semantics (docs/JAILER.md), in the order Firecracker's jailer
//! works: it checks every flag, drops inherited descriptors and the
//! environment, builds `<base>/<exec name>/<id>/root` and copies the binary
//! in, joins the network namespace, sets the resource limits (after the
//! copy, so that `fsize` cannot cut it short) and the cgroups, enters a
//! mount namespace whose root is the jail, makes its directories and device
//! nodes, detaches and/or enters a PID namespace if asked, writes
//! `<exec name>.pid`, gives up every privilege and execs the binary with
//! `--id`. A failure before the jail is entered removes what was created.

#![deny(clippy::undocumented_unsafe_blocks)]

mod args;
mod cgroup;
mod jail;
mod process;

use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use clap::Parser;

/// Why the jail could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad flag (Firecracker's message).
    #[error("{0}")]
    Usage(String),
    /// A cgroup could not be set up.
    #[error("Cannot set up the cgroups: {0}.")]
    Cgroup(String),
    /// The jail's file system could not be built or entered.
    #[error("{0}")]
    Jail(String),
    /// A process attribute could not be set.
    #[error("{0}")]
    Process(String),
    /// The binary could not be executed.
    #[error("Cannot execute /{name} in the jail: {err}; is it statically linked?")]
    Exec { name: String, err: std::io::Error },
}

fn main() -> ExitCode {
    let start_us = process::clock_us(libc::CLOCK_MONOTONIC);
    let start_cpu_us = process::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    let cli = match args::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's message without its usage part, on one line.
            let text = e.to_string();
            let what = text.split("\n\n").next().unwrap_or("bad arguments");
            let what: Vec<&str> = what.split_whitespace().collect();
            eprintln!(
                "vmm-jailer: error: Failed to parse arguments: {}; run 'vmm-jailer --help' for usage.",
                what.join(" ").trim_start_matches("error: ")
            );
            // Firecracker's jailer exits 1 on every error.
            return ExitCode::from(1);
        }
    };
    match run(cli, start_us, start_cpu_us) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("vmm-jailer: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: args::Cli, start_us: u64, start_cpu_us: u64) -> Result<Infallible, Error> {
    let plan = cli.plan()?;
    process::close_inherited_fds()?;
    process::clear_env();
    let userfaultfd = jail::host_userfaultfd();
    let hierarchies = cgroup::find(&plan)?;
    let mut jail = jail::Jail::create(&plan)?;
    // On the host, in Firecracker's order; the limits come after the copy
    // (a small fsize would cut the binary short) and apply to the jailer's
    // remaining work too (a tiny no-file makes it fail, as Firecracker's).
    let host_side = jail
        .copy_exec(&plan)
        .and_then(|()| plan.netns.as_deref().map_or(Ok(()), process::join_netns))
        .and_then(|()| process::set_limits(&plan.limits));
    if let Err(e) = host_side {
        jail.remove();
        return Err(e);
    }
    let mut cgroups = match cgroup::setup(&plan, &hierarchies, std::process::id()) {
        Ok(c) => c,
        Err(e) => {
            jail.remove();
            return Err(e);
        }
    };
    // /dev/null, which the jail lacks, for --daemonize.
    let null: Result<Option<OwnedFd>, Error> = match plan.daemonize {
        true => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(|f| Some(f.into()))
            .map_err(|e| Error::Process(format!("Failed to open /dev/null: {e}"))),
        false => Ok(None),
    };
    let entered = null.and_then(|null| jail::enter(&jail.root).map(|()| null));
    let null = match entered {
        Ok(null) => null,
        Err(e) => {
            cgroups.remove();
            jail.remove();
            return Err(e);
        }
    };
    // From here the host's file system is out of reach.
    jail::furnish(&plan, userfaultfd)?;
    if let Some(null) = &null {
        process::daemonize(null)?;
    }
    drop(null);
    let pid_file = std::path::Path::new("/").join(format!("{}.pid", plan.exec_name));
    if plan.new_pid_ns {
        process::enter_pid_namespace(&pid_file)?;
    } else {
        jail::write_pid_file(&pid_file, std::process::id())?;
    }
    process::drop_privileges(plan.uid, plan.gid)?;
    let parent_cpu_us =
        process::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(start_cpu_us);
    let err = std::process::Command::new(format!("/{}", plan.exec_name))
        .arg("--id")
        .arg(&plan.id)
        .arg("--start-time-us")
        .arg(start_us.to_string())
        .arg("--start-time-cpu-us")
        .arg(start_cpu_us.to_string())
        .arg("--parent-cpu-time-us")
        .arg(parent_cpu_us.to_string())
        .args(&plan.extra)
        .env_clear()
        .exec();
    Err(Error::Exec {
        name: plan.exec_name,
        err,
    })
}
