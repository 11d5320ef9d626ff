//! `vmm run -- CMD`: a command in a fresh microVM, as easily as in a
//! container. The guest is the project's default one (its kernel, and its
//! busybox initramfs with the guest agent), booted once per VM shape and
//! saved as a snapshot in the cache; each run restores a clone of it (a few
//! milliseconds), runs CMD through the agent over vsock with stdin, stdout
//! and stderr streamed, and exits with CMD's status. Nothing the command does
//! survives: the root file system is the clone's RAM, thrown away with it, or
//! with `--rootfs` the user's image, attached read-only under an overlay whose
//! writes go to the clone's RAM. `--disk` attaches more images (writable
//! unless `,ro`), `--net` a host TAP. Each combination of guest, disks,
//! network address and VM shape has its own cached snapshot.
//!
//! The VM runs in a child `vmm --restore` process (its console discarded),
//! which dies with this one (PR_SET_PDEATHSIG), so a killed `vmm run` leaves
//! no VM behind.

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use vmm_agent::AgentClient;
pub use vmm_agent::{ExecRequest, ExitStatus};

/// The agent's vsock port in the default guest.
const AGENT_PORT: u32 = 52;
/// Exit status when --timeout ends the run (as timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status when the VM could not be set up or the agent not reached.
pub const EXIT_RUN_ERROR: i32 = 125;
pub use crate::loader::PVM_PARAMS;

/// Runs a command in a fresh microVM and exits with its status.
#[derive(Parser, Debug)]
#[command(name = "vmm run")]
pub struct RunCli {
    /// vCPUs of the VM.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory, with unit K, M or G (a bare number is MiB), as vmm's
    /// own --memory.
    #[arg(long, default_value = "128M")]
    pub memory: String,
    /// Ends the run after SECONDS: the VM is killed, the exit status is 124.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// An environment variable for the command, K=V. Repeatable.
    #[arg(long, value_name = "K=V")]
    pub env: Vec<String>,
    /// The command's working directory in the guest.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// The guest kernel (default: the project's, built and cached by
    /// resources/build-kernel.sh).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The guest's initramfs, which must start vmm-agent on vsock port 52
    /// (default: the project's, built by resources/build-initramfs.sh with the
    /// agent).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The command's root file system: an image (e.g. ext4) attached
    /// read-only; the command's writes go to an overlay in RAM and vanish.
    /// The default initramfs mounts it; the image must not change while a
    /// snapshot of it is cached (its size and modification time are in the
    /// cache key).
    #[arg(long, value_name = "IMAGE")]
    pub rootfs: Option<PathBuf>,
    /// Another disk image for the command, /dev/vdb, /dev/vdc, ... in the
    /// order given (after the --rootfs disk, /dev/vda): writable, and what the
    /// command writes stays in the file; `readonly=on` attaches it
    /// read-only. Repeatable.
    #[arg(long, value_name = "path=FILE[,readonly=on]")]
    pub disk: Vec<String>,
    /// Connects the guest's eth0 to the host TAP device NAME (which must
    /// exist; configure its host side yourself), with the guest address
    /// ADDR/PREFIX (default 172.16.0.2/24) and gateway GW (default the first
    /// address of the subnet, 172.16.0.1 by default; `gw=none` for none).
    #[arg(long, value_name = "tap=NAME[,ip=ADDR/PREFIX][,gw=GW]")]
    pub net: Option<String>,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Why a run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A builder script failed.
    #[error("{script} failed ({status}); run it by hand to see why: bash {path}")]
    Build {
        script: &'static str,
        status: String,
        path: String,
    },
    /// The agent binary is missing.
    #[error("The guest agent '{0}' is missing; build it with: cargo build --release -p vmm-agent")]
    NoAgent(PathBuf),
    /// A child VMM could not be started.
    #[error("Cannot start the VMM '{path}': {err}.")]
    Spawn { path: String, err: std::io::Error },
    /// The template guest did not come up.
    #[error("The default guest did not come up: {0}")]
    Template(String),
    /// The VM's agent cannot be reached.
    #[error("Cannot reach the guest agent: {0}")]
    Agent(String),
    /// Bad flags.
    #[error("{0}")]
    Usage(String),
    /// /dev/kvm cannot be used.
    #[error("Cannot open /dev/kvm: {0}; check that KVM is enabled and that you may use it (the kvm group or root).")]
    Kvm(std::io::Error),
    /// The cache directory cannot be used.
    #[error("Cannot use the cache directory '{path}': {err}; set VMM_CACHE_DIR to a writable directory.")]
    Cache { path: String, err: std::io::Error },
}

