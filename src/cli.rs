//! The command line: Firecracker's process flags plus this VMM's own VM flags
//! (`--kernel`, `--rootfs`, `--disk`, `--net`, ...), turned into a
//! [`VmConfig`]. Errors here name the flag; errors in the configuration itself
//! name its field (config.rs).

use std::path::PathBuf;

use clap::Parser;

use crate::config::{self, Drive, MachineConfig, NetworkInterface, VmConfig, MIB};

/// Errors in what the user typed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Memory size that does not parse.
    #[error("--memory '{0}' is not a size; give a number with a unit, e.g. 512M or 2G.")]
    MemoryUnparsable(String),
    /// Memory size out of range.
    #[error("--memory {0} is out of range; give between 16M and 1024G.")]
    MemoryOutOfRange(String),
    /// vCPU count out of range.
    #[error("--cpus {given} is out of range; give between 1 and {max}.")]
    CpusOutOfRange { given: u64, max: u32 },
    /// A `--disk` spec that does not parse.
    #[error(
        "--disk '{spec}': {reason}; give path=FILE[,readonly=on|off][,id=ID][,serial=SERIAL]."
    )]
    DiskSpec { spec: String, reason: String },
    /// A `--net` spec that does not parse.
    #[error("--net '{spec}': {reason}; give tap=NAME[,id=ID][,mac=02:xx:xx:xx:xx:xx][,mtu=N][,mrg_rxbuf=on|off].")]
    NetSpec { spec: String, reason: String },
    /// A `--vsock` spec that does not parse.
    #[error("--vsock '{spec}': {reason}; give cid=N,uds=PATH (N of 3 or more).")]
    VsockSpec { spec: String, reason: String },
    /// Nothing to run.
    #[error("Nothing to run; give --kernel (and VM options), --config-file, or --api-sock to configure the VM over the API.")]
    NothingToRun,
    /// `--no-api` without a configuration file.
    #[error("--no-api needs --config-file; give the VM's configuration in a file.")]
    NoApiWithoutConfig,
    /// VM flags together with a configuration file.
    #[error("{0} cannot be combined with --config-file; put it in the file instead.")]
    MixedWithConfigFile(&'static str),
    /// A configuration file that cannot be read.
    #[error("--config-file '{path}' cannot be read: {err}; give a readable JSON file.")]
    ConfigFileRead { path: String, err: String },
    /// A configuration file whose contents are wrong.
    #[error("--config-file '{path}': {err}")]
    ConfigFile { path: String, err: config::Error },
    /// VM flags together with --restore.
    #[error("{0} cannot be combined with --restore; the snapshot holds the VM's configuration.")]
    MixedWithRestore(&'static str),
    /// --restore without its memory file.
    #[error("--restore needs --restore-mem; give the memory file taken with the snapshot.")]
    RestoreWithoutMem,
    /// A restore option without --restore.
    #[error("--restore-mem, --net-override and --vsock-override only go with --restore; give the snapshot with --restore.")]
    RestoreOptionAlone,
    /// A bad --net-override.
    #[error("--net-override '{0}' is not IFACE_ID=TAP; give e.g. eth0=tap7.")]
    NetOverride(String),
    /// An instance ID Firecracker would refuse.
    #[error("--id '{0}' is invalid; use 1 to 64 ASCII letters, digits or '-'.")]
    InstanceId(String),
    /// A Firecracker feature this VMM does not have yet.
    #[error("{0} is not supported by this VMM yet; leave it out.")]
    Unsupported(&'static str),
    /// A configuration built from flags that is inconsistent.
    #[error(transparent)]
    Config(#[from] config::Error),
}

/// Boots a Linux kernel in a KVM microVM. Speaks Firecracker's API and configuration file.
#[derive(Parser, Debug, Default)]
#[command(
    name = "vmm",
    disable_version_flag = true,
    after_help = "Commands:\n  vmm run [OPTIONS] -- CMD [ARGS]...  Runs a command in a fresh microVM and exits with its status (vmm run --help)\n  vmm snapshot rebase --base-mem B --diff-mem D  Merges a Diff snapshot's memory file onto its base (vmm snapshot --help)\n\nWithout --api-sock, --no-api or --kernel, the API listens on /run/firecracker.socket, as Firecracker's does."
)]
pub struct Cli {
    // --- Firecracker's process flags -------------------------------------
    /// Path of the Unix socket for the control API (Firecracker's REST API).
    /// Without it, and without --no-api or this VMM's own VM flags (--kernel,
    /// --restore), the API listens on /run/firecracker.socket, as Firecracker's does.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Instance ID: 1 to 64 ASCII letters, digits or '-'.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    pub id: String,
    /// Boots from a Firecracker-shaped JSON configuration file.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Serves no API (needs --config-file).
    #[arg(long)]
    pub no_api: bool,
    /// Writes the log to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off (any case; also
    /// VMM_LOG). Default: Warning on stderr, Info with --log-path.
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,
    /// Prints the level in each log line.
    #[arg(long)]
    pub show_level: bool,
    /// Prints the source file and line in each log line.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Writes metrics (one JSON object per line) to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Logs the time from start to the guest's boot-complete write.
    #[arg(long)]
    pub boot_timer: bool,
    /// Largest API request body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 51200)]
    pub http_api_max_payload_size: usize,
    /// Process start time in microseconds (CLOCK_MONOTONIC), as the jailer passes it.
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// Process start CPU time in microseconds, as the jailer passes it.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// CPU time the parent (jailer) spent, in microseconds.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
    /// Prints the version (first line as Firecracker's, which tools parse) and exits.
    #[arg(long)]
    pub version: bool,
    /// Prints the snapshot data format version this VMM writes and exits.
    #[arg(long)]
    pub snapshot_version: bool,
    /// Prints what the snapshot state file PATH holds (format version,
    /// vCPUs, memory, devices) and exits.
    #[arg(long, value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,
    /// Restores the snapshot state file PATH (with --restore-mem) and resumes it.
    #[arg(long, value_name = "PATH")]
    pub restore: Option<PathBuf>,
    /// The memory file of the snapshot given with --restore.
    #[arg(long, value_name = "PATH")]
    pub restore_mem: Option<PathBuf>,
    /// With --restore: the TAP of this host for an interface of the
    /// snapshot, IFACE_ID=TAP. Repeatable.
    #[arg(long, value_name = "IFACE=TAP")]
    pub net_override: Vec<String>,
    /// With --restore: the Unix socket path of the snapshot's vsock device
    /// (as vsock_override on the API; each clone needs its own).
    #[arg(long, value_name = "PATH")]
    pub vsock_override: Option<PathBuf>,
    /// CI smoke mode: a regular expression the console must show (matched
    /// per line, and against an unfinished line). Repeatable: all must
    /// appear; then the VM is stopped and vmm exits 0.
    #[arg(long, value_name = "REGEX")]
    pub expect: Vec<String>,
    /// CI smoke mode: ends the VM after SECONDS (exit 124 if a pattern had
    /// not appeared by then).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Also writes the guest console to FILE.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// CI smoke mode: writes a JSON report to FILE at exit (verdict, each
    /// pattern and when it matched, start-up timings, how the guest ended).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Installs no seccomp filters (by default every thread runs under its
    /// role's allow-list: docs/SECCOMP.md).
    #[arg(long, conflicts_with = "seccomp_filter")]
    pub no_seccomp: bool,
    /// Installs the seccomp filters of FILE (seccompiler's JSON format, with
    /// a vmm, an api and a vcpu filter: docs/SECCOMP.md) instead of the
    /// built-in ones.
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<PathBuf>,
    /// Fills the metadata store (MMDS) with the JSON in this file at start.
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,
    /// Largest size of the metadata store, in bytes of JSON (default 51200).
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
    /// Puts every virtio device on PCI (virtio-pci with MSI-X) instead of
    /// virtio-mmio, as Firecracker's flag does.
    #[arg(long)]
    pub enable_pci: bool,
    /// No VM generation ID device: clones restored from one snapshot keep
    /// its ID, and a Linux guest does not reseed its random number generator
    /// (their random bytes repeat; for deterministic replays only).
    #[arg(long)]
    pub no_vmgenid: bool,

    // --- This VMM's VM flags ------------------------------------------------
    /// Kernel image: ELF vmlinux (64-bit or PVH entry) or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (initramfs cpio or image).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u64>,
    /// Root file system image: attached read-write as the first virtio disk
    /// (/dev/vda, drive ID "rootfs"), with `root=/dev/vda rw` added unless
    /// --cmdline names a root.
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// Another virtio disk: path=FILE[,readonly=on|off][,id=ID][,serial=SERIAL]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// A network interface on an existing TAP device:
    /// tap=NAME[,id=ID][,mac=..][,mtu=N][,mrg_rxbuf=on|off]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,
    /// A vsock device: cid=N,uds=PATH (Firecracker's PUT /vsock): host
    /// programs connect to PATH and write CONNECT <port>; guest connections
    /// to port P go to PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,
    /// Guest memory, with unit K, M or G (a bare number is MiB), rounded up to whole MiB [default: 128M].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// The same as --level (kept as a hidden alias; also VMM_LOG).
    #[arg(long, value_name = "LEVEL", env = "VMM_LOG", hide = true,
          value_parser = clap::builder::PossibleValuesParser::new(["off", "error", "warn", "info", "debug", "trace"]))]
    pub log_level: Option<String>,
}

