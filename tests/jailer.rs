//! `vmm-jailer` with the real vmm binary: the jailed VMM runs as the uid and
//! gid asked for, with no capabilities and no_new_privs, in its chroot and
//! cgroup; the jail's modes and owners, the pid file and the resource
//! limits as Firecracker 1.16.1's jailer makes them (compared side by
//! side); --daemonize and --new-pid-ns; and a jailed Linux boots to user
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
        // The chroot base must exist, as with Firecracker's jailer.
        std::fs::create_dir_all(&base).unwrap();
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

    /// The VMM's pid, from `<root>/vmm.pid` (written in every mode, with no
    /// newline, as Firecracker's jailer writes it). After --daemonize the
    /// jailer exits before its grandchild writes it: this waits for it, as
    /// Firecracker's suite does.
    fn pid_from_file(&self) -> i32 {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(self.root().join("vmm.pid"));
            match text.as_deref().map(str::parse) {
                Ok(Ok(pid)) => return pid,
                _ if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                _ => panic!("vmm.pid holds {text:?}"),
            }
        }
    }

    /// Waits for the API socket in the jail and a 200 on GET /.
    fn api_answers(&self) -> String {
        self.api_answers_at("api.sock")
    }

    /// Waits for the API socket `name` in the jail and a 200 on GET /.
    fn api_answers_at(&self, name: &str) -> String {
        let sock = self.root().join(name);
        // Generous: in CI a Linux guest boots beside this under a software
        // KVM, which can leave the host's processes starved for seconds.
        let until = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        loop {
            if sock.exists() {
                let (status, body) = curl(&sock, "GET", "/", None);
                if status == 200 {
                    return body;
                }
                last = Some((status, body));
            }
            assert!(
                Instant::now() < until,
                "no API in the jail at {}: socket exists: {}, last answer: {last:?}, jail: {:?}",
                sock.display(),
                sock.exists(),
                std::fs::read_dir(self.root()).map(|d| d
                    .filter_map(|e| e.ok().map(|e| e.file_name()))
                    .collect::<Vec<_>>())
            );
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

/// This process's umask (which the jailer inherits), read without
/// changing it.
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .unwrap();
    u32::from_str_radix(field.trim(), 8).unwrap()
}

/// Fields 4-7 of /proc/PID/stat: ppid, pgrp, session, tty_nr.
fn stat_ids(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = stat.rsplit_once(')').unwrap().1;
    after_comm
        .split_whitespace()
        .skip(1)
        .take(4)
        .map(str::to_string)
        .collect()
}

/// --daemonize as Firecracker's jailer does it: the jailer exits 0 at once
/// (a fork), the VMM (a second fork, after setsid) runs in a session it
/// does not lead, with no terminal and 0-2 on /dev/null; its pid is in the
/// pid file.
#[test]
fn daemonize_detaches_and_the_api_in_the_jail_works() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("daemon");
    let started = Instant::now();
    let out = jail
        .command(&["--daemonize"], &["--api-sock", "/api.sock"])
        .output()
        .unwrap();
    eprintln!("asserting: the jailer exits 0 with nothing on its pipes; the VMM is detached");
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let body = jail.api_answers();
    let pid = jail.pid_from_file();
    jail.pids.push(pid);
    assert!(body.contains(&format!("\"id\":\"{}\"", jail.id)), "{body}");
    let pid = pid as u32;
    let ids = stat_ids(pid);
    let (ppid, pgrp, session, tty) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    // SAFETY: getsid(0) only reads this process's session id.
    let own_session = unsafe { libc::getsid(0) }.to_string();
    assert_ne!(session, &own_session, "still in the test's session");
    assert_ne!(session, &pid.to_string(), "the VMM leads its session");
    assert_eq!(pgrp, session);
    assert_ne!(ppid, &std::process::id().to_string());
    assert_eq!(tty, "0", "controlling terminal");
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }
    assert_eq!(status_field(pid, "Uid"), format!("{UID} {UID} {UID} {UID}"));
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
    let pid = jail.pid_from_file();
    jail.pids.push(pid);
    jail.api_answers();
    let nspid = status_field(pid as u32, "NSpid");
    assert_eq!(nspid, format!("{pid} 1"), "NSpid of {pid}");
    assert_eq!(
        status_field(pid as u32, "Uid"),
        format!("{UID} {UID} {UID} {UID}")
    );
}

