//! Seccomp-BPF allow-lists, one per thread role, so that a guest that takes
//! over a thread of the VMM can make only the system calls that thread needs.
//!
//! The roles are Firecracker's: `vmm` (the main thread: event loop, devices,
//! post-boot API actions; installed once the vCPUs run, before the thread
//! touches anything the guest wrote), `api` (the HTTP server thread, from its
//! first instruction) and `vcpu` (each vCPU thread, before its first
//! KVM_RUN). Threads inherit nothing: each installs its own filter.
//!
//! The default filters are `x86_64.json` next to this file, in the rust-vmm
//! `seccompiler` JSON format (docs/SECCOMP.md), compiled at start-up;
//! `--seccomp-filter FILE` replaces them with the user's file in the same
//! format and `--no-seccomp` installs none.
//!
//! A call outside a role's list never runs. The default filters trap it
//! (SECCOMP_RET_TRAP) so that the SIGSYS handler can record it first: a
//! line on stderr and in the log file naming the thread and the system call,
//! `seccomp.num_faults` in a last metrics line. The handler then kills the
//! whole process with SIGSYS, as SECCOMP_RET_KILL_PROCESS would: the kernel
//! runs no handler a thread put in place of ours (the filters allow no
//! `rt_sigaction`), and it kills the process itself if SIGSYS is blocked.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch};

/// The default filters' source, which build.rs compiles into `built`.
#[cfg(test)]
const DEFAULT_JSON: &str = include_str!("x86_64.json");

/// The default filters as BPF instructions (code, jt, jf, k), per role.
mod built {
    include!(concat!(env!("OUT_DIR"), "/seccomp_default.rs"));
}

/// Why filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter file cannot be read.
    #[error("Cannot read the seccomp filter file '{path}': {err}.")]
    Read { path: String, err: std::io::Error },
    /// A compiled (BPF) filter file that does not decode.
    #[error("Seccomp error: Filter deserialization failed: '{path}': {why}; give a file compiled by seccompiler-bin, or a JSON filter (docs/SECCOMP.md).")]
    Deserialize { path: String, why: String },
    /// The filter file does not compile.
    #[error("The seccomp filter file '{path}' is not a valid seccompiler JSON filter: {err}; see docs/SECCOMP.md for the format.")]
    Compile { path: String, err: String },
    /// The filter file lacks a role.
    #[error("The seccomp filter file '{path}' has no '{role}' filter; give one for each of vmm, api and vcpu.")]
    MissingRole { path: String, role: &'static str },
    /// The SIGSYS handler cannot be put in place.
    #[error("Cannot install the SIGSYS handler that records seccomp faults: {0}.")]
    Handler(std::io::Error),
    /// The kernel refused the filter.
    #[error("Cannot install the {role} thread's seccomp filter: {err}; run with --no-seccomp on a kernel without seccomp.")]
    Install { role: &'static str, err: String },
}

/// A thread's role, which names its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The main thread: event loop, devices, post-boot API actions.
    Vmm = 1,
    /// The API server thread.
    Api = 2,
    /// A vCPU thread.
    Vcpu = 3,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Vmm, Role::Api, Role::Vcpu];

    /// The role's key in a filter file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vmm => "vmm",
            Role::Api => "api",
            Role::Vcpu => "vcpu",
        }
    }
}

/// A compiled filter for each role.
pub struct Filters {
    programs: HashMap<&'static str, BpfProgram>,
}

impl Filters {
    /// The built-in allow-lists (compiled when the VMM was built).
    pub fn default_filters() -> Result<Filters, Error> {
        let program = |insns: &[(u16, u8, u8, u32)]| -> BpfProgram {
            insns
                .iter()
                .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
                .collect()
        };
        let programs = HashMap::from([
            ("vmm", program(built::VMM)),
            ("api", program(built::API)),
            ("vcpu", program(built::VCPU)),
        ]);
        Ok(Filters { programs })
    }