/// Where the API listens when no --api-sock is given (Firecracker's default).
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// A clap error as one line in this VMM's style: clap's first paragraph
/// (which names the bad input and any suggestion), then where usage is.
pub fn one_line_error(e: &clap::Error, command: &str) -> String {
    let text = e.to_string();
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let first = first.join(" ");
    let first = first.trim_start_matches("error: ");
    // clap's suggestion for a misspelt flag, in the same line.
    let tip = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("tip: "))
        .map(|t| format!(" ({t})"))
        .unwrap_or_default();
    format!("{first}{tip}; run '{command} --help' for usage.")
}

/// What a misspelt command word probably meant: `vmm rn` is `vmm run`.
pub fn command_suggestion(word: &str) -> Option<&'static str> {
    if word.starts_with('-') || COMMANDS.contains(&word) {
        return None;
    }
    COMMANDS
        .into_iter()
        .find(|c| edit_distance(word, c) <= 2.min(c.len() / 3 + 1) && word.len() <= c.len() + 2)
}

/// The subcommands of `vmm`.
const COMMANDS: [&str; 2] = ["run", "snapshot"];

/// Levenshtein distance, for short words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// What `--version` prints. Tools that drive Firecracker (Kata Containers)
/// read the second word of the first line as the Firecracker version they
/// talk to: here the API level this VMM implements.
pub fn version_text() -> String {
    format!(
        "Firecracker v{}\n\nvmm {}: a microVM monitor that speaks Firecracker v{}'s interfaces\n",
        crate::api::controller::FIRECRACKER_API_VERSION,
        env!("CARGO_PKG_VERSION"),
        crate::api::controller::FIRECRACKER_API_VERSION,
    )
}