/// --new-pid-ns without --daemonize from a jailer that leads its session
/// (as under screen, which Firecracker's suite uses): the VMM starts a
/// session of its own, as with Firecracker's jailer, so the jailer's exit
/// cannot hang it up; it outlives the jailer.
#[test]
fn new_pid_ns_from_a_session_leader_gets_its_own_session() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("pidl");
    let mut cmd = jail.command(&["--new-pid-ns"], &["--api-sock", "/api.sock"]);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches nothing of the
    // parent's memory; the child is not a group leader, so it succeeds.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    // The VMM keeps the jailer's standard I/O (no --daemonize).
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{st:?}");
    let pid = jail.pid_from_file();
    jail.pids.push(pid);
    jail.api_answers();
    eprintln!("asserting: pid {pid} is PID 1 of its namespace and leads a session of its own");
    assert_eq!(status_field(pid as u32, "NSpid"), format!("{pid} 1"));
    let ids = stat_ids(pid as u32);
    assert_eq!(ids[2], pid.to_string(), "session of {pid}: {ids:?}");
}

/// test_default_chroot_hierarchy (Firecracker's modes exactly) and
/// `<exec file name>.pid` without --new-pid-ns or --daemonize: the jail's
/// root, dev, dev/net and run are directories 0700 owned by the jail's
/// user, the device nodes 0600 likewise, the binary's copy is owned by that
/// user with the exec file's permission bits (less the umask), and the VMM,
/// given no --api-sock, listens on /run/firecracker.socket in the jail.
#[test]
fn the_jail_has_firecracker_s_hierarchy_modes_and_owners_and_a_pid_file() {
    if !needs_root_and_cgroups() {
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    let mut jail = Jail::new("fh");
    let vm = Running::start(jail.command(&[], &[]));
    let pid = vm.child.id();
    jail.pids.push(pid as i32);
    let body = jail.api_answers_at("run/firecracker.socket");
    assert!(body.contains(&format!("\"id\":\"{}\"", jail.id)), "{body}");
    eprintln!("asserting: modes and owners in the jail, the pid file holding {pid}");
    let root = jail.root();
    let stat = |rel: &str| std::fs::symlink_metadata(root.join(rel)).unwrap();
    for dir in ["", "dev", "dev/net", "run"] {
        let m = stat(dir);
        assert!(m.is_dir(), "/{dir}");
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (0o700, UID, GID),
            "/{dir}"
        );
    }
    for dev in ["dev/kvm", "dev/net/tun", "dev/urandom"] {
        let m = stat(dev);
        assert!(m.file_type().is_char_device(), "/{dev}");
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (0o600, UID, GID),
            "/{dev}"
        );
    }
    let umask = umask();
    let source = std::fs::metadata(env!("CARGO_BIN_EXE_vmm")).unwrap();
    let exe = stat("vmm");
    assert!(exe.is_file());
    assert_eq!(
        (exe.mode() & 0o7777, exe.uid(), exe.gid()),
        (source.mode() & 0o777 & !umask, UID, GID),
        "/vmm"
    );
    assert_eq!(exe.len(), source.len());
    let sock = stat("run/firecracker.socket");
    assert!(sock.file_type().is_socket());
    assert_eq!((sock.uid(), sock.gid()), (UID, GID));
    // Written by the jailer (as root) before it became the VMM.
    let pid_file = stat("vmm.pid");
    assert_eq!(
        (pid_file.mode() & 0o7777, pid_file.uid()),
        (0o666 & !umask, 0)
    );
    assert_eq!(jail.pid_from_file(), pid as i32);
    vm.signal(libc::SIGTERM);
    let _ = vm.finish(Duration::from_secs(10));
    jail.pids.clear();
}

