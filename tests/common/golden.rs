//! A booted Linux guest, saved once for the whole suite and restored by the
//! tests that only need a guest in user space (a boot takes about a minute on
//! PVM; a restore, milliseconds).
//!
//! The guest: the project's kernel and busybox initramfs with the guest agent
//! (`vmm-agent` on vsock port 52), 1 vCPU, 128 MiB, a read-only drive `data`
//! with a known first sector, `eth0` with a static address on a TAP (and the
//! metadata service, version 2, at 169.254.169.254 through it), an entropy
//! device, a balloon (empty, statistics every second), and a vsock device
//! (CID 3). It is saved at the initramfs shell, which reads
//! commands from the console: a clone is given work by typing on its stdin,
//! or through the agent over its vsock socket ([`vsock_path`]). The
//! snapshot is built under a lock in the target's scratch directory, keyed by
//! the vmm binary, the kernel and the initramfs, so every test binary of a run
//! shares it.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::{
    curl, kernel, linux_cmdline, linux_timeout, pause_and_snapshot, wait_for_socket, Host, Running,
};

/// The guest's address on eth0.
pub const GUEST_IP: &str = "172.31.250.2";
/// The address of the TAP on the host side.
pub const HOST_IP: &str = "172.31.250.1";
/// The guest's MAC on eth0.
pub const GUEST_MAC: &str = "06:00:ac:1f:fa:02";
/// Bytes of the `data` drive.
const DISK_BYTES: usize = 1 << 20;
/// The guest agent's vsock port.
pub const AGENT_PORT: u32 = 52;

/// Builds the guest agent next to the vmm binary under test (cargo build -p
/// vmm-agent, the suite's own profile), once.
pub fn agent_binary() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "vmm-agent"]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let st = build.status().expect("cargo runs");
        assert!(st.success(), "cargo build -p vmm-agent failed");
    });
}

/// The project's initramfs with the guest agent in it, as `vmm run` builds it.
pub fn agent_initramfs() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        agent_binary();
        vmm::run::agent_initramfs(Path::new(env!("CARGO_BIN_EXE_vmm")))
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .clone()
}

/// The vsock socket of clone `name` (each clone's own, by `vsock_override`).
pub fn vsock_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-v.sock"))
}