/// A snapshot to restore at once (`--restore`).
#[derive(Debug, PartialEq, Eq)]
pub struct RestorePlan {
    /// The state file.
    pub snapshot: PathBuf,
    /// The memory file.
    pub mem: PathBuf,
    /// (interface ID, TAP) overrides.
    pub network_overrides: Vec<(String, String)>,
    /// The vsock socket's path, if overridden.
    pub vsock_override: Option<PathBuf>,
}

/// What the process should do.
#[derive(Debug)]
pub struct Plan {
    /// The VM to boot at once, if any (from the flags or the file).
    pub boot: Option<VmConfig>,
    /// A snapshot to restore and resume at once, if any.
    pub restore: Option<RestorePlan>,
    /// The API socket to serve, if any.
    pub api_sock: Option<PathBuf>,
}

impl Cli {
    /// Whether any of the VM flags was given.
    fn vm_flag(&self) -> Option<&'static str> {
        [
            (self.kernel.is_some(), "--kernel"),
            (self.initrd.is_some(), "--initrd"),
            (self.cmdline.is_some(), "--cmdline"),
            (self.cpus.is_some(), "--cpus"),
            (self.memory.is_some(), "--memory"),
            (self.rootfs.is_some(), "--rootfs"),
            (!self.disk.is_empty(), "--disk"),
            (!self.net.is_empty(), "--net"),
            (self.vsock.is_some(), "--vsock"),
        ]
        .into_iter()
        .find_map(|(given, name)| given.then_some(name))
    }

    /// Checks the flags against each other and builds the plan.
    pub fn plan(&self) -> Result<Plan, Error> {
        check_instance_id(&self.id)?;
        if self.no_api && self.config_file.is_none() {
            return Err(Error::NoApiWithoutConfig);
        }
        // Firecracker serves its API on a default socket unless told not
        // to; this VMM's own ways to run a VM (--kernel, --restore) serve
        // none unless --api-sock asks for one.
        let api_sock = if self.no_api {
            None
        } else if self.api_sock.is_some() || self.kernel.is_some() || self.restore.is_some() {
            self.api_sock.clone()
        } else {
            Some(PathBuf::from(DEFAULT_API_SOCK))
        };
        if let Some(snapshot) = &self.restore {
            if let Some(flag) = self.vm_flag() {
                return Err(Error::MixedWithRestore(flag));
            }
            if self.config_file.is_some() {
                return Err(Error::MixedWithRestore("--config-file"));
            }
            let mem = self.restore_mem.clone().ok_or(Error::RestoreWithoutMem)?;
            let network_overrides = self
                .net_override
                .iter()
                .map(|o| match o.split_once('=') {
                    Some((iface, tap)) if !iface.is_empty() && !tap.is_empty() => {
                        Ok((iface.to_string(), tap.to_string()))
                    }
                    _ => Err(Error::NetOverride(o.clone())),
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Plan {
                boot: None,
                restore: Some(RestorePlan {
                    snapshot: snapshot.clone(),
                    mem,
                    network_overrides,
                    vsock_override: self.vsock_override.clone(),
                }),
                api_sock,
            });
        }
        if self.restore_mem.is_some()
            || !self.net_override.is_empty()
            || self.vsock_override.is_some()
        {
            return Err(Error::RestoreOptionAlone);
        }
        let boot = match &self.config_file {
            Some(path) => {
                if let Some(flag) = self.vm_flag() {
                    return Err(Error::MixedWithConfigFile(flag));
                }
                Some(read_config_file(path, self.enable_pci)?)
            }
            None if self.kernel.is_some() => Some(self.vm_config()?),
            None if self.vm_flag().is_some() || api_sock.is_none() => {
                return Err(Error::NothingToRun)
            }
            None => None,
        };
        Ok(Plan {
            boot,
            restore: None,
            api_sock,
        })
    }

    /// The VM described by the VM flags.
    fn vm_config(&self) -> Result<VmConfig, Error> {
        let kernel = self.kernel.clone().ok_or(Error::NothingToRun)?;
        let mut c = VmConfig::new(kernel);
        if let Some(b) = c.boot_source.as_mut() {
            b.initrd_path = self.initrd.clone();
            b.boot_args = self.cmdline.clone();
        }
        c.machine_config = MachineConfig {
            vcpu_count: check_cpus(self.cpus.unwrap_or(1))?,
            mem_size_mib: match &self.memory {
                Some(m) => parse_memory(m)? / MIB,
                None => 128,
            },
            ..MachineConfig::default()
        };
        if let Some(rootfs) = &self.rootfs {
            let mut d = Drive::new("rootfs", rootfs);
            d.is_root_device = true;
            c.drives.push(d);
        }
        for spec in &self.disk {
            let index = c.drives.len();
            c.drives.push(parse_disk_spec(spec, index)?);
        }
        for (index, spec) in self.net.iter().enumerate() {
            c.network_interfaces.push(parse_net_spec(spec, index)?);
        }
        if let Some(spec) = &self.vsock {
            c.vsock = Some(parse_vsock_spec(spec)?);
        }
        c.pci = self.enable_pci;
        c.no_vmgenid = self.no_vmgenid;
        c.validate()?;
        Ok(c)
    }
}

