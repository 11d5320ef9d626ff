//! Shared helpers of the integration tests: the real `vmm` binary, test guests
//! assembled from tests/guests, and host detection.
#![allow(dead_code)]

pub mod golden;
pub mod uffd;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `vmm` binary under test.
pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.stdin(Stdio::null());
    c
}

/// What /dev/kvm is on this machine: it decides how far a Linux guest can get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// PVM, the software KVM (see docs/TESTING-ON-PVM.md).
    Pvm,
    /// KVM on VMX or SVM.
    Hardware,
}

/// Detects the host kind and says so in the test output.
pub fn host() -> Host {
    let h = if Path::new("/sys/module/kvm_pvm").exists() {
        Host::Pvm
    } else {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        assert!(
            cpuinfo.contains(" vmx") || cpuinfo.contains(" svm") || Path::new("/dev/kvm").exists(),
            "no usable KVM on this host"
        );
        Host::Hardware
    };
    eprintln!("host: {h:?}");
    h
}

/// The PVM host's kernel parameters, as `vmm run` uses them.
pub use vmm::run::PVM_PARAMS;

/// Runs resources/SCRIPT (a cached builder) and returns the path it prints last.
pub fn resource(script: &'static str) -> PathBuf {
    vmm::run::build_resource(script, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// The project's busybox initramfs, built once.
pub fn initramfs() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| resource("build-initramfs.sh")).clone()
}

/// How long a Linux boot may take on `host`.
pub fn linux_timeout(host: Host) -> Duration {
    match host {
        Host::Pvm => Duration::from_secs(900),
        Host::Hardware => Duration::from_secs(120),
    }
}

/// A path in the test's scratch directory, removed if it exists.
pub fn tmp_path(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&p);
    p
}

/// The sum of `group.key` over the lines of the metrics file at `path`
/// (counters report what happened since the line before; a line without the
/// key counts 0).
pub fn metric_sum(path: &Path, group: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .expect("the metrics file")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .map(|v| v[group][key].as_u64().unwrap_or(0))
        .sum()
}

/// One HTTP exchange with curl over the API socket: (status, body).
pub fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    // A socket address holds at most 107 bytes of path: a longer one (a
    // jail deep in a CI checkout's target directory) is reached relative to
    // its directory.
    let sock = match (sock.parent(), sock.file_name()) {
        (Some(dir), Some(name)) if sock.as_os_str().len() > 100 => {
            c.current_dir(dir);
            Path::new(name)
        }
        _ => sock,
    };
    c.args(["-s", "-S", "--max-time", "30", "-X", method])
        .arg("--unix-socket")
        .arg(sock)
        .args([
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
        ]);
    if let Some(b) = body {
        c.args(["-d", b]);
    }
    c.arg(format!("http://localhost{path}"));
    let out = c.output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {path}: no status: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, body.to_string())
}

/// The numbers the counter test guest printed ("VMM-GUEST: count N", N in
/// hex), from complete lines only: output read while the guest runs may end
/// in the middle of a line.
pub fn guest_counts(out: &str) -> Vec<u64> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("VMM-GUEST: count "))
        .filter_map(|n| u64::from_str_radix(n.trim(), 16).ok())
        .collect()
}

/// The body of PUT /snapshot/create for a full snapshot to `snap` and `mem`.
#[allow(dead_code)]
pub fn create_body(snap: &Path, mem: &Path) -> String {
    format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.display(),
        mem.display()
    )
}

/// The body of PUT /snapshot/load from `snap` and `mem` (File backend).
#[allow(dead_code)]
pub fn load_body(snap: &Path, mem: &Path, resume: bool) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": {resume}}}"#,
        snap.display(),
        mem.display()
    )
}

/// PUT /snapshot/load from `snap` and `mem` on the VMM behind `sock`.
#[allow(dead_code)]
pub fn load_snapshot(sock: &Path, snap: &Path, mem: &Path, resume: bool) -> (u16, String) {
    curl(
        sock,
        "PUT",
        "/snapshot/load",
        Some(&load_body(snap, mem, resume)),
    )
}

