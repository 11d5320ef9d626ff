//! Bad jailer input with the real binary: one line on stderr, a non-zero
//! exit status, and nothing left behind: no directory under the chroot base,
//! no cgroup, no mount.

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

fn base(tag: &str) -> PathBuf {
    let b = std::env::temp_dir().join(format!("vmm-jailer-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&b);
    b
}

fn mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// Runs the jailer with `args` (the common ones first, then `extra`).
fn jailer(id: &str, exec: &str, base: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-jailer"))
        .args([
            "--id",
            id,
            "--exec-file",
            exec,
            "--uid",
            "123",
            "--gid",
            "456",
        ])
        .arg("--chroot-base-dir")
        .arg(base)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn assert_refused(what: &str, (code, err): (Option<i32>, String), mentions: &str, base: &Path) {
    assert!(
        matches!(code, Some(c) if c != 0),
        "{what}: exit {code:?}: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: not one line: {err}"
    );
    assert!(err.contains(mentions), "{what}: {err}");
    assert!(
        !base.exists() || base.is_file(),
        "{what}: {} was created",
        base.display()
    );
}

#[test]
fn bad_flags_are_one_line_and_leave_nothing() {
    let b = base("flags");
    let before = mounts();
    assert_refused(
        "missing exec file",
        jailer("vm-1", "/nonexistent/vmm", &b, &[]),
        "--exec-file '/nonexistent/vmm'",
        &b,
    );
    for id in ["a/b", &"x".repeat(65), "under_score", ""] {
        assert_refused("bad id", jailer(id, "/bin/true", &b, &[]), "--id", &b);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-jailer"))
        .args([
            "--id",
            "vm-1",
            "--exec-file",
            "/bin/true",
            "--uid",
            "4294967296",
            "--gid",
            "-1",
        ])
        .arg("--chroot-base-dir")
        .arg(&b)
        .output()
        .unwrap();
    assert_refused(
        "uid out of range",
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ),
        "--uid '4294967296'",
        &b,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-jailer"))
        .args([
            "--id",
            "vm-1",
            "--exec-file",
            "/bin/true",
            "--uid",
            "1",
            "--gid",
            "-1",
        ])
        .arg("--chroot-base-dir")
        .arg(&b)
        .output()
        .unwrap();
    assert_refused(
        "gid out of range",
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ),
        "--gid '-1'",
        &b,
    );
    // A chroot base that is a file.
    std::fs::write(&b, b"not a directory").unwrap();
    assert_refused(
        "chroot base is a file",
        jailer("vm-1", "/bin/true", &b, &[]),
        "is not a directory",
        &b,
    );
    assert_eq!(std::fs::read(&b).unwrap(), b"not a directory");
    std::fs::remove_file(&b).unwrap();
    assert_eq!(mounts(), before, "a mount was left");
}

#[test]
fn a_cgroup_that_cannot_be_made_removes_the_jail_and_the_cgroups() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/sys/fs/cgroup/memory").is_dir() {
        eprintln!("skipped: needs root and the v1 memory controller");
        return;
    }
    let b = base("cgroup");
    let parent = format!(
        "{}/vmm-jailer-bad-{}",
        own_memory_cgroup(),
        std::process::id()
    );
    let parent_dir = Path::new("/sys/fs/cgroup/memory").join(&parent);
    let before = mounts();
    // A controller no hierarchy has.
    assert_refused(
        "unknown controller",
        jailer(
            "vm-1",
            "/bin/true",
            &b,
            &["--cgroup", "nosuchctrl.foo=1", "--parent-cgroup", &parent],
        ),
        "'nosuchctrl' controller",
        &b,
    );
    assert!(!parent_dir.exists());
    // A file the controller does not have: the cgroup is made, then the
    // write fails, and both the cgroup and the jail go again.
    assert_refused(
        "unknown cgroup file",
        jailer(
            "vm-1",
            "/bin/true",
            &b,
            &[
                "--cgroup",
                "memory.no_such_file=1",
                "--parent-cgroup",
                &parent,
            ],
        ),
        "memory.no_such_file",
        &b,
    );
    assert!(!parent_dir.exists(), "{} was left", parent_dir.display());
    // A value the kernel refuses.
    assert_refused(
        "bad cgroup value",
        jailer(
            "vm-1",
            "/bin/true",
            &b,
            &[
                "--cgroup",
                "memory.limit_in_bytes=lots",
                "--parent-cgroup",
                &parent,
            ],
        ),
        "memory.limit_in_bytes",
        &b,
    );
    assert!(!parent_dir.exists(), "{} was left", parent_dir.display());
    assert_eq!(mounts(), before, "a mount was left");
}
