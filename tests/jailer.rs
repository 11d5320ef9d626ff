//! `vmm-jailer` with the real vmm binary: the jailed VMM runs as the uid and
//! gid asked for, with no capabilities and no_new_privs, in its chroot and
//! cgroup; --daemonize and --new-pid-ns; and a jailed Linux boots to user
//! space with a disk and a TAP in a network namespace.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{curl, host, kernel, linux_cmdline, linux_timeout, resource, Running};

const UID: u32 = 123;
const GID: u32 = 456;

/// The jailer binary (built with the workspace, next to vmm).
fn jailer_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_vmm")).with_file_name("vmm-jailer");
    assert!(
        p.is_file(),
        "{} is missing: cargo build -p vmm-jailer (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// This process's v1 memory cgroup, relative to the hierarchy.
fn own_memory_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.split_once(":memory:")
                .map(|(_, p)| p.trim_matches('/').to_string())
        })
        .unwrap_or_default()
}

/// A jail for one test: its base directory and the cgroups under the test
/// process's own, all removed on drop (after the VMM is gone).
struct Jail {
    id: String,
    base: PathBuf,
    parent_cgroup: String,
    pids: Vec<i32>,
}

impl Jail {
    fn new(tag: &str) -> Jail {
        let id = format!("{tag}-{}", std::process::id());
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("jails-{id}"));
        let _ = std::fs::remove_dir_all(&base);
        Jail {
            parent_cgroup: format!("{}/vmm-jailer-test-{id}", own_memory_cgroup()),
            id,
            base,
            pids: Vec::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.base.join("vmm").join(&self.id).join("root")
    }

    fn cgroup_dir(&self) -> PathBuf {
        Path::new("/sys/fs/cgroup/memory")
            .join(&self.parent_cgroup)
            .join(&self.id)
    }

    /// The jailer command: this jail, the test uid/gid, `flags`, then
    /// `-- vmm_args`.
    fn command(&self, flags: &[&str], vmm_args: &[&str]) -> Command {
        let mut c = Command::new(jailer_bin());
        c.args(["--id", &self.id, "--exec-file", env!("CARGO_BIN_EXE_vmm")])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(["--parent-cgroup", &self.parent_cgroup])
            .args(flags)
            .arg("--")
            .args(vmm_args)
            .stdin(Stdio::null());
        c
    }