/// Pauses the VM behind `sock` and snapshots it to `snap` and `mem`,
/// asserting both answers are 204.
#[allow(dead_code)]
pub fn pause_and_snapshot(sock: &Path, snap: &Path, mem: &Path) {
    let paused = curl(sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(paused.0, 204, "{}", paused.1);
    let created = curl(
        sock,
        "PUT",
        "/snapshot/create",
        Some(&create_body(snap, mem)),
    );
    assert_eq!(created, (204, String::new()));
}

/// Starts `cmd` (a vmm) with its API on `NAME.sock` in the target's scratch
/// directory and waits until it listens.
#[allow(dead_code)]
pub fn serve_api(name: &str, mut cmd: Command) -> (Running, PathBuf) {
    let sock = tmp_path(&format!("{name}.sock"));
    cmd.arg("--api-sock").arg(&sock);
    let vm = Running::start(cmd);
    wait_for_socket(&sock, &vm);
    (vm, sock)
}

/// `vmm ARGS --api-sock NAME.sock`, listening.
#[allow(dead_code)]
pub fn api_vmm(name: &str, args: &[&str]) -> (Running, PathBuf) {
    let mut cmd = vmm();
    cmd.args(args);
    serve_api(name, cmd)
}

/// The `fault_message` of a 400 answer (asserting that it is one).
#[allow(dead_code)]
pub fn fault(resp: (u16, String)) -> String {
    assert_eq!(resp.0, 400, "{}", resp.1);
    let v: serde_json::Value = serde_json::from_str(&resp.1).unwrap();
    v["fault_message"].as_str().unwrap().to_string()
}

/// Waits until the VMM's API socket exists.
pub fn wait_for_socket(sock: &Path, vm: &Running) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "no API socket: {}",
            vm.stdout_now()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The project's guest kernel image `name` (vmlinux or bzImage), built once.
pub fn kernel(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| resource("build-kernel.sh")).join(name)
}

/// The kernel command line for `host`: console, reboot on panic, the PVM
/// parameters where needed, then `extra`.
pub fn linux_cmdline(host: Host, extra: &str) -> String {
    let base = "console=ttyS0 reboot=k panic=-1";
    match host {
        Host::Pvm => format!("{base} {PVM_PARAMS} {extra}"),
        Host::Hardware => format!("{base} {extra}"),
    }
}

/// Assembles and links test guest `name` (tests/guests/NAME.S) once per test
/// binary and returns the ELF path. The ELF is linked under a temporary name and
/// renamed into place, and never rebuilt while the binary runs: a VMM another
/// test started may be reading it.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(elf) = built.get(name) {
        return elf.clone();
    }
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    std::fs::create_dir_all(&out_dir).unwrap();
    let obj = out_dir.join(format!("{name}.o"));
    let elf = out_dir.join(format!("{name}.elf"));
    let partial = out_dir.join(format!("{name}.elf.partial"));
    let ok = Command::new("as")
        .arg("--64")
        .arg("-I")
        .arg(&src_dir)
        .arg("-o")
        .arg(&obj)
        .arg(src_dir.join(format!("{name}.S")))
        .status()
        .expect("GNU as (binutils) is needed to build the test guests")
        .success();
    assert!(ok, "assembling {name}.S failed");
    let ok = Command::new("ld")
        .args([
            "-nostdlib",
            "--no-warn-rwx-segments",
            "-Ttext=0x200000",
            "--section-start=.trampoline=0x10000",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&partial)
        .arg(&obj)
        .status()
        .expect("GNU ld is needed to build the test guests")
        .success();
    assert!(ok, "linking {name} failed");
    std::fs::rename(&partial, &elf).unwrap();
    built.insert(name.to_string(), elf.clone());
    elf
}

/// Output and exit status of a finished VMM.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// On PVM, the VMM stopped the guest because KVM's instruction emulator
    /// failed: timing-dependent on this host (docs/TESTING-ON-PVM.md), so a
    /// Linux boot may be retried once, saying so.
    pub fn pvm_emulation_failure(&self, host: Host) -> bool {
        host == Host::Pvm && self.code == Some(3) && self.stderr.contains("emulation failure")
    }

    /// Asserts that the console shows each of `needles`. The failure message
    /// names the missing text first, then the VMM's stderr and the console's
    /// last lines (the whole console is echoed above it in the test output).
    pub fn assert_console(&self, needles: &[&str]) {
        for n in needles {
            if !self.stdout.contains(n) {
                let lines: Vec<&str> = self.stdout.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                panic!(
                    "console lacks {n:?}\nvmm stderr:\n{}\nlast console lines:\n{tail}",
                    self.stderr
                );
            }
        }
    }

    /// The lines the guest printed with the "VMM-GUEST: " prefix, prefix removed.
    pub fn guest_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("VMM-GUEST: "))
            .collect()
    }
}

