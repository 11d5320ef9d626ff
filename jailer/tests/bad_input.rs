//! Bad jailer input with the real binary, compared with Firecracker 1.16.1's
//! jailer on the same input: its message (after our "vmm-jailer: error: "
//! prefix, on one line), its exit status 1, and nothing left behind: no
//! directory under the chroot base, no cgroup, no mount. A symlink or a hard
//! link where the binary's copy goes is refused and never written through.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// This process's memory cgroup (relative to the v1 memory hierarchy), under
/// which the tests nest theirs.
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

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn is_root() -> bool {
    euid() == 0
}

/// A scratch directory for one test: `base/` (the chroot base, which must
/// exist, as Firecracker's jailer wants it) and an exec file
/// `firecracker` (a few KiB: the jailer copies it before anything that
/// could fail), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("vmm-jailer-bad-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("base")).unwrap();
        std::fs::write(d.join("firecracker"), vec![0x7f; 8192]).unwrap();
        Scratch(std::fs::canonicalize(d).unwrap())
    }

    fn base(&self) -> PathBuf {
        self.0.join("base")
    }

    fn exec(&self) -> PathBuf {
        self.0.join("firecracker")
    }

    /// Where the jail of `id` goes.
    fn root(&self, id: &str) -> PathBuf {
        self.base().join("firecracker").join(id).join("root")
    }

    /// What is under the base, as sorted relative paths.
    fn left(&self) -> Vec<String> {
        fn walk(dir: &Path, under: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(under).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(&p, under, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.base(), &self.base(), &mut out);
        out.sort();
        out
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// Runs the jailer: `--id ID --exec-file EXEC --uid 123 --gid 456
/// --chroot-base-dir BASE`, each replaced by `set` if named there, then
/// `extra`. Returns the exit status and stderr.
fn jailer(s: &Scratch, set: &[(&str, &str)], extra: &[&str]) -> (Option<i32>, String) {
    let (exec, base) = (s.exec(), s.base());
    let mut flags = [
        ("--id", "vm-1"),
        ("--exec-file", exec.to_str().unwrap()),
        ("--uid", "123"),
        ("--gid", "456"),
        ("--chroot-base-dir", base.to_str().unwrap()),
    ];
    for (flag, value) in set {
        flags.iter_mut().find(|(f, _)| f == flag).unwrap().1 = value;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-jailer"))
        .args(flags.iter().flat_map(|(f, v)| [*f, *v]))
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Exit status 1 (Firecracker's for every error), one line on stderr with
/// Firecracker's message `says`.
fn assert_refused(what: &str, (code, err): (Option<i32>, String), says: &str) {
    assert_eq!(code, Some(1), "{what}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: not one line: {err}"
    );
    assert_eq!(
        err.trim_end(),
        format!("vmm-jailer: error: {says}"),
        "{what}"
    );
}

#[test]
fn bad_flags_get_firecracker_s_messages_and_leave_nothing() {
    let s = Scratch::new("flags");
    let before = mounts();
    eprintln!("asserting: Firecracker's messages, exit status 1, nothing under the base");
    // test_empty_jailer_id's message, and the other ids Firecracker refuses.
    for (id, says) in [
        (
            "",
            "Invalid instance ID: Invalid len (0);  the length must be between 1 and 64",
        ),
        (
            &"x".repeat(65) as &str,
            "Invalid instance ID: Invalid len (65);  the length must be between 1 and 64",
        ),
        ("a/b", "Invalid instance ID: Invalid char (/) at position 1"),
        (
            "under_score",
            "Invalid instance ID: Invalid char (_) at position 5",
        ),
    ] {
        assert_refused("bad id", jailer(&s, &[("--id", id)], &[]), says);
    }
    // test_exec_file_not_exist's two cases.
    let missing = s.0.join("pseudo_firecracker_exec_file");
    assert_refused(
        "missing exec file",
        jailer(&s, &[("--exec-file", missing.to_str().unwrap())], &[]),
        &format!(
            "Failed to canonicalize path {}: No such file or directory (os error 2)",
            missing.display()
        ),
    );
    let dir = s.0.join("firecracker_test_dir");
    std::fs::create_dir(&dir).unwrap();
    assert_refused(
        "exec file is a directory",
        jailer(&s, &[("--exec-file", dir.to_str().unwrap())], &[]),
        &format!("{} is not a file", dir.display()),
    );
    for (flag, value, says) in [
        ("--uid", "4294967296", "Invalid uid: 4294967296"),
        ("--gid", "-1", "Invalid gid: -1"),
        (
            "--chroot-base-dir",
            "/nonexistent/base",
            "Failed to canonicalize path /nonexistent/base: No such file or directory (os error 2)",
        ),
        (
            "--chroot-base-dir",
            "/etc/hostname",
            "/etc/hostname is not a directory",
        ),
    ] {
        assert_refused(flag, jailer(&s, &[(flag, value)], &[]), says);
    }
    for (extra, says) in [
        (&["--cgroup", "nodot=1"][..], "Cgroup invalid file: nodot"),
        (
            &["--resource-limit", "fsize=big"],
            "Invalid limit value for resource: big: invalid digit found in string",
        ),
        (
            &["--parent-cgroup", "../up"],
            "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'",
        ),
        (
            &["--netns", "/nonexistent/netns"],
            "Failed to open file /nonexistent/netns: No such file or directory (os error 2)",
        ),
    ] {
        assert_refused(extra[0], jailer(&s, &[], extra), says);
    }
    // A flag Firecracker does not know: exit status 1 too.
    let (code, err) = jailer(&s, &[], &["--bogus"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("vmm-jailer: error: Failed to parse arguments: ")
            && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert_eq!(s.left(), Vec::<String>::new(), "left under the base");
    assert_eq!(mounts(), before, "a mount was left");
}

/// test_exec_destination_path_is_symlink: a symlink where the binary's copy
/// goes is not followed: refused with Firecracker's message, and the file
/// it points to is untouched.
#[test]
fn a_symlink_at_the_binary_s_place_is_refused() {
    let s = Scratch::new("symlink");
    let outside = s.0.join("dummy");
    std::fs::write(&outside, b"host file").unwrap();
    std::fs::create_dir_all(s.root("vm-1")).unwrap();
    let dest = s.root("vm-1").join("firecracker");
    std::os::unix::fs::symlink(&outside, &dest).unwrap();
    eprintln!(
        "asserting: refused with \"Failed to open {}\", the link's target untouched",
        dest.display()
    );
    assert_refused(
        "symlink",
        jailer(&s, &[], &[]),
        &format!(
            "Failed to open {}: Too many levels of symbolic links (os error 40)",
            dest.display()
        ),
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"host file");
    assert!(std::fs::symlink_metadata(&dest)
        .unwrap()
        .file_type()
        .is_symlink());
    // The jail (made by the test) keeps only the link.
    assert_eq!(
        s.left(),
        [
            "firecracker",
            "firecracker/vm-1",
            "firecracker/vm-1/root",
            "firecracker/vm-1/root/firecracker"
        ]
    );
}

/// test_exec_destination_path_is_hardlink: a hard link there is refused
/// with Firecracker's message before anything is written to it.
#[test]
fn a_hard_link_at_the_binary_s_place_is_refused() {
    let s = Scratch::new("hardlink");
    let other = s.0.join("dummy");
    std::fs::write(&other, b"another file").unwrap();
    std::fs::create_dir_all(s.root("vm-1")).unwrap();
    let dest = s.root("vm-1").join("firecracker");
    std::fs::hard_link(&other, &dest).unwrap();
    eprintln!(
        "asserting: refused with \"Detected hard link at: {}\", the other name's content untouched",
        dest.display()
    );
    assert_refused(
        "hard link",
        jailer(&s, &[], &[]),
        &format!("Detected hard link at: {}", dest.display()),
    );
    let m = std::fs::metadata(&other).unwrap();
    assert_eq!(std::fs::read(&other).unwrap(), b"another file");
    assert_eq!((m.nlink(), m.uid()), (2, euid()));
}

/// A FIFO or a device node there is refused without being opened (an open
/// would block on the FIFO, and write the binary into the device).
/// Firecracker's jailer writes into a device node; this one does not.
#[test]
fn a_fifo_or_device_at_the_binary_s_place_is_refused_unopened() {
    let s = Scratch::new("fifo");
    std::fs::create_dir_all(s.root("vm-1")).unwrap();
    let dest = s.root("vm-1").join("firecracker");
    let c = std::ffi::CString::new(dest.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo reads it only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    eprintln!("asserting: a FIFO at the binary's place is refused at once");
    let started = std::time::Instant::now();
    assert_refused(
        "fifo",
        jailer(&s, &[], &[]),
        &format!("{} is not a file", dest.display()),
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    if !is_root() {
        eprintln!("skipped the device node: needs root");
        return;
    }
    std::fs::remove_file(&dest).unwrap();
    // SAFETY: a NUL-terminated path; mknod reads it only. 1:3 is /dev/null.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    assert_eq!(rc, 0);
    assert_refused(
        "device node",
        jailer(&s, &[], &[]),
        &format!("{} is not a file", dest.display()),
    );
    let m = std::fs::symlink_metadata(&dest).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o7777),
        (0, 0o600),
        "the node was changed"
    );
}

/// test_negative_no_file_limit's outcome: the limits apply to the jailer
/// from the copy on, so a no-file limit too small for its own work makes
/// it fail as Firecracker's does (glibc's text for EMFILE, as the gnu-built
/// Firecracker jailer prints it), and what it made goes again.
#[test]
fn a_tiny_no_file_limit_fails_in_the_jailer_and_leaves_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root (the binary's copy is given to uid 123)");
        return;
    }
    let s = Scratch::new("nofile");
    let before = mounts();
    eprintln!("asserting: no-file=3 with --daemonize fails opening /dev/null; nothing left");
    assert_refused(
        "no-file=3",
        jailer(
            &s,
            &[],
            &[
                "--resource-limit",
                "no-file=3",
                "--daemonize",
                "--new-pid-ns",
            ],
        ),
        "Failed to open /dev/null: Too many open files (os error 24)",
    );
    assert_eq!(s.left(), Vec::<String>::new(), "left under the base");
    assert_eq!(mounts(), before, "a mount was left");
}

#[test]
fn a_cgroup_that_cannot_be_made_removes_the_jail_and_the_cgroups() {
    if !is_root() || !Path::new("/sys/fs/cgroup/memory").is_dir() {
        eprintln!("skipped: needs root and the v1 memory controller");
        return;
    }
    let s = Scratch::new("cgroup");
    let parent = format!(
        "{}/vmm-jailer-bad-{}",
        own_memory_cgroup(),
        std::process::id()
    );
    let parent_dir = Path::new("/sys/fs/cgroup/memory").join(&parent);
    let before = mounts();
    let run = |setting: &str| jailer(&s, &[], &["--cgroup", setting, "--parent-cgroup", &parent]);
    // A controller no hierarchy has: refused before anything is made, as
    // Firecracker refuses it.
    let (code, err) = run("nosuchctrl.foo=1");
    assert_eq!(code, Some(1));
    assert!(
        err.contains("Controller nosuchctrl is unavailable") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert!(!parent_dir.exists());
    // A file the controller does not have, and a value the kernel refuses:
    // the cgroup is made, the write fails, and the cgroup, the jail and the
    // binary's copy go again.
    for (setting, mentions) in [
        ("memory.no_such_file=1", "memory.no_such_file"),
        ("memory.limit_in_bytes=lots", "memory.limit_in_bytes"),
    ] {
        let (code, err) = run(setting);
        assert_eq!(code, Some(1), "{setting}: {err}");
        assert!(
            err.contains(mentions) && err.trim_end().lines().count() == 1,
            "{setting}: {err}"
        );
        assert!(!parent_dir.exists(), "{} was left", parent_dir.display());
        assert_eq!(
            s.left(),
            Vec::<String>::new(),
            "{setting}: left under the base"
        );
    }
    assert_eq!(mounts(), before, "a mount was left");
}