/// Reads and validates a `--config-file`.
pub fn read_config_file(path: &std::path::Path, pci: bool) -> Result<VmConfig, Error> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFileRead {
        path: shown.clone(),
        err: e.to_string(),
    })?;
    VmConfig::from_json_for(&text, pci).map_err(|err| Error::ConfigFile { path: shown, err })
}

/// Checks an instance ID: 1 to 64 ASCII alphanumerics or '-'.
pub fn check_instance_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InstanceId(id.chars().take(80).collect()))
    }
}

/// Checks a vCPU count against the boot tables' limit.
pub fn check_cpus(cpus: u64) -> Result<u64, Error> {
    let max = crate::arch::x86_64::layout::MAX_CPUS;
    if cpus == 0 || cpus > u64::from(max) {
        return Err(Error::CpusOutOfRange { given: cpus, max });
    }
    Ok(cpus)
}

/// Parses a memory size: a whole number with an optional unit K, M, G or T (also
/// written KiB, MB, ...; all binary). A bare number means MiB. The result is
/// rounded up to whole MiB and checked against the accepted range.
pub fn parse_memory(s: &str) -> Result<u64, Error> {
    let unparsable = || Error::MemoryUnparsable(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| unparsable())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(unparsable()),
    };
    let too_big = || Error::MemoryOutOfRange(s.to_string());
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(too_big)?;
    let bytes = bytes.checked_add(MIB - 1).ok_or_else(too_big)? & !(MIB - 1);
    if !(config::MIN_MEM_MIB..=config::MAX_MEM_MIB).contains(&(bytes / MIB)) {
        return Err(too_big());
    }
    Ok(bytes)
}