/// A VMM process whose output is collected in the background.
pub struct Running {
    pub child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

fn collect(
    mut r: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
    echo: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if echo {
                // Visible with --nocapture: the guest console as it happens.
                eprint!("{}", String::from_utf8_lossy(&chunk[..n]));
            }
            buf.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    })
}

impl Running {
    /// Starts `cmd` with piped output.
    pub fn start(mut cmd: Command) -> Running {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("cannot start vmm");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone(), true),
            collect(child.stderr.take().unwrap(), stderr.clone(), true),
        ];
        Running {
            child,
            stdout,
            stderr,
            readers,
            started,
        }
    }

    /// The VMM's process ID.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Types `text` on the guest console (the VMM's stdin, which the command
    /// must have had piped).
    pub fn type_on_console(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        stdin
            .write_all(text.as_bytes())
            .expect("the console takes input");
        stdin.flush().expect("the console takes input");
    }

    /// Console output so far.
    pub fn stdout_now(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Waits until the console shows `needle`, the process exits, or `timeout` passes.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stdout_now().contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                // Everything the VMM printed before it exited, not just what the
                // readers have collected so far.
                self.join_readers();
                return self.stdout_now().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Sends `sig` to the VMM.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `timeout` for the exit; kills the VMM if it does not exit.
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        let out = self.outcome(status, elapsed);
        assert!(
            status.is_some(),
            "vmm did not exit within {timeout:?} and was killed: {out:#?}"
        );
        out
    }

    /// The outcome of a VMM that has exited, or None while it runs.
    fn exited(&mut self) -> Option<Outcome> {
        let status = self.child.try_wait().ok()??;
        Some(self.outcome(Some(status), self.started.elapsed()))
    }

    /// All the output (once the VMM has exited) and `status`.
    fn outcome(&mut self, status: Option<ExitStatus>, elapsed: Duration) -> Outcome {
        use std::os::unix::process::ExitStatusExt;
        self.join_readers();
        Outcome {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stdout: self.stdout_now(),
            stderr: String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned(),
            elapsed,
        }
    }

    /// Waits until the readers have collected everything the VMM wrote.
    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// Whether a Linux boot that ended in `out` is retried: on PVM, once, after an
/// emulation failure, saying so.
fn retry_boot(host: Host, out: &Outcome) -> bool {
    let retry = out.pvm_emulation_failure(host);
    if retry {
        eprintln!(
            "PVM emulation failure, retrying once: {}",
            out.stderr.trim()
        );
    }
    retry
}

/// Runs the command `make` builds to completion; on PVM, once more if the
/// first run ended in an emulation failure.
pub fn run_linux(host: Host, make: impl Fn() -> Command, timeout: Duration) -> Outcome {
    let out = run(make(), timeout);
    if retry_boot(host, &out) {
        return run(make(), timeout);
    }
    out
}

/// Starts the command `make` builds and waits for `milestone` on the console;
/// on PVM, starts it once more if the first run ended in an emulation failure
/// before it. Returns the VMM and whether the milestone was reached.
pub fn start_linux(
    host: Host,
    make: impl Fn() -> Command,
    milestone: &str,
    timeout: Duration,
) -> (Running, bool) {
    let attempt = || {
        let mut vm = Running::start(make());
        let reached = vm.wait_for(milestone, timeout);
        (vm, reached)
    };
    let (mut vm, reached) = attempt();
    if !reached && vm.exited().is_some_and(|out| retry_boot(host, &out)) {
        return attempt();
    }
    (vm, reached)
}

impl Drop for Running {
    /// A test that panics before `finish` leaves no VMM behind (it could hold a
    /// disk lock or a namespace, or spin a core, for the rest of the suite).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the VMM to completion.
pub fn run(mut cmd: Command, timeout: Duration) -> Outcome {
    cmd.stdin(Stdio::null());
    Running::start(cmd).finish(timeout)
}

/// CPU time (user + system) the process has used, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}