/// `vmm run ARGS...` (the arguments after `run`); never returns.
pub fn main(args: Vec<String>) -> ! {
    let cli = match RunCli::try_parse_from(std::iter::once("vmm run".to_string()).chain(args)) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp) {
                let _ = e.print();
                std::process::exit(0);
            }
            // One line, in the style of every other error of vmm.
            eprintln!(
                "vmm run: error: {}",
                crate::cli::one_line_error(&e, "vmm run")
            );
            std::process::exit(crate::EXIT_USAGE);
        }
    };
    match run(&cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vmm run: error: {e}");
            std::process::exit(match e {
                Error::Usage(_) => crate::EXIT_USAGE,
                _ => EXIT_RUN_ERROR,
            });
        }
    }
}

/// The VM shape and guest a run uses.
struct Shape {
    kernel: PathBuf,
    initrd: PathBuf,
    cpus: u32,
    mem_mib: u64,
    /// The root image and the other disks, absolute paths; the root first.
    rootfs: Option<PathBuf>,
    disks: Vec<Disk>,
    net: Option<Net>,
}

impl Shape {
    /// The drives in attachment order, with their ids: `rootfs` (read-only)
    /// then `disk1`, `disk2`...
    fn drives(&self) -> Vec<(String, &Path, bool)> {
        let root = self
            .rootfs
            .iter()
            .map(|p| ("rootfs".to_string(), p.as_path(), true));
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("disk{}", i + 1), d.path.as_path(), d.read_only));
        root.chain(disks).collect()
    }
}

/// An image's absolute path, or a one-line error naming the flag.
fn image(flag: &str, path: &Path) -> Result<PathBuf, Error> {
    let abs = std::fs::canonicalize(path).map_err(|e| {
        Error::Usage(format!(
            "{flag} '{}': {e}; give an existing image file.",
            path.display()
        ))
    })?;
    if !abs.is_file() {
        return Err(Error::Usage(format!(
            "{flag} '{}' is not a regular file; give an image file.",
            path.display()
        )));
    }
    Ok(abs)
}

