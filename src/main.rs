//! The `vmm` command: parse the command line, run the VM, map the outcome to an
//! exit status. See the README for the exit statuses.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vmm::config::{self, VmConfig};
use vmm::exit::VmExit;
use vmm::runtime::RunOptions;
use vmm::{builder, exit_status, logger, terminal, EXIT_USAGE, EXIT_VMM_ERROR};

/// Boots a Linux kernel in a KVM microVM with its serial console on this terminal.
/// Quit with Ctrl-A x when the console is a terminal.
#[derive(Parser, Debug)]
#[command(name = "vmm", version)]
struct Cli {
    /// Kernel image: ELF vmlinux (64-bit or PVH entry) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk (initramfs cpio or image).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u64,
    /// Root file system image: attached read-write as the first virtio disk
    /// (/dev/vda), with `root=/dev/vda rw` added unless --cmdline names a root.
    #[arg(long, value_name = "PATH")]
    rootfs: Option<PathBuf>,
    /// Another virtio disk: path=FILE[,readonly=on|off][,id=SERIAL]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A network interface on an existing TAP device: tap=NAME[,mac=..][,mtu=N].
    /// Repeatable.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// Guest memory, with unit K, M or G (a bare number is MiB).
    #[arg(long, default_value = "128M", value_name = "SIZE")]
    memory: String,
    /// Log level: error, warn, info, debug or trace (also VMM_LOG).
    #[arg(long, value_name = "LEVEL", env = "VMM_LOG", default_value = "warn",
          value_parser = clap::builder::PossibleValuesParser::new(["off", "error", "warn", "info", "debug", "trace"]))]
    log_level: String,
}

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
    logger::init(cli.log_level.parse().unwrap_or(log::LevelFilter::Warn));

    let mut vm_config = VmConfig::new(cli.kernel);
    vm_config.initrd = cli.initrd;
    vm_config.cmdline = cli.cmdline;
    vm_config.cpus = config::check_cpus(cli.cpus).unwrap_or_else(|e| usage_exit(e));
    vm_config.memory = config::parse_memory(&cli.memory).unwrap_or_else(|e| usage_exit(e));
    if let Some(rootfs) = cli.rootfs {
        vm_config.disks.push(config::DiskConfig {
            path: rootfs,
            read_only: false,
            id: None,
        });
        vm_config.root_is_first_disk = true;
    }
    for spec in &cli.net {
        vm_config
            .nets
            .push(config::parse_net_spec(spec).unwrap_or_else(|e| usage_exit(e)));
    }
    for spec in &cli.disk {
        vm_config
            .disks
            .push(config::parse_disk_spec(spec).unwrap_or_else(|e| usage_exit(e)));
    }

    let vm = match builder::build(&vm_config, Box::new(std::io::stdout()), started) {
        Ok(vm) => vm,
        Err(e) if e.is_usage_error() => usage_exit(e),
        Err(e) => {
            eprintln!("vmm: error: {e}");
            std::process::exit(EXIT_VMM_ERROR);
        }
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
    let result = vm.run(opts);
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
        Err(e) => {
            eprintln!("vmm: error: {e}");
            std::process::exit(EXIT_VMM_ERROR);
        }
    }
}