fn on_off(value: &str) -> Option<bool> {
    match value {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses `path=FILE[,readonly=on|off][,id=ID][,serial=SERIAL]`; the drive ID
/// defaults to `disk<index>`.
pub fn parse_disk_spec(spec: &str, index: usize) -> Result<Drive, Error> {
    let err = |reason: String| Error::DiskSpec {
        spec: spec.to_string(),
        reason,
    };
    let mut drive = Drive::new(format!("disk{index}"), "");
    let mut path = None;
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| err(format!("'{item}' is not key=value")))?;
        match key {
            "path" if value.is_empty() => return Err(err("the path is empty".into())),
            "path" => path = Some(PathBuf::from(value)),
            "readonly" | "ro" => {
                drive.is_read_only = on_off(value)
                    .ok_or_else(|| err(format!("readonly='{value}' is not on or off")))?
            }
            "id" => {
                config::check_id("id", value).map_err(|e| err(e.to_string()))?;
                drive.drive_id = value.to_string();
            }
            "serial" if value.len() > config::MAX_SERIAL_LEN => {
                return Err(err("the serial is longer than 20 bytes".into()))
            }
            "serial" => drive.serial = Some(value.to_string()),
            other => return Err(err(format!("unknown key '{other}'"))),
        }
    }
    drive.path_on_host = path.ok_or_else(|| err("no path= given".into()))?;
    Ok(drive)
}

