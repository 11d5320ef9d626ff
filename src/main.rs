//! The `vmm` command: parse the command line, run the VM, map the outcome to an
//! exit status. See docs/CLI.md for the exit statuses.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use devices::mmds::Mmds;
use vmm::api;
use vmm::api::controller::Controller;
use vmm::api::http::ServerOptions;
use vmm::cli::Cli;
use vmm::config::LoggerConfig;
use vmm::exit::{ExitSignal, VmExit};
use vmm::metrics::MetricsSink;
use vmm::runtime::{self, EventLoop, RunOptions};
use vmm::vmm::{RestoreOptions, Vmm};
use vmm::{exit_status, logger, terminal, EXIT_USAGE, EXIT_VMM_ERROR};

fn usage_exit(msg: impl std::fmt::Display) -> ! {
    exit_with_error(msg, usage_code(FcExit::Generic))
}

/// Firecracker's exit codes for bad input (FcExitCode), used when the
/// command line holds only Firecracker's flags: a Firecracker client reads
/// them. With any of this VMM's own flags, bad input exits 2.
#[derive(Clone, Copy)]
enum FcExit {
    /// GenericError.
    Generic = 1,
    /// BadConfiguration (an invalid log level).
    BadConfiguration = 152,
    /// ArgParsing.
    ArgParsing = 153,
}

/// The exit code for bad input of kind `kind` (worked out from the command
/// line when an error needs it: nothing is spent on a good start).
fn usage_code(kind: FcExit) -> i32 {
    let args: Vec<String> = std::env::args().collect();
    if firecracker_mode(&args) {
        kind as i32
    } else {
        EXIT_USAGE
    }
}

/// Flags of this VMM's own (not Firecracker's).
const OWN_FLAGS: &[&str] = &[
    "--kernel",
    "--initrd",
    "--cmdline",
    "--cpus",
    "--memory",
    "--rootfs",
    "--disk",
    "--net",
    "--vsock",
    "--log-level",
    "--restore",
    "--restore-mem",
    "--net-override",
    "--vsock-override",
    "--expect",
    "--timeout",
    "--console-log",
    "--report",
];

fn firecracker_mode(args: &[String]) -> bool {
    !args.iter().skip(1).any(|a| {
        let flag = a.split('=').next().unwrap_or("");
        OWN_FLAGS.contains(&flag)
    })
}

/// One line on stderr; in the log file (if any) the same line and
/// Firecracker's exit line, which clients and its test framework read.
fn exit_with_error(msg: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("vmm: error: {msg}");
    logger::to_file(log::Level::Error, format_args!("{msg}"));
    exit_with(code)
}

/// Ends the process with `code`, after Firecracker's exit line.
fn exit_with(code: i32) -> ! {
    if code == 0 {
        log::info!("Firecracker exiting successfully. exit_code=0");
    } else {
        logger::to_file(
            log::Level::Error,
            format_args!("Firecracker exiting with error. exit_code={code}"),
        );
    }
    std::process::exit(code)
}

/// The metadata store as `--mmds-size-limit` (default: the API's largest
/// body, as in Firecracker) and `--metadata` make it; a file that cannot be
/// read or parsed or is too large ends the start with one line.
fn metadata_store(cli: &Cli) -> Result<Mmds, String> {
    let limit = cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size);
    let mut store = Mmds::new(limit);
    let Some(path) = &cli.metadata else {
        return Ok(store);
    };
    // Firecracker's wording for each failure, which its clients look for.
    let text = std::fs::read(path).map_err(|e| {
        format!(
            "Unable to open or read from the mmds content file '{}': {e}; give a JSON file.",
            path.display()
        )
    })?;
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "MMDS error: metadata provided not valid json: {e} (in '{}'); give a JSON file.",
            path.display()
        )
    })?;
    store.put(value).map_err(|e| {
        format!(
            "Populating MMDS from file failed: {e} (--metadata '{}')",
            path.display()
        )
    })?;
    log::info!("Successfully added metadata to mmds from file");
    Ok(store)
}