fn run(cli: &RunCli) -> Result<i32, Error> {
    let mem_mib: u64 = crate::cli::parse_memory(&cli.memory)
        .map_err(|e| Error::Usage(e.to_string()))?
        / crate::config::MIB;
    let env = cli
        .env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| Error::Usage(format!("--env '{kv}' is not K=V.")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let disks = cli
        .disk
        .iter()
        .map(|d| Disk::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    let net = cli.net.as_deref().map(Net::parse).transpose()?;
    let config = SandboxConfig {
        cpus: cli.cpus,
        mem_mib,
        kernel: cli.kernel.clone(),
        initrd: cli.initrd.clone(),
        rootfs: cli.rootfs.clone(),
        disks,
        net,
        vmm: None,
    };
    let timeout = cli
        .timeout
        .map(|s| {
            Duration::try_from_secs_f64(s.max(0.0)).map_err(|_| {
                Error::Usage(format!(
                    "--timeout {s} is not a number of seconds; give e.g. --timeout 30."
                ))
            })
        })
        .transpose()?;
    let mut sandbox = Sandbox::start(&config)?;
    // The timeout is the command's: it starts once the VM is up, so the
    // first run of a shape (which boots and saves the template) has as long
    // as a later one that restores it.
    if let Some(t) = timeout {
        watchdog(sandbox.child.id(), Instant::now() + t);
    }
    let mut req = ExecRequest::new(cli.command.iter().cloned()).with_stdin(true);
    for (k, v) in env {
        req = req.env(k, v);
    }
    if let Some(dir) = &cli.workdir {
        req = req.cwd(dir.clone());
    }
    let status = sandbox.exec(&req, std::io::stdin(), std::io::stdout(), std::io::stderr())?;
    Ok(status.shell_code())
}

/// What a sandbox is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The guest kernel (default: the project's, built and cached).
    pub kernel: Option<PathBuf>,
    /// The guest's initramfs, which must start vmm-agent on vsock port 52
    /// (default: the project's, with the agent next to the vmm binary).
    pub initrd: Option<PathBuf>,
    /// The commands' root file system, attached read-only under an overlay
    /// in RAM (default: the initramfs itself).
    pub rootfs: Option<PathBuf>,
    /// More disks, /dev/vdb... (after the rootfs) or /dev/vda... (without).
    pub disks: Vec<Disk>,
    /// The guest's eth0 on a host TAP.
    pub net: Option<Net>,
    /// The vmm binary that runs the VM (default: this executable when it is
    /// vmm, else a `vmm` next to it or one directory up, else `vmm` on the
    /// PATH).
    pub vmm: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cpus: 1,
            mem_mib: 128,
            kernel: None,
            initrd: None,
            rootfs: None,
            disks: Vec::new(),
            net: None,
            vmm: None,
        }
    }
}

/// A disk image given to a sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
}

impl Disk {
    /// Parses `path=FILE[,readonly=on|off]` (as the main command's
    /// `--disk`), or a bare `FILE`.
    pub fn parse(spec: &str) -> Result<Disk, Error> {
        let bad = |why: String| {
            Error::Usage(format!(
                "--disk '{spec}': {why}; give path=FILE[,readonly=on], e.g. path=data.img."
            ))
        };
        if !spec.contains('=') {
            if spec.is_empty() {
                return Err(bad("no image".into()));
            }
            return Ok(Disk {
                path: PathBuf::from(spec),
                read_only: false,
            });
        }
        let (mut path, mut read_only) = (None, false);
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("readonly", "on")) => read_only = true,
                Some(("readonly", "off")) => read_only = false,
                _ => return Err(bad(format!("'{part}' is not path=FILE or readonly=on|off"))),
            }
        }
        Ok(Disk {
            path: path.ok_or_else(|| bad("no path=".into()))?,
            read_only,
        })
    }
}

/// The guest's network: eth0 on a host TAP with a static address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Net {
    /// The host TAP device.
    pub tap: String,
    /// The guest's address.
    pub addr: std::net::Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Option<std::net::Ipv4Addr>,
}

impl Net {
    /// Parses `tap=NAME[,ip=ADDR/PREFIX][,gw=GW|none]` (`tap=` as the main
    /// command's `--net`), or a bare `NAME`.
    pub fn parse(spec: &str) -> Result<Net, Error> {
        let bad = |why: &str| {
            Error::Usage(format!(
                "--net '{spec}': {why}; give tap=NAME[,ip=ADDR/PREFIX][,gw=GW], e.g. tap=tap0,ip=172.16.0.2/24,gw=172.16.0.1."
            ))
        };
        let mut tap = None;
        let (mut addr, mut prefix) = (std::net::Ipv4Addr::new(172, 16, 0, 2), 24u8);
        let mut gateway = None;
        for part in spec.split(',') {
            match part.split_once('=') {
                None if tap.is_none() => tap = Some(part),
                Some(("tap", name)) => tap = Some(name),
                Some(("ip", v)) => {
                    let (a, p) = v.split_once('/').unwrap_or((v, "24"));
                    addr = a.parse().map_err(|_| bad("ip is not an IPv4 address"))?;
                    prefix = p
                        .parse()
                        .ok()
                        .filter(|p| (1..=30).contains(p))
                        .ok_or_else(|| bad("the prefix length must be 1 to 30"))?;
                }
                Some(("gw", "none")) => gateway = Some(None),
                Some(("gw", v)) => {
                    gateway = Some(Some(
                        v.parse().map_err(|_| bad("gw is not an IPv4 address"))?,
                    ))
                }
                _ => return Err(bad(&format!("'{part}' is not ip=... or gw=..."))),
            }
        }
        let tap = tap.unwrap_or_default();
        if tap.is_empty() || tap.len() > 15 || tap.contains('/') {
            return Err(bad("the TAP name must be 1 to 15 characters"));
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        let gateway = gateway.unwrap_or_else(|| {
            let first = (u32::from(addr) & mask) | 1;
            (first != u32::from(addr)).then(|| first.into())
        });
        Ok(Net {
            tap: tap.to_string(),
            addr,
            prefix,
            gateway,
        })
    }

    /// The kernel's static IP configuration (`ip=`) for eth0.
    fn kernel_param(&self) -> String {
        let mask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)));
        let gw = self.gateway.map(|g| g.to_string()).unwrap_or_default();
        format!("ip={}::{gw}:{mask}::eth0:off", self.addr)
    }
}