/// Parses `tap=NAME[,id=ID][,mac=02:xx:xx:xx:xx:xx][,mtu=N][,mrg_rxbuf=on|off]`;
/// the interface ID defaults to `net<index>`.
pub fn parse_net_spec(spec: &str, index: usize) -> Result<NetworkInterface, Error> {
    let err = |reason: String| Error::NetSpec {
        spec: spec.to_string(),
        reason,
    };
    let mut iface = NetworkInterface::new(format!("net{index}"), "");
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| err(format!("'{item}' is not key=value")))?;
        match key {
            "tap" if value.is_empty() => return Err(err("the TAP name is empty".into())),
            "tap" => iface.host_dev_name = value.to_string(),
            "id" => {
                config::check_id("id", value).map_err(|e| err(e.to_string()))?;
                iface.iface_id = value.to_string();
            }
            "mac" => {
                config::MacAddr::parse(value).map_err(|r| err(format!("mac '{value}' {r}")))?;
                iface.guest_mac = Some(value.to_string());
            }
            "mtu" => {
                let n: u32 = value
                    .parse()
                    .ok()
                    .filter(|n| (68..=65535).contains(n))
                    .ok_or_else(|| err(format!("mtu '{value}' is not between 68 and 65535")))?;
                iface.mtu = Some(n);
            }
            "mrg_rxbuf" => {
                iface.mrg_rxbuf = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(err(format!("mrg_rxbuf '{value}' is not on or off"))),
                }
            }
            other => return Err(err(format!("unknown key '{other}'"))),
        }
    }
    if iface.host_dev_name.is_empty() {
        return Err(err("no tap= given".into()));
    }
    Ok(iface)
}