fn main() {
    let started = Instant::now();
    // `vmm run -- CMD`: a command in a fresh microVM (src/run.rs).
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("run") => vmm::run::main(args[2..].to_vec()),
        // `vmm snapshot rebase ...`: offline snapshot tools (src/snapshot/tool.rs).
        Some("snapshot") => vmm::snapshot::tool::main(args[2..].to_vec()),
        _ => {}
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            if let Some(run) = args.get(1).and_then(|w| vmm::cli::command_suggestion(w)) {
                exit_with_error(
                    format_args!(
                        "'{}' is not a command; did you mean 'vmm {run}'? Run 'vmm --help' for usage.",
                        args[1]
                    ),
                    usage_code(FcExit::ArgParsing),
                );
            }
            // clap's first line names the bad input; the rest is usage.
            exit_with_error(
                vmm::cli::one_line_error(&e, "vmm"),
                usage_code(FcExit::ArgParsing),
            );
        }
    };
    if cli.version {
        print!("{}", vmm::cli::version_text());
        std::process::exit(0);
    }
    if cli.snapshot_version {
        println!("v{}", vmm::snapshot::format_version());
        std::process::exit(0);
    }
    if let Some(path) = &cli.describe_snapshot {
        match vmm::snapshot::describe(path) {
            Ok(text) => {
                print!("{text}");
                std::process::exit(0);
            }
            Err(e) => usage_exit(e),
        }
    }
    // The command line's logger first, so that start-up failures reach its file.
    setup_logger(&cli);
    log::info!(
        "Running Firecracker v{}",
        vmm::api::controller::FIRECRACKER_API_VERSION
    );
    if let Err(e) = vmm::signals::install() {
        fail(format_args!("Cannot install the signal handlers: {e}."));
    }
    let plan = cli.plan().unwrap_or_else(|e| match e {
        // Firecracker's words for a configuration file that cannot be used.
        vmm::cli::Error::ConfigFile { .. } | vmm::cli::Error::ConfigFileRead { .. } => usage_exit(
            format_args!("Configuration for VMM from one single json failed: {e}"),
        ),
        e @ (vmm::cli::Error::NoApiWithoutConfig | vmm::cli::Error::InstanceId(_)) => {
            exit_with_error(e, usage_code(FcExit::ArgParsing))
        }
        e => usage_exit(e),
    });
    if let Some(from_file) = plan.boot.as_ref().and_then(|b| b.logger.as_ref()) {
        apply_file_logger(&cli, from_file);
    }
    // Before any thread starts: each installs its role's filter.
    if !cli.no_seccomp {
        let filters = match &cli.seccomp_filter {
            Some(path) => vmm::seccomp::Filters::from_file(path),
            None => vmm::seccomp::Filters::default_filters(),
        };
        filters
            .and_then(vmm::seccomp::configure)
            .unwrap_or_else(|e| usage_exit(e));
    }
    let mut controller = Controller {
        instance_id: cli.id.clone(),
        metrics: None,
    };
    let metrics_path = cli.metrics_path.clone().or_else(|| {
        plan.boot
            .as_ref()
            .and_then(|c| c.metrics.as_ref())
            .map(|m| m.metrics_path.clone())
    });
    if let Some(path) = metrics_path {
        controller.metrics = Some(MetricsSink::open(&path).unwrap_or_else(|e| usage_exit(e)));
    }

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
    // After the loop blocked the stop signals: the API thread inherits the mask.
    let api = plan.api_sock.as_ref().map(|path| {
        let opts = ServerOptions {
            max_payload: cli.http_api_max_payload_size,
            ..ServerOptions::default()
        };
        log::info!("Listening on API socket ({path:?}).");
        let started = api::start(path, opts).unwrap_or_else(|e| usage_exit(e));
        log::info!("API server started.");
        started
    });
    record_startup_time(&cli, started);
    // After the API started, as Firecracker fills the store (a client sees
    // the API come up, then the failure in the log).
    let metadata = match metadata_store(&cli) {
        Ok(m) => m,
        Err(msg) => {
            if let Some((thread, endpoint)) = api {
                drop(endpoint);
                thread.stop();
            }
            drop(raw);
            usage_exit(msg)
        }
    };
    if let Some((_, endpoint)) = &api {
        el.add(Arc::new(Mutex::new(endpoint.waker())));
    }
    if controller.metrics.is_some() || api.is_some() {
        el.add_periodic_wakeup(METRICS_PERIOD)
            .unwrap_or_else(|e| fail(e));
    }
    let boot = plan.boot;
    let smoke = smoke_mode(&cli, started, &exit);
    let console: Box<dyn std::io::Write + Send> = match &smoke {
        Some(s) => s
            .console(Box::new(std::io::stdout()), cli.console_log.as_ref())
            .unwrap_or_else(|e| usage_exit(e)),
        None => Box::new(std::io::stdout()),
    };
    let mut vmm = Vmm::new(boot.clone().unwrap_or_default(), exit, console, started);
    vmm.set_boot_timer(cli.boot_timer);
    vmm.set_pci(cli.enable_pci);
    vmm.set_vmgenid(!cli.no_vmgenid);
    *vmm.mmds().lock().unwrap_or_else(|e| e.into_inner()) = metadata;
    let started_vm = match &plan.restore {
        Some(r) => {
            let options = RestoreOptions {
                resume: true,
                network_overrides: r.network_overrides.clone(),
                vsock_override: r.vsock_override.clone(),
                ..Default::default()
            };
            let mem = vmm::snapshot::MemorySource::File(r.mem.clone());
            vmm.load_snapshot(&r.snapshot, &mem, &options, &mut el)
        }
        None if boot.is_some() => vmm.start(&mut el),
        None => Ok(()),
    };
    // A configuration file cannot come with --restore (cli.rs refuses it).
    if started_vm.is_ok() && cli.config_file.is_some() {
        log::info!("Successfully started microvm that was configured from one single json");
    }
    if started_vm.is_ok() && (boot.is_some() || plan.restore.is_some()) {
        // The first metrics line, as at InstanceStart over the API.
        vmm::metrics::instance_started(controller.metrics.as_mut(), vmm.devices());
    }
    if let Err(e) = started_vm {
        // The API socket goes away with the process.
        if let Some((thread, endpoint)) = api {
            drop(endpoint);
            thread.stop();
        }
        drop(raw);
        if cli.config_file.is_some() {
            // Firecracker's words for a configuration file's VM that cannot start.
            let code = match &e {
                vmm::vmm::Error::Build(b) if b.is_usage_error() => usage_code(FcExit::Generic),
                _ => EXIT_VMM_ERROR,
            };
            exit_with_error(
                format_args!("Could not Start MicroVM from one single json: {e}"),
                code,
            );
        }
        match e {
            vmm::vmm::Error::Build(e) if e.is_usage_error() => usage_exit(e),
            e @ vmm::vmm::Error::Snapshot(_) => usage_exit(e),
            e => fail(e),
        }
    }
    let result = runtime::run(&mut vmm, &mut el, |vmm, el| {
        if let Some((_, endpoint)) = &api {
            endpoint.serve(|req| controller.handle(vmm, el, req));
        }
        // Periodic lines, from the instance's start on (Firecracker's period).
        if let Some(sink) = &mut controller.metrics {
            if let Err(e) = sink.flush_if_due(vmm.devices()) {
                log::warn!("{e}");
            }
        }
    });
    // No request is served any more: one waiting (or arriving) now is answered
    // "shutting down" as its channel closes, and the API thread can stop.
    if let Some((thread, endpoint)) = api {
        drop(endpoint);
        thread.stop();
    }
    // A last metrics line, with the devices' counters, then every vCPU thread
    // is stopped and joined.
    if let Some(sink) = &mut controller.metrics {
        if let Err(e) = sink.flush(vmm.devices()) {
            log::warn!("{e}");
        }
    }
    vmm.shutdown();
    drop(raw);
    if let Some(smoke) = &smoke {
        let (ended, status) = match &result {
            Ok(exit) => (Ok(exit.clone()), exit_status(exit)),
            Err(e) => (Err(e.to_string()), EXIT_VMM_ERROR),
        };
        if let Ok(VmExit::Crash(report)) = &ended {
            eprintln!("vmm: guest crashed: {}", crash_line(report));
        }
        exit_with(smoke.finish(&ended, status, cli.report.as_ref()));
    }
    match result {
        Ok(exit) => {
            match &exit {
                VmExit::Crash(report) => eprintln!("vmm: guest crashed: {}", crash_line(report)),
                VmExit::Signal(s) => log::info!("stopped by signal {s}"),
                other => log::info!("guest ended: {other:?}"),
            }
            exit_with(exit_status(&exit));
        }
        Err(e) => fail(e),
    }
}