/// A fresh microVM to run commands in, for programs that embed vmm as a
/// sandbox: a clone of the default guest's snapshot (booted once per shape
/// and cached), running in a child `vmm` that dies with this program.
/// Each [`Sandbox::exec`] is one command, with its own connection to the
/// guest agent; the commands of one sandbox share its file system. Dropping
/// the sandbox ends the VM and everything in it.
pub struct Sandbox {
    child: Child,
    work: PathBuf,
    uds: PathBuf,
}

impl Sandbox {
    /// Starts a sandbox (the first one of a shape boots and saves the
    /// default guest first).
    pub fn start(config: &SandboxConfig) -> Result<Sandbox, Error> {
        let vmm = config.vmm.clone().unwrap_or_else(vmm_exe);
        // What every run needs, before anything is built: the cause of a
        // failure named, not a builder's or a child's symptom.
        preflight(&vmm, config.initrd.is_none())?;
        // The user's images first: a bad path fails before any build.
        let rootfs = config
            .rootfs
            .as_deref()
            .map(|p| image("--rootfs", p))
            .transpose()?;
        let disks = config
            .disks
            .iter()
            .map(|d| {
                Ok(Disk {
                    path: image("--disk", &d.path)?,
                    read_only: d.read_only,
                })
            })
            .collect::<Result<_, Error>>()?;
        let shape = Shape {
            kernel: match &config.kernel {
                Some(k) => k.clone(),
                None => default_kernel()?,
            },
            initrd: match &config.initrd {
                Some(i) => i.clone(),
                None => agent_initramfs(&vmm)?,
            },
            cpus: config.cpus,
            mem_mib: config.mem_mib,
            rootfs,
            disks,
            net: config.net.clone(),
        };
        let snapshot = template(&vmm, &shape)?;
        let work = tempdir()?;
        let uds = work.join("v.sock");
        let mut cmd = Command::new(&vmm);
        cmd.arg("--restore")
            .arg(snapshot.join("vm.snap"))
            .arg("--restore-mem")
            .arg(snapshot.join("vm.mem"))
            .arg("--vsock-override")
            .arg(&uds)
            .args(["--level", "Error"]);
        if let Some(net) = &shape.net {
            cmd.arg("--net-override").arg(format!("eth0={}", net.tap));
        }
        let child = spawn_vmm(&vmm, &mut cmd, Stdio::null());
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        let mut sandbox = Sandbox { child, work, uds };
        // Ready once the agent answers.
        drop(connect_agent(
            &sandbox.uds,
            &mut sandbox.child,
            Duration::from_secs(30),
        )?);
        Ok(sandbox)
    }