/// test_positive_file_size_limit's premise, test_args_resource_limits'
/// values: the limits are set after the binary is copied, so an fsize
/// smaller than the binary neither kills the jailer nor truncates the copy,
/// and the VMM runs under both limits.
#[test]
fn resource_limits_apply_after_the_copy() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("limits");
    let source = std::fs::read(env!("CARGO_BIN_EXE_vmm")).unwrap();
    let fsize = 65536;
    assert!(source.len() > fsize);
    let vm = Running::start(jail.command(
        &[
            "--resource-limit",
            &format!("fsize={fsize}"),
            "--resource-limit",
            "no-file=1024",
        ],
        &["--api-sock", "/api.sock"],
    ));
    let pid = vm.child.id();
    jail.pids.push(pid as i32);
    jail.api_answers();
    eprintln!("asserting: the whole binary in the jail; pid {pid} runs with fsize {fsize} and no-file 1024");
    assert!(
        std::fs::read(jail.root().join("vmm")).unwrap() == source,
        "the copy differs from the exec file"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let row = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .skip(name.split_whitespace().count())
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(row("Max file size"), format!("{fsize} {fsize}"), "{limits}");
    assert_eq!(row("Max open files"), "1024 1024", "{limits}");
    vm.signal(libc::SIGTERM);
    let _ = vm.finish(Duration::from_secs(10));
    jail.pids.clear();
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

/// A jail root reused after a (compromised) VMM left things in it, which it
/// could (the root is its own): a `dev` symlink to a host directory, stale
/// device nodes, pid file and binary. The jailer writes nothing through
/// the symlink (it makes the directories from inside the jail, as
/// Firecracker's does), replaces the rest and overwrites the binary's copy
/// whole. (A symlink or hard link in the binary's place is refused:
/// jailer/tests/bad_input.rs.)
#[test]
fn a_reused_jail_is_refurnished_without_following_its_links() {
    if !needs_root_and_cgroups() {
        return;
    }
    let mut jail = Jail::new("reuse");
    let outside = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("outside-{}", jail.id));
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"host file").unwrap();
    let root = jail.root();
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("dev")).unwrap();
    std::fs::create_dir(root.join("run")).unwrap();
    std::fs::write(root.join("run/stale"), b"x").unwrap();
    std::fs::write(root.join("vmm.pid"), b"999999").unwrap();
    // A stale binary, longer than any vmm, mode 0777.
    std::fs::write(root.join("vmm"), vec![0u8; 64 << 20]).unwrap();
    std::fs::set_permissions(
        root.join("vmm"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let vm = Running::start(jail.command(&[], &["--api-sock", "/api.sock"]));
    jail.pids.push(vm.child.id() as i32);
    jail.api_answers();
    eprintln!(
        "asserting: the host directory behind the symlink is untouched; the jail is furnished anew"
    );
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"host file");
    let entries: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("victim")]);
    let dev = std::fs::symlink_metadata(root.join("dev")).unwrap();
    assert!(dev.is_dir() && dev.mode() & 0o7777 == 0o700);
    assert!(std::fs::symlink_metadata(root.join("dev/kvm")).is_ok());
    assert_eq!(std::fs::read(root.join("run/stale")).unwrap(), b"x");
    assert_eq!(jail.pid_from_file(), vm.child.id() as i32);
    let source = std::fs::metadata(env!("CARGO_BIN_EXE_vmm")).unwrap();
    let exe = std::fs::metadata(root.join("vmm")).unwrap();
    assert_eq!(
        exe.len(),
        source.len(),
        "the stale binary was not replaced whole"
    );
    assert_eq!(exe.mode() & 0o7777, source.mode() & 0o777 & !umask());
    drop(vm);
    jail.pids.clear();
    let _ = std::fs::remove_dir_all(&outside);
}