    /// The filters of a file with a `vmm`, an `api` and a `vcpu` filter:
    /// seccompiler's JSON (compiled here), or the BPF file Firecracker's
    /// seccompiler-bin writes (what Firecracker's `--seccomp-filter` takes).
    pub fn from_file(path: &Path) -> Result<Filters, Error> {
        let text = std::fs::read(path).map_err(|err| Error::Read {
            path: path.display().to_string(),
            err,
        })?;
        let shown = path.display().to_string();
        let is_json = text
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{');
        if is_json {
            return Self::compile(&text, &shown);
        }
        let map = decode_bpf(&text).map_err(|why| Error::Deserialize {
            path: shown.clone(),
            why,
        })?;
        Self::from_map(map, &shown)
    }

    /// The three roles' programs out of a file's map (others are ignored).
    fn from_map(mut map: HashMap<String, BpfProgram>, path: &str) -> Result<Filters, Error> {
        let mut programs = HashMap::new();
        for role in Role::ALL {
            let program = map.remove(role.name()).ok_or(Error::MissingRole {
                path: path.to_string(),
                role: role.name(),
            })?;
            programs.insert(role.name(), program);
        }
        Ok(Filters { programs })
    }

    fn compile(json: &[u8], path: &str) -> Result<Filters, Error> {
        let map = seccompiler::compile_from_json(json, TargetArch::x86_64).map_err(|e| {
            Error::Compile {
                path: path.to_string(),
                err: e.to_string(),
            }
        })?;
        Self::from_map(map, path)
    }

    /// The role's BPF program.
    pub fn program(&self, role: Role) -> &BpfProgram {
        // Every role is inserted by `compile`.
        &self.programs[role.name()]
    }
}

/// The filters this process's threads install: unset (no filtering: the
/// library used by another program, or `--no-seccomp`) until `configure`.
static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Makes `filters` the ones `apply` installs, and puts the SIGSYS handler in
/// place. Call once, before any thread that should be filtered starts.
pub fn configure(filters: Filters) -> Result<(), Error> {
    install_sigsys_handler().map_err(Error::Handler)?;
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Whether `configure` was called: threads will be filtered.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

thread_local! {
    /// This thread's role once its filter is installed (0: none).
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

/// Installs `role`'s filter on the calling thread, if filtering is
/// configured. Irreversible for the thread.
pub fn apply(role: Role) -> Result<(), Error> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    install(filters.program(role), role)
}

/// Installs `program` on the calling thread as `role`'s filter.
pub fn install(program: &BpfProgram, role: Role) -> Result<(), Error> {
    // The thread's first allocation may attach it to a malloc arena, which
    // can read /sys; do it while that is still allowed.
    std::hint::black_box(Vec::<u8>::with_capacity(64));
    ROLE.with(|r| r.set(role as u8));
    if program.is_empty() {
        return Ok(());
    }
    seccompiler::apply_filter(program).map_err(|e| Error::Install {
        role: role.name(),
        err: e.to_string(),
    })
}

/// Largest compiled filter file read (Firecracker's limit: a few threads'
/// programs of at most 4096 instructions each fit).
const MAX_BPF_FILE: usize = 100_000;

/// Most instructions a BPF program may have (the kernel's BPF_MAXINSNS).
const BPF_MAX_INSNS: u64 = 4096;

/// Decodes seccompiler-bin's output: a map from thread category to BPF
/// program, serialized with bincode's fixed-width little-endian integers
/// (u64 map length; per entry a u64-length string, then a u64 count of
/// 8-byte instructions {u16 code, u8 jt, u8 jf, u32 k}). Every length is
/// checked against what is left of the file, so a hostile file cannot make
/// it allocate more than the file holds.
fn decode_bpf(bytes: &[u8]) -> Result<HashMap<String, BpfProgram>, String> {
    if bytes.len() > MAX_BPF_FILE {
        return Err(format!(
            "the file has {} bytes, more than the {MAX_BPF_FILE} a filter file can need",
            bytes.len()
        ));
    }
    let mut r = Cursor { bytes, at: 0 };
    let entries = r.u64()?;
    if entries > 16 {
        return Err(format!("it announces {entries} filters"));
    }
    let mut map = HashMap::new();
    for _ in 0..entries {
        let len = r.u64()?;
        if len > 64 {
            return Err(format!("a filter name of {len} bytes"));
        }
        let name = std::str::from_utf8(r.take(len as usize)?)
            .map_err(|_| "a filter name is not UTF-8".to_string())?
            .to_string();
        let count = r.u64()?;
        if count == 0 || count > BPF_MAX_INSNS {
            return Err(format!("filter '{name}' has {count} instructions"));
        }
        let program = r
            .take(count as usize * 8)?
            .chunks_exact(8)
            .map(|i| seccompiler::sock_filter {
                code: u16::from_le_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
            })
            .collect();
        map.insert(name, program);
    }
    // Bytes after the last filter are ignored, as Firecracker's reader does.
    Ok(map)
}

/// Reads a byte slice front to back, every length checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| format!("the file ends at byte {} inside a field", self.bytes.len()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// Where the SIGSYS handler writes: the log file and the metrics file, if
/// any (-1: none). Kept by the logger and the metrics sink.
pub(crate) static LOG_FD: AtomicI32 = AtomicI32::new(-1);
pub(crate) static METRICS_FD: AtomicI32 = AtomicI32::new(-1);
/// Faults recorded so far.
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// The log file the fault line also goes to.
pub fn set_log_fd(fd: i32) {
    LOG_FD.store(fd, Ordering::Relaxed);
}

/// The metrics file the fault's metrics line goes to.
pub fn set_metrics_fd(fd: i32) {
    METRICS_FD.store(fd, Ordering::Relaxed);
}

/// The metrics file `fd` closes: no more fault lines to it.
pub fn forget_metrics_fd(fd: i32) {
    let _ = METRICS_FD.compare_exchange(fd, -1, Ordering::Relaxed, Ordering::Relaxed);
}

/// SIGSYS with si_code SYS_SECCOMP: a filter trapped a call.
const SYS_SECCOMP: i32 = 1;

/// Puts the handler that records a trapped call and then kills the
/// process in place (process-wide).
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is valid; the fields set below make it a
    // SA_SIGINFO handler with an empty mask.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = sigsys_handler as *const () as usize;
    // On the thread's own stack, not the small alternate one Rust sets up:
    // the handler renders a whole metrics line.
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: `act` is a valid sigaction whose handler has the signature
    // SA_SIGINFO expects; the old action is not asked for.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Records the trapped call, then kills the process with SIGSYS (the
/// disposition is back to the default, SA_RESETHAND, so the signal raised
/// here is fatal once the handler returns). Only async-signal-safe work:
/// atomics, a stack buffer and raw write(2)s.
extern "C" fn sigsys_handler(_sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // SAFETY: for SIGSYS the siginfo's union holds {call_addr: *void,
    // syscall: int, arch: uint} after the three int header fields and their
    // padding, so the system call number is the i32 at byte 24.
    let nr = unsafe { *info.cast::<u8>().add(24).cast::<i32>() };
    let faults = FAULTS.fetch_add(1, Ordering::Relaxed) + 1;
    crate::metrics::METRICS.seccomp.num_faults.set(faults);
    if code != SYS_SECCOMP {
        // Sent by a process (kill): Firecracker's line, a metrics line, and
        // its exit code for SIGSYS (BadSyscall).
        crate::signals::log_intercepted(libc::SIGSYS, code);
        let metrics = METRICS_FD.load(Ordering::Relaxed);
        if metrics >= 0 {
            crate::metrics::write_last_line(metrics);
        }
        // SAFETY: _exit ends the process at once; it is async-signal-safe.
        unsafe { libc::_exit(148) }
    }
    if code == SYS_SECCOMP {
        let role = match ROLE.with(|r| r.get()) {
            1 => "vmm",
            2 => "api",
            3 => "vcpu",
            _ => "unfiltered",
        };
        let mut line = Line::new();
        line.push(b"vmm: the ");
        line.push(role.as_bytes());
        line.push(b" thread made system call ");
        line.push_num(nr as u64);
        line.push(b", which its seccomp filter does not allow; killing the VMM (SIGSYS)\n");
        raw_write(2, line.bytes());
        let log = LOG_FD.load(Ordering::Relaxed);
        if log >= 0 {
            raw_write(log, line.bytes());
        }
        let metrics = METRICS_FD.load(Ordering::Relaxed);
        if metrics >= 0 {
            crate::metrics::write_last_line(metrics);
        }
    }
    // SAFETY: getpid, gettid and tgkill have no memory arguments; the filters
    // allow tgkill with SIGSYS.
    unsafe {
        let pid = libc::getpid();
        let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSYS);
    }
}

pub(crate) fn raw_write(fd: i32, bytes: &[u8]) {
    // SAFETY: `bytes` is a valid slice for its length; a failed write is ignored.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// `v` in decimal, written into `buf` without allocating (signal handlers).
pub(crate) fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// A fixed line built without allocating.
pub(crate) struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub(crate) fn new() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    pub(crate) fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    pub(crate) fn push_num(&mut self, v: u64) {
        let mut digits = [0u8; 20];
        self.push(decimal(v, &mut digits));
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests;