    /// Runs `request` in the sandbox: `stdin` goes to the command if the
    /// request asks for it, its output to `stdout` and `stderr`.
    pub fn exec(
        &mut self,
        request: &ExecRequest,
        stdin: impl Read + Send + 'static,
        stdout: impl Write,
        stderr: impl Write,
    ) -> Result<ExitStatus, Error> {
        let stream = connect_agent(&self.uds, &mut self.child, Duration::from_secs(30))?;
        let client = AgentClient::from_unix(stream).map_err(|e| Error::Agent(e.to_string()))?;
        client
            .exec(request, stdin, stdout, stderr)
            .map_err(|e| Error::Agent(e.to_string()))
    }

    /// Runs `argv` without stdin; returns its stdout, stderr and status.
    pub fn output(&mut self, argv: &[&str]) -> Result<(Vec<u8>, Vec<u8>, ExitStatus), Error> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let req = ExecRequest::new(argv.iter().copied());
        let status = self.exec(&req, std::io::empty(), &mut out, &mut err)?;
        Ok((out, err, status))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Kills the VM and exits 124 at `deadline`.
fn watchdog(pid: u32, deadline: Instant) {
    std::thread::spawn(move || {
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        // SAFETY: kill on the pid of our own child, which we have not waited
        // for (so the pid is not reused meanwhile).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = std::io::stdout().flush();
        eprintln!("vmm run: timed out");
        std::process::exit(EXIT_TIMEOUT);
    });
}

/// Connects to the agent through the VM's vsock socket (Firecracker's
/// `CONNECT` line), retrying until `patience` runs out or the VMM exits.
fn connect_agent(uds: &Path, child: &mut Child, patience: Duration) -> Result<UnixStream, Error> {
    let until = Instant::now() + patience;
    let mut last = String::from("no attempt");
    while Instant::now() < until {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Agent(format!("the VMM exited ({status})")));
        }
        match vsock_connect(uds, AGENT_PORT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(Error::Agent(last))
}

/// Connects to guest port `port` through a vsock device's Unix socket `uds`
/// with Firecracker's `CONNECT <port>` line; returns the stream once the
/// guest has accepted (`OK <host port>` read). The error says why not:
/// "port N: nobody listens" when the VMM closed the connection.
pub fn vsock_connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("{}: {e}", uds.display()))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return Err(format!("port {port}: nobody listens")),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!("port {port}: {}", String::from_utf8_lossy(&line)));
    }
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Starts a child VMM (the binary `vmm`) that dies with this process.
fn spawn_vmm(vmm: &Path, cmd: &mut Command, console: Stdio) -> Result<Child, Error> {
    cmd.stdin(Stdio::null()).stdout(console);
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|err| Error::Spawn {
        path: vmm.display().to_string(),
        err,
    })
}

/// The vmm binary: this executable when it is vmm, else a `vmm` next to it
/// or one directory up (cargo's examples/ and deps/), else `vmm` on the PATH.
fn vmm_exe() -> PathBuf {
    let Ok(me) = std::env::current_exe() else {
        return PathBuf::from("vmm");
    };
    if me.file_name().is_some_and(|n| n == "vmm") {
        return me;
    }
    let dir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    [dir.join("vmm"), dir.join("../vmm")]
        .into_iter()
        .find(|p| p.is_file())
        // One binary, one path: the template cache is keyed by it.
        .map(|p| p.canonicalize().unwrap_or(p))
        .unwrap_or_else(|| PathBuf::from("vmm"))
}

/// Checks what every run needs: /dev/kvm, a writable cache directory, and
/// (for the default guest) the agent next to `vmm`.
fn preflight(vmm: &Path, default_guest: bool) -> Result<(), Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(Error::Kvm)?;
    let cache = cache_root();
    let cache_err = |err| Error::Cache {
        path: cache.display().to_string(),
        err,
    };
    std::fs::create_dir_all(&cache).map_err(cache_err)?;
    let probe = cache.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(cache_err)?;
    let _ = std::fs::remove_file(&probe);
    if default_guest {
        let agent = vmm.with_file_name("vmm-agent");
        if !agent.is_file() {
            return Err(Error::NoAgent(agent));
        }
    }
    Ok(())
}