/// The smoke test the flags ask for (`--expect`, `--timeout`,
/// `--console-log`, `--report`), with its timeout armed.
fn smoke_mode(cli: &Cli, started: Instant, exit: &Arc<ExitSignal>) -> Option<vmm::smoke::Smoke> {
    let wanted = !cli.expect.is_empty()
        || cli.timeout.is_some()
        || cli.console_log.is_some()
        || cli.report.is_some();
    if !wanted {
        return None;
    }
    let smoke = vmm::smoke::Smoke::new(&cli.expect, started, exit.clone())
        .unwrap_or_else(|e| usage_exit(e));
    if let Some(t) = cli.timeout {
        if !(t.is_finite() && t > 0.0) {
            usage_exit(format_args!(
                "--timeout '{t}' is not a positive number of seconds."
            ));
        }
        smoke.arm_timeout(Duration::from_secs_f64(t));
    }
    Some(smoke)
}

/// How often the loop looks whether a metrics line is due (lines are
/// written every metrics::PERIOD from the instance's start).
const METRICS_PERIOD: Duration = Duration::from_secs(5);

/// The logger as the command line says: `--level` (or `--log-level`/VMM_LOG),
/// `--log-path`, `--show-level`, `--show-log-origin`.
fn setup_logger(cli: &Cli) {
    // Firecracker's default level for a log file is Info; on stderr this
    // VMM shows warnings and errors unless asked for more.
    let default = if cli.log_path.is_some() {
        "info"
    } else {
        "warn"
    };
    let level = cli
        .level
        .as_deref()
        .or(cli.log_level.as_deref())
        .unwrap_or(default);
    let level = logger::parse_level(level)
        .unwrap_or_else(|e| exit_with_error(e, usage_code(FcExit::BadConfiguration)));
    logger::init(level);
    logger::set_instance_id(&cli.id);
    let config = LoggerConfig {
        log_path: cli.log_path.clone(),
        level: cli.level.clone(),
        show_level: Some(cli.show_level).filter(|b| *b),
        show_log_origin: Some(cli.show_log_origin).filter(|b| *b),
        module: None,
    };
    logger::configure(&config).unwrap_or_else(|e| usage_exit(e));
}