/// Parses `cid=N,uds=PATH`.
pub fn parse_vsock_spec(spec: &str) -> Result<config::VsockConfig, Error> {
    let err = |reason: String| Error::VsockSpec {
        spec: spec.to_string(),
        reason,
    };
    let (mut cid, mut uds) = (None, None);
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| err(format!("'{item}' is not key=value")))?;
        match key {
            "cid" => {
                let n: u32 =
                    value.parse().ok().filter(|n| *n >= 3).ok_or_else(|| {
                        err(format!("cid '{value}' is not a number of 3 or more"))
                    })?;
                cid = Some(n);
            }
            "uds" if value.is_empty() => return Err(err("the socket path is empty".into())),
            "uds" => uds = Some(PathBuf::from(value)),
            other => return Err(err(format!("unknown key '{other}'"))),
        }
    }
    Ok(config::VsockConfig {
        guest_cid: cid.ok_or_else(|| err("no cid= given".into()))?,
        uds_path: uds.ok_or_else(|| err("no uds= given".into()))?,
        vsock_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_specs_parse_and_bad_ones_name_the_problem() {
        let v = parse_vsock_spec("cid=7,uds=/run/v.sock").unwrap();
        assert_eq!(
            (v.guest_cid, v.uds_path.as_path()),
            (7, std::path::Path::new("/run/v.sock"))
        );
        for (spec, want) in [
            ("cid=2,uds=/v", "cid '2' is not a number of 3 or more"),
            ("cid=x,uds=/v", "cid 'x'"),
            ("uds=/v", "no cid= given"),
            ("cid=3", "no uds= given"),
            ("cid=3,uds=", "the socket path is empty"),
            ("cid=3,uds=/v,port=1", "unknown key 'port'"),
            ("cid", "'cid' is not key=value"),
        ] {
            let e = parse_vsock_spec(spec).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("give cid=N,uds=PATH"),
                "{spec}: {e}"
            );
        }
    }

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmm").chain(args.iter().copied()))
    }

    #[test]
    fn memory_units_parse_and_round_up_to_mib() {
        assert_eq!(parse_memory("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_memory("512").unwrap(), 512 * MIB);
        assert_eq!(parse_memory("2G").unwrap(), 2048 * MIB);
        assert_eq!(parse_memory("1GiB").unwrap(), 1024 * MIB);
        assert_eq!(parse_memory("65536k").unwrap(), 64 * MIB);
        assert_eq!(parse_memory(" 128mb ").unwrap(), 128 * MIB);
        assert_eq!(parse_memory("16385K").unwrap(), 17 * MIB);
    }

    #[test]
    fn memory_zero_small_absurd_or_garbage_is_refused() {
        for s in ["0", "0G", "15M", "2T", "18446744073709551615G"] {
            assert!(
                matches!(parse_memory(s), Err(Error::MemoryOutOfRange(_))),
                "{s}"
            );
        }
        for s in ["", "M", "12X", "-5M", "1.5G", "abc", "5 M B"] {
            assert_eq!(
                parse_memory(s),
                Err(Error::MemoryUnparsable(s.into())),
                "{s}"
            );
        }
    }

    #[test]
    fn disk_specs_parse_with_ids_and_serials() {
        let d = parse_disk_spec("path=/a.img", 2).unwrap();
        assert_eq!((d.drive_id.as_str(), d.is_read_only), ("disk2", false));
        assert_eq!(d.path_on_host, PathBuf::from("/a.img"));
        let d = parse_disk_spec("path=d.img,readonly=on,id=SER1", 0).unwrap();
        assert_eq!(
            (d.drive_id.as_str(), d.effective_serial()),
            ("SER1", "SER1")
        );
        assert!(d.is_read_only);
        let d = parse_disk_spec("path=d.img,id=data,serial=S-9", 0).unwrap();
        assert_eq!(d.effective_serial(), "S-9");
    }

    #[test]
    fn bad_disk_specs_name_the_problem() {
        for (spec, want) in [
            ("", "is not key=value"),
            ("disk.img", "is not key=value"),
            ("path=", "the path is empty"),
            ("readonly=on", "no path= given"),
            ("path=a,readonly=maybe", "not on or off"),
            ("path=a,cache=none", "unknown key 'cache'"),
            (
                "path=a,serial=123456789012345678901",
                "longer than 20 bytes",
            ),
            ("path=a,id=a-b", "id 'a-b' is invalid"),
        ] {
            let e = parse_disk_spec(spec, 0).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("path=FILE"), "{spec:?}: {e}");
        }
    }

    #[test]
    fn net_specs_parse() {
        let n = parse_net_spec("tap=tap0", 1).unwrap();
        assert_eq!(
            (n.iface_id.as_str(), n.host_dev_name.as_str()),
            ("net1", "tap0")
        );
        assert_eq!(n.mac().unwrap(), config::derived_mac("tap0"));
        let n = parse_net_spec(
            "mtu=1400,mac=02:aa:bb:cc:dd:ee,tap=t,mrg_rxbuf=off,id=eth0",
            0,
        )
        .unwrap();
        assert_eq!(n.mac().unwrap().0, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        assert_eq!(
            (n.mtu, n.mrg_rxbuf, n.iface_id.as_str()),
            (Some(1400), false, "eth0")
        );
    }

    #[test]
    fn bad_net_specs_name_the_problem() {
        for (spec, want) in [
            ("tap0", "is not key=value"),
            ("tap=", "the TAP name is empty"),
            ("mac=02:00:00:00:00:01", "no tap= given"),
            ("tap=t,mac=02:00:00:00:00", "not six hex bytes"),
            ("tap=t,mtu=20", "between 68 and 65535"),
            ("tap=t,mrg_rxbuf=yes", "not on or off"),
            ("tap=t,queues=4", "unknown key 'queues'"),
        ] {
            let e = parse_net_spec(spec, 0).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("tap=NAME"), "{spec:?}: {e}");
        }
    }

    #[test]
    fn plans_follow_firecracker_rules() {
        let p = cli(&["--api-sock", "/s"]).unwrap().plan().unwrap();
        assert!(p.boot.is_none() && p.api_sock.is_some());
        let p = cli(&["--kernel", "k", "--cpus", "2", "--memory", "256M"])
            .unwrap()
            .plan()
            .unwrap();
        let m = &p.boot.unwrap().machine_config;
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 256));
        let p = cli(&[
            "--restore",
            "s",
            "--restore-mem",
            "m",
            "--net-override",
            "eth0=tap7",
            "--vsock-override",
            "/run/clone.sock",
        ])
        .unwrap()
        .plan()
        .unwrap();
        assert_eq!(
            p.restore,
            Some(RestorePlan {
                snapshot: "s".into(),
                mem: "m".into(),
                network_overrides: vec![("eth0".into(), "tap7".into())],
                vsock_override: Some("/run/clone.sock".into()),
            })
        );
        for (args, want) in [
            (&["--restore", "s"][..], Error::RestoreWithoutMem),
            (
                &["--restore", "s", "--restore-mem", "m", "--kernel", "k"][..],
                Error::MixedWithRestore("--kernel"),
            ),
            (
                &[
                    "--restore",
                    "s",
                    "--restore-mem",
                    "m",
                    "--net-override",
                    "eth0",
                ][..],
                Error::NetOverride("eth0".into()),
            ),
            (
                &["--restore-mem", "m", "--api-sock", "s"][..],
                Error::RestoreOptionAlone,
            ),
            (&["--memory", "1G"][..], Error::NothingToRun),
            (&["--no-api"][..], Error::NoApiWithoutConfig),
            (
                &["--api-sock", "s", "--id", "a_b"][..],
                Error::InstanceId("a_b".into()),
            ),
            (
                &["--config-file", "f", "--kernel", "k"][..],
                Error::MixedWithConfigFile("--kernel"),
            ),
            (
                &["--cpus", "0", "--kernel", "k"][..],
                Error::CpusOutOfRange {
                    given: 0,
                    max: crate::arch::x86_64::layout::MAX_CPUS,
                },
            ),
        ] {
            assert_eq!(cli(args).unwrap().plan().unwrap_err(), want, "{args:?}");
        }
    }

    #[test]
    fn the_api_listens_on_firecracker_s_default_socket_unless_told_otherwise() {
        let plan = |args: &[&str]| cli(args).unwrap().plan().unwrap().api_sock;
        assert_eq!(plan(&[]), Some(PathBuf::from("/run/firecracker.socket")));
        assert_eq!(
            plan(&["--api-sock", "/tmp/a.sock"]),
            Some("/tmp/a.sock".into())
        );
        assert_eq!(
            plan(&["--kernel", "k"]),
            None,
            "vmm's own flags serve no API"
        );
        assert_eq!(plan(&["--restore", "s", "--restore-mem", "m"]), None);
    }

    #[test]
    fn misspelt_commands_are_suggested() {
        assert_eq!(command_suggestion("rn"), Some("run"));
        assert_eq!(command_suggestion("rnu"), Some("run"));
        assert_eq!(command_suggestion("runn"), Some("run"));
        assert_eq!(command_suggestion("run"), None);
        assert_eq!(command_suggestion("snapshto"), Some("snapshot"));
        assert_eq!(command_suggestion("snapshot"), None);
        assert_eq!(command_suggestion("--run"), None);
        assert_eq!(command_suggestion("restore"), None);
    }

    #[test]
    fn version_first_line_parses_as_firecracker_s() {
        let text = version_text();
        let first = text.lines().next().unwrap();
        let word = first.split(' ').nth(1).unwrap();
        assert_eq!(
            word.trim_start_matches('v'),
            crate::api::controller::FIRECRACKER_API_VERSION
        );
        assert_eq!(first, "Firecracker v1.16.1", "tools parse it with semver");
        assert!(text.contains(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn a_missing_config_file_is_an_error_not_a_panic() {
        let e = cli(&["--no-api", "--config-file", "/nonexistent/vm.json"])
            .unwrap()
            .plan()
            .unwrap_err()
            .to_string();
        assert!(e.contains("'/nonexistent/vm.json' cannot be read"), "{e}");
    }
}