/// Where run caches its guests and snapshots.
fn cache_root() -> PathBuf {
    match std::env::var_os("VMM_CACHE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/vmm"),
    }
}

/// The repository's resources/ (run is part of the project's tree).
fn resources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("resources")
}

/// Runs the resources/ builder `script` (with `envs` set) and returns the
/// path it prints last: the kernel directory, the initramfs, the rootfs.
pub fn build_resource(script: &'static str, envs: &[(&str, &Path)]) -> Result<PathBuf, Error> {
    let path = resources().join(script);
    let mut cmd = Command::new("bash");
    cmd.arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| Error::Build {
        script,
        status: e.to_string(),
        path: path.display().to_string(),
    })?;
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| l.trim().to_string());
    match last {
        Some(l) if out.status.success() && !l.is_empty() => Ok(PathBuf::from(l)),
        _ => Err(Error::Build {
            script,
            status: out.status.to_string(),
            path: path.display().to_string(),
        }),
    }
}

fn default_kernel() -> Result<PathBuf, Error> {
    Ok(build_resource("build-kernel.sh", &[])?.join("vmlinux"))
}

/// The project's initramfs with the agent that sits next to the vmm binary
/// `vmm` (stripped into the cache).
pub fn agent_initramfs(vmm: &Path) -> Result<PathBuf, Error> {
    let agent = vmm.with_file_name("vmm-agent");
    if !agent.is_file() {
        return Err(Error::NoAgent(agent));
    }
    let cache = cache_root();
    let cache_err = |err| Error::Cache {
        path: cache.display().to_string(),
        err,
    };
    std::fs::create_dir_all(&cache).map_err(cache_err)?;
    let stripped = cache.join(format!("vmm-agent-{}", file_key(&agent)));
    if !stripped.exists() {
        let tmp = stripped.with_extension("tmp");
        let ok = Command::new("strip")
            .arg("-o")
            .arg(&tmp)
            .arg(&agent)
            .status()
            .is_ok_and(|s| s.success());
        let from = if ok { tmp.as_path() } else { agent.as_path() };
        if ok {
            std::fs::rename(from, &stripped).map_err(cache_err)?;
        } else {
            std::fs::copy(from, &stripped).map_err(cache_err)?;
        }
    }
    build_resource("build-initramfs.sh", &[("VMM_AGENT", &stripped)])
}

/// A short key of a file's identity (size and modification time).
fn file_key(p: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Ok(m) = std::fs::metadata(p) {
        (m.len(), m.modified().ok()).hash(&mut h);
    }
    p.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// A fresh private directory for one run's sockets.
fn tempdir() -> Result<PathBuf, Error> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let d = base.join(format!("vmm-run-{}-{i}", std::process::id()));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(Error::Cache {
                    path: d.display().to_string(),
                    err,
                })
            }
        }
    }
    Err(Error::Usage("Cannot create a temporary directory.".into()))
}

/// Changes when what a template boot sets up changes.
const TEMPLATE_VERSION: u32 = 2;