/// A configuration file's `logger` section, for what the command line left
/// unset (its flags win; a log file it opened is not opened again).
fn apply_file_logger(cli: &Cli, from_file: &LoggerConfig) {
    let config = LoggerConfig {
        log_path: from_file
            .log_path
            .clone()
            .filter(|_| cli.log_path.is_none()),
        level: from_file.level.clone().filter(|_| cli.level.is_none()),
        show_level: from_file.show_level.filter(|_| !cli.show_level),
        show_log_origin: from_file.show_log_origin.filter(|_| !cli.show_log_origin),
        module: from_file.module.clone(),
    };
    logger::configure(&config).unwrap_or_else(|e| usage_exit(e));
}

/// Process start to API-ready time, as Firecracker's `api_server` metrics
/// report it (from the jailer's start time when it passes one).
fn record_startup_time(cli: &Cli, started: Instant) {
    let m = &vmm::metrics::METRICS.api_server;
    m.process_startup_time_us
        .set(started.elapsed().as_micros() as u64);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
        let cpu_us = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        let parent = cli.parent_cpu_time_us.unwrap_or(0);
        m.process_startup_time_cpu_us.set(cpu_us + parent);
    }
}

/// A crash report with what the host may have to do about it.
fn crash_line(report: &vmm::exit::CrashReport) -> String {
    match report.host_hint() {
        Some(hint) => format!("{report}; {hint}"),
        None => report.to_string(),
    }
}

fn fail(msg: impl std::fmt::Display) -> ! {
    exit_with_error(msg, EXIT_VMM_ERROR)
}
