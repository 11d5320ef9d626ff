//! `vmm-jailer`: starts the vmm binary in a jail with Firecracker's jailer
//! flags and semantics (docs/JAILER.md). It checks every flag first, then
//! drops inherited descriptors and the environment, builds
//! `<base>/<exec name>/<id>/root` with a copy of the binary and its device
//! nodes, sets resource limits and cgroups, enters a mount namespace whose
//! root is the jail, joins the network namespace, detaches or enters a PID
//! namespace if asked, gives up every privilege and execs the binary with
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
    /// A bad flag.
    #[error("{0}")]
    Usage(String),
    /// A cgroup could not be set up.
    #[error("Cannot set up the cgroups: {0}.")]
    Cgroup(String),
    /// The jail's file system could not be built or entered.
    #[error("Cannot build the jail: {0}.")]
    Jail(String),
    /// A process attribute could not be set.
    #[error("Cannot prepare the process: {0}.")]
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
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            eprintln!(
                "vmm-jailer: {}; run 'vmm-jailer --help' for usage.",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli, start_us, start_cpu_us) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("vmm-jailer: error: {e}");
            ExitCode::from(match e {
                Error::Usage(_) => 2,
                _ => 1,
            })
        }
    }
}

fn run(cli: args::Cli, start_us: u64, start_cpu_us: u64) -> Result<Infallible, Error> {
    let plan = cli.plan()?;
    process::close_inherited_fds()?;
    process::clear_env();
    // What the jail cannot reach later: the binary, the netns file and
    // /dev/null.
    let mut exe = std::fs::File::open(&plan.exec_file).map_err(|e| {
        Error::Usage(format!(
            "--exec-file '{}': {e}; give a readable file.",
            plan.exec_file.display()
        ))
    })?;
    let netns = plan.netns.as_deref().map(process::open_netns).transpose()?;
    let null: Option<OwnedFd> = if plan.daemonize {
        Some(
            std::fs::File::open("/dev/null")
                .map_err(|e| Error::Process(format!("cannot open /dev/null: {e}")))?
                .into(),
        )
    } else {
        None
    };
    let mut jail = jail::Jail::create(&plan)?;
    let prepared =
        process::set_limits(&plan.limits).and_then(|()| cgroup::setup(&plan, std::process::id()));
    let mut cgroups = match prepared {
        Ok(c) => c,
        Err(e) => {
            jail.remove();
            return Err(e);
        }
    };
    let userfaultfd = jail::host_userfaultfd();
    if let Err(e) = jail::enter(&jail.root) {
        cgroups.remove();
        jail.remove();
        return Err(e);
    }
    // From here the host's file system is out of reach.
    jail::furnish(&mut exe, &plan, userfaultfd)?;
    drop(exe);
    if let Some(fd) = &netns {
        process::join_netns(fd)?;
    }
    drop(netns);
    if let Some(null) = &null {
        process::daemonize(null)?;
    }
    drop(null);
    if plan.new_pid_ns {
        process::enter_pid_namespace(
            &std::path::Path::new("/").join(format!("{}.pid", plan.exec_name)),
        )?;
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