/// The snapshot of the booted default guest for `shape`: taken once (a
/// boot in a child VMM over the API, until the agent answers), then reused.
fn template(vmm: &Path, shape: &Shape) -> Result<PathBuf, Error> {
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            TEMPLATE_VERSION,
            file_key(vmm),
            file_key(&shape.kernel),
            file_key(&shape.initrd),
            shape.cpus,
            shape.mem_mib,
        )
            .hash(&mut h);
        // The root image's identity (its contents are cached in the
        // snapshot's guest); the other disks by path, mode and size: their
        // contents may change between runs, as the guest caches none of them.
        shape.rootfs.as_deref().map(file_key).hash(&mut h);
        for d in &shape.disks {
            (
                &d.path,
                d.read_only,
                std::fs::metadata(&d.path).map(|m| m.len()).ok(),
            )
                .hash(&mut h);
        }
        shape
            .net
            .as_ref()
            .map(|n| (n.addr, n.prefix, n.gateway))
            .hash(&mut h);
        format!("{:016x}", h.finish())
    };
    let root = cache_root();
    let dir = root.join(format!("run-{key}"));
    if dir.join("vm.snap").exists() && dir.join("vm.mem").exists() {
        return Ok(dir);
    }
    let cache_err = |err| Error::Cache {
        path: root.display().to_string(),
        err,
    };
    std::fs::create_dir_all(&root).map_err(cache_err)?;
    // One builder per key at a time; the others wait and then reuse it.
    let lock = std::fs::File::create(root.join(format!(".run-{key}.lock"))).map_err(cache_err)?;
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if dir.join("vm.snap").exists() && dir.join("vm.mem").exists() {
        return Ok(dir);
    }
    let mut what = String::new();
    if let Some(r) = &shape.rootfs {
        what += &format!(", root {}", r.display());
    }
    for d in &shape.disks {
        what += &format!(", disk {}", d.path.display());
    }
    if let Some(n) = &shape.net {
        what += &format!(", eth0 {}/{}", n.addr, n.prefix);
    }
    eprintln!(
        "vmm run: booting the default guest once ({} vCPU, {} MiB; kernel {}, initramfs {}{what}); later runs restore it",
        shape.cpus,
        shape.mem_mib,
        shape.kernel.display(),
        shape.initrd.display()
    );
    let partial = root.join(format!(".run-{key}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(cache_err)?;
    let result = boot_and_save(vmm, shape, &partial);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(cache_err)?;
    Ok(dir)
}

fn boot_and_save(vmm: &Path, shape: &Shape, dir: &Path) -> Result<(), Error> {
    let work = tempdir()?;
    let api = work.join("api.sock");
    let uds = work.join("v.sock");
    // The template's console, kept next to the cache entry when it fails.
    let log_path = dir.with_extension("console.log");
    let console = std::fs::File::create(&log_path).map_err(|err| Error::Cache {
        path: log_path.display().to_string(),
        err,
    })?;
    let mut child = spawn_vmm(
        vmm,
        Command::new(vmm).arg("--api-sock").arg(&api),
        console.into(),
    )?;
    let result = (|| {
        let until = Instant::now() + Duration::from_secs(10);
        while !api.exists() {
            if Instant::now() > until {
                return Err(Error::Template(
                    "the VMM's API socket did not appear".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut args = String::from("console=ttyS0 reboot=k panic=-1 quiet vmm.test=wait");
        if crate::pvm_host() {
            args = format!("{args} {PVM_PARAMS}");
        }
        if shape.rootfs.is_some() {
            args += " vmm.root=/dev/vda";
        }
        if let Some(net) = &shape.net {
            args = format!("{args} {}", net.kernel_param());
        }
        let mut calls = vec![
            (
                "/machine-config".to_string(),
                format!(
                    r#"{{"vcpu_count": {}, "mem_size_mib": {}}}"#,
                    shape.cpus, shape.mem_mib
                ),
            ),
            (
                "/boot-source".into(),
                serde_json::json!({
                    "kernel_image_path": shape.kernel,
                    "initrd_path": shape.initrd,
                    "boot_args": args,
                })
                .to_string(),
            ),
            (
                "/vsock".into(),
                serde_json::json!({"guest_cid": 3, "uds_path": uds}).to_string(),
            ),
            // An entropy device: the guest's RNG is ready (seeded from the
            // host) before the template is saved, so that each clone's new
            // VM generation ID reseeds it at its restore.
            ("/entropy".into(), "{}".into()),
        ];
        for (id, path, read_only) in shape.drives() {
            let body = serde_json::json!({
                "drive_id": id,
                "path_on_host": path,
                "is_root_device": false,
                "is_read_only": read_only,
            });
            calls.push((format!("/drives/{id}"), body.to_string()));
        }
        if let Some(net) = &shape.net {
            let body = serde_json::json!({
                "iface_id": "eth0",
                "host_dev_name": net.tap,
                "guest_mac": GUEST_MAC,
            });
            calls.push(("/network-interfaces/eth0".into(), body.to_string()));
        }
        calls.push((
            "/actions".into(),
            r#"{"action_type": "InstanceStart"}"#.into(),
        ));
        for (path, body) in &calls {
            api_call(&api, "PUT", path, body)?;
        }
        // Booted once the agent answers (about a minute on a PVM host).
        let agent = connect_agent(&uds, &mut child, Duration::from_secs(900)).map_err(|e| {
            Error::Template(format!("{e}; its console is in {}", log_path.display()))
        })?;
        drop(agent);
        api_call(&api, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
        let create = serde_json::json!({
            "snapshot_type": "Full",
            "snapshot_path": dir.join("vm.snap"),
            "mem_file_path": dir.join("vm.mem"),
        });
        api_call(&api, "PUT", "/snapshot/create", &create.to_string())
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&work);
    if result.is_ok() {
        let _ = std::fs::remove_file(&log_path);
    }
    result
}

/// The guest's MAC with `--net` (locally administered).
const GUEST_MAC: &str = "06:00:ac:10:00:02";

/// One request on the VMM's API; Ok on 204.
fn api_call(sock: &Path, method: &str, path: &str, body: &str) -> Result<(), Error> {
    let fail = |why: String| Error::Template(format!("{method} {path}: {why}"));
    let mut s = UnixStream::connect(sock).map_err(|e| fail(e.to_string()))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut status = String::new();
    std::io::BufReader::new(&mut s)
        .read_line(&mut status)
        .map_err(|e| fail(e.to_string()))?;
    if status.split_whitespace().nth(1) == Some("204") {
        Ok(())
    } else {
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        Err(fail(format!("{} {}", status.trim(), rest.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn net_defaults_and_kernel_parameter() {
        let n = Net::parse("tap0").unwrap();
        assert_eq!(
            (n.tap.as_str(), n.addr, n.prefix, n.gateway),
            (
                "tap0",
                Ipv4Addr::new(172, 16, 0, 2),
                24,
                Some(Ipv4Addr::new(172, 16, 0, 1))
            )
        );
        assert_eq!(
            n.kernel_param(),
            "ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off"
        );
        assert_eq!(Net::parse("tap=tap0").unwrap(), Net::parse("tap0").unwrap());
        let n = Net::parse("t,ip=10.1.2.3/30,gw=none").unwrap();
        assert_eq!(n.kernel_param(), "ip=10.1.2.3:::255.255.255.252::eth0:off");
        let n = Net::parse("t,ip=10.0.0.1/8").unwrap();
        assert_eq!(n.gateway, None, "the address is the subnet's first");
        let n = Net::parse("t,gw=192.168.1.9").unwrap();
        assert_eq!(n.gateway, Some(Ipv4Addr::new(192, 168, 1, 9)));
    }

    #[test]
    fn bad_net_and_disk_specs_are_refused_with_the_fix() {
        for bad in [
            "",
            "a-name-longer-than-15",
            "tap0,ip=300.1.1.1",
            "tap0,ip=10.0.0.2/31",
            "tap0,ip=10.0.0.2/x",
            "tap0,gw=nope",
            "tap0,mtu=9000",
            "ip=10.0.0.2/24",
        ] {
            let e = Net::parse(bad).unwrap_err().to_string();
            assert!(e.contains("give tap=NAME[,ip=ADDR/PREFIX]"), "{bad}: {e}");
        }
        for bad in [
            "",
            "path=",
            "readonly=on",
            "path=a,readonly=yes",
            "path=a,ro",
        ] {
            let e = Disk::parse(bad).unwrap_err().to_string();
            assert!(e.contains("give path=FILE[,readonly=on]"), "{bad}: {e}");
        }
        assert_eq!(
            Disk::parse("path=a.img,readonly=on").unwrap(),
            Disk {
                path: "a.img".into(),
                read_only: true
            }
        );
        assert!(!Disk::parse("b.img").unwrap().read_only);
    }
}