/// A network namespace the test creates and removes on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace `vmm-TAG-PID` with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("vmm-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ns = Netns { name };
        let st = Command::new("ip")
            .args(["netns", "add", &ns.name])
            .status()
            .expect("ip (iproute2) runs");
        assert!(st.success(), "ip netns add {} failed", ns.name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` inside the namespace; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .status()
            .expect("ip (iproute2) runs");
        assert!(st.success(), "ip -n {} {args:?} failed", self.name);
    }

    /// A TAP device `name`, up, with `addr` (CIDR) if given.
    pub fn add_tap(&self, name: &str, addr: Option<&str>) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        if let Some(a) = addr {
            self.ip(&["addr", "add", a, "dev", name]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Pings the golden guest from the namespace `count` times, `interval`
    /// seconds apart (60 s at most): the wall time and ping's output.
    pub fn ping_guest(&self, count: u32, interval: &str) -> (Duration, String) {
        let t = std::time::Instant::now();
        let out = self
            .command("ping")
            .args([
                "-c",
                &count.to_string(),
                "-w",
                "60",
                "-i",
                interval,
                GUEST_IP,
            ])
            .output()
            .expect("ping (iputils-ping) runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (t.elapsed(), text)
    }

    /// The vmm binary inside the namespace, with its console on a pipe the
    /// test types into.
    pub fn vmm(&self) -> Command {
        let mut c = self.command(env!("CARGO_BIN_EXE_vmm"));
        c.stdin(Stdio::piped());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The saved guest.
#[derive(Clone, Debug)]
pub struct Golden {
    /// The state file.
    pub snap: PathBuf,
    /// The memory file.
    pub mem: PathBuf,
    /// The read-only `data` drive.
    pub disk: PathBuf,
}

/// Byte i of the `data` drive.
pub fn disk_byte(i: usize) -> u8 {
    (i * 13 % 241) as u8
}

/// The golden snapshot, built on first use (by whichever test binary comes
/// first) and shared after.
pub fn golden(host: Host) -> Golden {
    static ONCE: OnceLock<Golden> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    let _g = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    ONCE.get_or_init(|| build_once(host)).clone()
}

fn key() -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in [
        PathBuf::from(env!("CARGO_BIN_EXE_vmm")),
        kernel("vmlinux"),
        agent_initramfs(),
    ] {
        let m = std::fs::metadata(&p).expect("the file exists");
        (p, m.len(), m.modified().ok()).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn build_once(host: Host) -> Golden {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    // Across test binaries (cargo may run them one after another, or a
    // developer several at once): one builder at a time.
    let lock = std::fs::File::create(root.join("golden.lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let dir = root.join(format!("golden-{}", key()));
    let g = Golden {
        snap: dir.join("vm.snap"),
        mem: dir.join("vm.mem"),
        disk: dir.join("data.img"),
    };
    if dir.join("done").exists() {
        eprintln!("golden snapshot: reusing {}", dir.display());
        return g;
    }
    // Snapshots of earlier builds (128 MiB each) go.
    for old in std::fs::read_dir(root).unwrap().flatten() {
        if old.file_name().to_string_lossy().starts_with("golden-") {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    std::fs::create_dir_all(&dir).unwrap();
    let bytes: Vec<u8> = (0..DISK_BYTES).map(disk_byte).collect();
    std::fs::write(&g.disk, bytes).unwrap();
    let t = std::time::Instant::now();
    for attempt in 0..2 {
        match boot_and_save(host, &dir, &g) {
            Ok(()) => break,
            Err(out) if attempt == 0 && out.pvm_emulation_failure(host) => {
                eprintln!(
                    "PVM emulation failure, booting once more: {}",
                    out.stderr.trim()
                );
            }
            Err(out) => panic!("the golden guest did not reach its shell: {out:#?}"),
        }
    }
    std::fs::write(dir.join("done"), b"").unwrap();
    eprintln!("golden snapshot: booted and saved in {:?}", t.elapsed());
    g
}

/// Boots the golden guest in a namespace of its own and saves it at its
/// shell; the failed boot's outcome otherwise.
fn boot_and_save(host: Host, dir: &Path, g: &Golden) -> Result<(), super::Outcome> {
    let ns = Netns::new("golden");
    ns.add_tap("vmmtap0", Some(&format!("{HOST_IP}/24")));
    let sock = dir.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = ns.vmm();
    cmd.arg("--api-sock").arg(&sock);
    let mut vm = Running::start(cmd);
    wait_for_socket(&sock, &vm);
    let boot_args = linux_cmdline(
        host,
        &format!(
            "ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off i8042.noaux i8042.nomux i8042.dumbkbd"
        ),
    );
    let calls = [
        (
            "/machine-config".to_string(),
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#.to_string(),
        ),
        (
            "/boot-source".into(),
            format!(
                r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{boot_args}"}}"#,
                kernel("vmlinux").display(),
                agent_initramfs().display()
            ),
        ),
        (
            "/drives/data".into(),
            format!(
                r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
                g.disk.display()
            ),
        ),
        (
            "/network-interfaces/eth0".into(),
            format!(
                r#"{{"iface_id": "eth0", "host_dev_name": "vmmtap0", "guest_mac": "{GUEST_MAC}"}}"#
            ),
        ),
        ("/entropy".into(), "{}".into()),
        (
            "/balloon".into(),
            r#"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#.into(),
        ),
        (
            "/mmds/config".into(),
            r#"{"network_interfaces": ["eth0"], "version": "V2"}"#.into(),
        ),
        (
            "/vsock".into(),
            format!(
                r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
                dir.join("golden-v.sock").display()
            ),
        ),
        (
            "/actions".into(),
            r#"{"action_type": "InstanceStart"}"#.into(),
        ),
    ];
    for (path, body) in &calls {
        assert_eq!(
            curl(&sock, "PUT", path, Some(body)),
            (204, String::new()),
            "PUT {path}"
        );
    }
    if !vm.wait_for("VMM-TEST: shell", linux_timeout(host)) {
        return Err(vm.finish(Duration::from_secs(10)));
    }
    // The shell reads the console: it answers before it is saved.
    vm.type_on_console("echo READY-$((6 * 7))\n");
    assert!(
        vm.wait_for("READY-42", Duration::from_secs(120)),
        "the shell did not answer: {}",
        vm.stdout_now()
    );
    // The agent answers on vsock before the guest is saved.
    let agent = vmm::run::vsock_connect(&dir.join("golden-v.sock"), AGENT_PORT);
    if let Err(e) = agent {
        panic!("the agent does not listen ({e}): {}", vm.stdout_now());
    }
    std::thread::sleep(Duration::from_millis(500));
    pause_and_snapshot(&sock, &g.snap, &g.mem);
    vm.signal(libc::SIGKILL);
    drop(vm);
    Ok(())
}

/// A clone of the golden guest in namespace `ns` on TAP `tap` (through
/// `network_overrides`), restored and resumed over the API; its console is
/// typed on with [`Running::type_on_console`].
pub fn restore(ns: &Netns, tap: &str, g: &Golden, name: &str) -> (Running, PathBuf) {
    restore_after(ns, tap, g, name, &[])
}

/// As [`restore`], after the PUT requests `before` (path, body).
pub fn restore_after(
    ns: &Netns,
    tap: &str,
    g: &Golden,
    name: &str,
    before: &[(&str, String)],
) -> (Running, PathBuf) {
    restore_from(ns, tap, g, name, before, ("File", &g.mem))
}

/// As [`restore_after`], with memory from `backend` (Firecracker's
/// `mem_backend`: type and path).
pub fn restore_from(
    ns: &Netns,
    tap: &str,
    g: &Golden,
    name: &str,
    before: &[(&str, String)],
    backend: (&str, &Path),
) -> (Running, PathBuf) {
    // A socket left by an earlier run that was killed.
    let _ = std::fs::remove_file(vsock_path(name));
    let mut cmd = ns.vmm();
    cmd.args(["--level", "Info"]);
    let (vm, sock) = super::serve_api(name, cmd);
    for (path, body) in before {
        assert_eq!(
            curl(&sock, "PUT", path, Some(body)),
            (204, String::new()),
            "PUT {path}"
        );
    }
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "{}", "backend_path": "{}"}}, "resume_vm": true, "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "{tap}"}}], "vsock_override": {{"uds_path": "{}"}}}}"#,
        g.snap.display(),
        backend.0,
        backend.1.display(),
        vsock_path(name).display()
    );
    assert_eq!(
        curl(&sock, "PUT", "/snapshot/load", Some(&body)),
        (204, String::new()),
        "{name}: {}",
        vm.stdout_now()
    );
    (vm, sock)
}

/// A clone restored and resumed by the command-line form (`--restore`,
/// `--restore-mem`, `--net-override`, `--vsock-override`), without an API
/// socket.
pub fn restore_cli(ns: &Netns, tap: &str, g: &Golden, name: &str) -> Running {
    let _ = std::fs::remove_file(vsock_path(name));
    let mut cmd = ns.vmm();
    cmd.arg("--restore")
        .arg(&g.snap)
        .arg("--restore-mem")
        .arg(&g.mem)
        .args(["--net-override", &format!("eth0={tap}"), "--level", "Info"])
        .arg("--vsock-override")
        .arg(vsock_path(name));
    Running::start(cmd)
}

/// Types `cmd` on the guest's shell, which prints the marker line
/// `<tag>-<n*11>:` followed by the command's output (the marker is computed
/// by the shell, so the echo of the typed line does not match it); returns
/// that output once its line is complete.
pub fn shell(vm: &mut Running, tag: &str, n: u32, cmd: &str) -> String {
    vm.type_on_console(&format!("echo \"{tag}-$(({n} * 11)):$({cmd})\"\n"));
    let marker = format!("{tag}-{}:", n * 11);
    assert!(
        vm.wait_for(&marker, Duration::from_secs(120)),
        "no {marker}: {}",
        vm.stdout_now()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = vm.stdout_now();
        if let Some(at) = out.find(&marker) {
            let rest = &out[at + marker.len()..];
            if let Some(end) = rest.find('\n') {
                return rest[..end].trim().to_string();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{marker} line not ended: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