    /// Waits for the API socket in the jail and a 200 on GET /.
    fn api_answers(&self) -> String {
        let sock = self.root().join("api.sock");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if sock.exists() {
                let (status, body) = curl(&sock, "GET", "/", None);
                if status == 200 {
                    return body;
                }
            }
            assert!(Instant::now() < until, "no API in the jail");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        for pid in &self.pids {
            // SAFETY: kill on a pid this test started (a jailed VMM).
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        // The cgroup can go once its processes are gone.
        let until = Instant::now() + Duration::from_secs(5);
        while self.cgroup_dir().exists() && Instant::now() < until {
            let _ = std::fs::remove_dir(self.cgroup_dir());
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(self.cgroup_dir().parent().unwrap());
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// `key:` lines of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn needs_root_and_cgroups() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0 && Path::new("/sys/fs/cgroup/memory").is_dir();
    if !ok {
        eprintln!("skipped: needs root and the v1 memory cgroup controller");
    }
    ok
}

/// The jailed VMM `pid` runs as UID:GID with no capabilities and
/// no_new_privs, in the jail's root and memory cgroup (whose limit reads
/// `limit`), with the jail's device nodes.
fn assert_jailed(pid: u32, jail: &Jail, limit: &str) {
    eprintln!("asserting: uid/gid, no capabilities, no_new_privs, root, cgroup of pid {pid}");
    assert_eq!(status_field(pid, "Uid"), format!("{UID} {UID} {UID} {UID}"));
    assert_eq!(status_field(pid, "Gid"), format!("{GID} {GID} {GID} {GID}"));
    assert_eq!(status_field(pid, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Its root is the jail: the same directory, and nothing of the host.
    let root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let jail_root = std::fs::metadata(jail.root()).unwrap();
    assert_eq!((root.dev(), root.ino()), (jail_root.dev(), jail_root.ino()));
    assert!(Path::new(&format!("/proc/{pid}/root/vmm")).is_file());
    assert!(!Path::new(&format!("/proc/{pid}/root/etc")).exists());
    // /dev/userfaultfd (a dynamic minor) as the host has it, if it does.
    let uffd = std::fs::metadata("/dev/userfaultfd").ok().map(|m| {
        (
            "userfaultfd",
            (libc::major(m.rdev()), libc::minor(m.rdev())),
        )
    });
    for (dev, rdev) in [
        ("kvm", (10, 232)),
        ("net/tun", (10, 200)),
        ("urandom", (1, 9)),
    ]
    .into_iter()
    .chain(uffd)
    {
        let m = std::fs::metadata(jail.root().join("dev").join(dev)).unwrap();
        assert_eq!((m.uid(), m.gid()), (UID, GID), "/dev/{dev}");
        let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        assert_eq!((major, minor), rdev, "/dev/{dev}");
    }
    // Its cgroup, with the limit applied.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!(":memory:/{}/{}", jail.parent_cgroup, jail.id);
    assert!(cgroups.lines().any(|l| l.ends_with(&want)), "{cgroups}");
    let read = std::fs::read_to_string(jail.cgroup_dir().join("memory.limit_in_bytes")).unwrap();
    assert_eq!(read.trim(), limit);
}

#[test]
fn the_jailed_vmm_is_unprivileged_in_its_root_and_cgroup() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("props");
    let vm = Running::start(jail.command(
        &["--cgroup", "memory.limit_in_bytes=268435456"],
        &["--api-sock", "/api.sock"],
    ));
    jail.pids.push(vm.child.id() as i32);
    let body = jail.api_answers();
    assert!(body.contains(&format!("\"id\":\"{}\"", jail.id)), "{body}");
    assert_jailed(vm.child.id(), &jail, "268435456");
    vm.signal(libc::SIGTERM);
    let out = vm.finish(Duration::from_secs(10));
    jail.pids.clear();
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn daemonize_detaches_and_the_api_in_the_jail_works() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("daemon");
    let mut child = jail
        .command(&["--daemonize"], &["--api-sock", "/api.sock"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    jail.pids.push(pid as i32);
    let body = jail.api_answers();
    assert!(body.contains(&format!("\"id\":\"{}\"", jail.id)), "{body}");
    // Its own session, no terminal, standard I/O on /dev/null (so the pipes
    // the test gave it see end of file at once).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    assert_eq!(fields[3], pid.to_string(), "session id: {stat}");
    assert_eq!(fields[4], "0", "controlling terminal: {stat}");
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "");
    // SAFETY: kill on the pid this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    jail.pids.clear();
    assert!(st.code().is_some(), "{st:?}");
}

#[test]
fn new_pid_ns_makes_the_vmm_pid_1_of_its_namespace() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("pidns");
    let st = jail
        .command(
            &["--new-pid-ns", "--daemonize"],
            &["--api-sock", "/api.sock"],
        )
        .status()
        .unwrap();
    assert!(
        st.success(),
        "the jailer's parent exits 0 once the child runs: {st:?}"
    );
    let pid_file = jail.root().join("vmm.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    jail.pids.push(pid);
    jail.api_answers();
    let nspid = status_field(pid as u32, "NSpid");
    assert_eq!(nspid, format!("{pid} 1"), "NSpid of {pid}");
    assert_eq!(
        status_field(pid as u32, "Uid"),
        format!("{UID} {UID} {UID} {UID}")
    );
}

#[test]
fn a_jailed_linux_boots_with_a_disk_and_a_tap() {
    if !needs_root_and_cgroups() {
        return;
    }
    let host = host();
    let jail = Jail::new("linux");
    let ns = common::golden::Netns::new("jail");
    // A TAP the unprivileged VMM may open: owned by its uid and gid.
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        "vmmjail0",
        "mode",
        "tap",
        "user",
        &UID.to_string(),
        "group",
        &GID.to_string(),
    ]);
    ns.ip(&["addr", "add", "192.168.78.1/24", "dev", "vmmjail0"]);
    ns.ip(&["link", "set", "vmmjail0", "up"]);
    // The kernel and a writable copy of the disk, inside the jail root
    // (which the jailer then uses as it is, as Firecracker's does).
    let root = jail.root();
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(kernel("vmlinux"), root.join("vmlinux")).unwrap();
    std::fs::copy(resource("build-rootfs.sh"), root.join("rootfs.ext4")).unwrap();
    std::os::unix::fs::chown(root.join("rootfs.ext4"), Some(UID), Some(GID)).unwrap();
    let before = std::fs::read(root.join("rootfs.ext4")).unwrap();
    let cmdline = linux_cmdline(
        host,
        "ip=192.168.78.2::192.168.78.1:255.255.255.0::eth0:off vmm.ping=192.168.78.1",
    );
    let netns = format!("/var/run/netns/{}", ns.name);
    let make = || {
        // A retried boot (PVM) makes the cgroup anew.
        let _ = std::fs::remove_dir(jail.cgroup_dir());
        jail.command(
            &[
                "--netns",
                &netns,
                "--cgroup",
                "memory.limit_in_bytes=536870912",
            ],
            &[
                "--kernel",
                "/vmlinux",
                "--rootfs",
                "/rootfs.ext4",
                "--net",
                "tap=vmmjail0",
                "--memory",
                "256M",
                "--cmdline",
                &cmdline,
            ],
        )
    };
    let (vm, reached) =
        common::start_linux(host, make, "VMM-TEST: rootfs init up", linux_timeout(host));
    assert!(
        reached,
        "the jailed guest's init did not start: {}",
        vm.stdout_now()
    );
    // While it runs (its init pings, 3 s at least): the jail holds.
    assert_jailed(vm.child.id(), &jail, "536870912");
    let out = vm.finish(linux_timeout(host));
    eprintln!("asserting: the jailed guest's init ran from the disk, pinged the host over the TAP, powered off");
    out.assert_console(&["VMM-TEST: rootfs init up", "VMM-TEST: ping 192.168.78.1 ok"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // The guest mounted its root read-write: the disk in the jail changed.
    let after = std::fs::read(root.join("rootfs.ext4")).unwrap();
    assert_ne!(before, after, "the jailed VMM wrote nothing to its disk");
}

#[test]
fn vsock_and_snapshot_files_are_inside_the_jail() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("files");
    std::fs::create_dir_all(jail.root()).unwrap();
    std::fs::copy(common::guest("halt"), jail.root().join("halt.elf")).unwrap();
    let mut vm = Running::start(jail.command(&[], &["--api-sock", "/api.sock"]));
    jail.pids.push(vm.child.id() as i32);
    jail.api_answers();
    let sock = jail.root().join("api.sock");
    for (method, path, body) in [
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/halt.elf"}"#,
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#,
        ),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        let (status, resp) = curl(&sock, method, path, Some(body));
        assert_eq!(status, 204, "{method} {path}: {resp}");
    }
    assert!(
        vm.wait_for("VMM-GUEST", Duration::from_secs(20)),
        "the guest did not start"
    );
    for (method, path, body) in [
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_type": "Full", "snapshot_path": "/vm.snap", "mem_file_path": "/vm.mem"}"#,
        ),
    ] {
        let (status, resp) = curl(&sock, method, path, Some(body));
        assert_eq!(status, 204, "{method} {path}: {resp}");
    }
    eprintln!(
        "asserting: the vsock socket and the snapshot files are in the jail, owned by its user"
    );
    use std::os::unix::fs::FileTypeExt;
    let v = std::fs::symlink_metadata(jail.root().join("v.sock")).unwrap();
    assert!(v.file_type().is_socket());
    for f in ["vm.snap", "vm.mem"] {
        let m = std::fs::metadata(jail.root().join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (UID, GID), "{f}");
        assert!(m.len() > 0, "{f}");
    }
    let described = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--describe-snapshot")
        .arg(jail.root().join("vm.snap"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&described.stdout);
    assert!(
        described.status.success() && text.contains("/v.sock"),
        "{text}"
    );
    vm.signal(libc::SIGTERM);
    let _ = vm.finish(Duration::from_secs(10));
    jail.pids.clear();
}

#[test]
fn cgroup_v2_makes_the_cgroup_in_the_unified_hierarchy() {
    let unified = Path::new("/sys/fs/cgroup/unified");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !unified.join("cgroup.procs").exists() {
        eprintln!(
            "skipped: needs root and a cgroup v2 hierarchy at {}",
            unified.display()
        );
        return;
    }
    let mut jail = Jail::new("v2");
    let parent = format!("vmm-jailer-v2-{}", std::process::id());
    let dir = unified.join(&parent).join(&jail.id);
    let mut c = Command::new(jailer_bin());
    c.args(["--id", &jail.id, "--exec-file", env!("CARGO_BIN_EXE_vmm")])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--chroot-base-dir")
        .arg(&jail.base)
        .args(["--cgroup-version", "2", "--parent-cgroup", &parent])
        .args(["--cgroup", "cgroup.max.descendants=5"])
        .args(["--", "--api-sock", "/api.sock"])
        .stdin(Stdio::null());
    let vm = Running::start(c);
    let pid = vm.child.id();
    jail.pids.push(pid as i32);
    jail.api_answers();
    eprintln!(
        "asserting: pid {pid} is in {} with the value written",
        dir.display()
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("0::/{parent}/{}", jail.id);
    assert!(cgroups.lines().any(|l| l == want), "{cgroups}");
    let read = std::fs::read_to_string(dir.join("cgroup.max.descendants")).unwrap();
    assert_eq!(read.trim(), "5");
    drop(vm);
    jail.pids.clear();
    let until = Instant::now() + Duration::from_secs(5);
    while dir.exists() && Instant::now() < until {
        let _ = std::fs::remove_dir(&dir);
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(unified.join(&parent));
    assert!(!dir.exists(), "{} could not be removed", dir.display());
}

/// A jail root reused after a (compromised) VMM left symlinks in it, which
/// it could (the root is its own): the jailer writes nothing through them.
#[test]
fn symlinks_left_in_a_reused_jail_lead_nowhere() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("links");
    let outside = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("outside-{}", jail.id));
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"host file").unwrap();
    std::fs::create_dir_all(jail.root()).unwrap();
    std::os::unix::fs::symlink(&outside, jail.root().join("dev")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), jail.root().join("vmm")).unwrap();
    let vm = Running::start(jail.command(&[], &["--api-sock", "/api.sock"]));
    jail.pids.push(vm.child.id() as i32);
    jail.api_answers();
    eprintln!("asserting: the host file and directory behind the symlinks are untouched");
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"host file");
    let entries: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("victim")]);
    // The jail got a real binary and real device nodes instead.
    let exe = std::fs::symlink_metadata(jail.root().join("vmm")).unwrap();
    assert!(exe.file_type().is_file());
    assert!(std::fs::symlink_metadata(jail.root().join("dev/kvm")).is_ok());
    drop(vm);
    jail.pids.clear();
    let _ = std::fs::remove_dir_all(&outside);
}
