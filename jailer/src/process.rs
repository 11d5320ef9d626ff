//! What the jailer does to its own process before it becomes the VMM:
//! inherited descriptors and environment dropped, the network namespace,
//! resource limits, detaching, a PID namespace, and giving up every
//! privilege (uid/gid, supplementary groups, capabilities, no_new_privs).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::args::Limit;
use crate::Error;

fn os_err(what: &str) -> Error {
    Error::Process(format!(
        "Failed to {what}: {}",
        std::io::Error::last_os_error()
    ))
}

/// Closes every descriptor above 2 that the jailer inherited.
pub fn close_inherited_fds() -> Result<(), Error> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| Error::Process(format!("Failed to list /proc/self/fd: {e}")))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor number; nothing in this process owns
        // those (they were inherited), and the one read_dir used is closed.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Removes every environment variable (the jailer is single-threaded).
pub fn clear_env() {
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
}

/// The limits asked for; without a no-file limit, 2048 (as Firecracker).
pub fn set_limits(limits: &[Limit]) -> Result<(), Error> {
    let mut all = limits.to_vec();
    if !all.iter().any(|l| matches!(l, Limit::NoFile(_))) {
        all.push(Limit::NoFile(2048));
    }
    for l in all {
        let (res, v, name) = match l {
            Limit::Fsize(v) => (libc::RLIMIT_FSIZE, v, "fsize"),
            Limit::NoFile(v) => (libc::RLIMIT_NOFILE, v, "no-file"),
        };
        let r = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: setrlimit reads one rlimit, which `r` is.
        if unsafe { libc::setrlimit(res, &r) } != 0 {
            return Err(os_err(&format!("set the {name} limit to {v}")));
        }
    }
    Ok(())
}

/// Joins the network namespace at `path` (on the host, before the jail is
/// entered, as Firecracker's jailer does).
pub fn join_netns(path: &Path) -> Result<(), Error> {
    let ns = File::open(path)
        .map_err(|e| Error::Process(format!("Failed to open file {}: {e}", path.display())))?;
    // SAFETY: setns on a descriptor this process owns, of a network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(os_err("join the network namespace"));
    }
    Ok(())
}

/// Forks; the parent exits 0 at once and the child returns.
fn fork_and_leave(what: &str) -> Result<(), Error> {
    // SAFETY: the jailer is single-threaded, so fork is safe here.
    match unsafe { libc::fork() } {
        -1 => Err(os_err(what)),
        0 => Ok(()),
        // SAFETY: the parent has nothing to clean up; the child runs on.
        _ => unsafe { libc::_exit(0) },
    }
}

/// Detaches as Firecracker's jailer does: forks (the jailer's own process
/// exits 0, so whoever started it goes on), starts a new session, forks
/// again (so the VMM leads no session and can never get a controlling
/// terminal) and puts standard input, output and error on `null`
/// (/dev/null, opened before the host's files were gone).
pub fn daemonize(null: &OwnedFd) -> Result<(), Error> {
    fork_and_leave("fork to detach")?;
    // SAFETY: setsid has no arguments; a forked child leads no group.
    if unsafe { libc::setsid() } < 0 {
        return Err(os_err("start a new session"));
    }
    fork_and_leave("fork to detach")?;
    for fd in 0..3 {
        // SAFETY: dup2 of a descriptor this process owns onto 0-2.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(os_err("redirect standard I/O to /dev/null"));
        }
    }
    Ok(())
}

/// Forks into a new PID namespace: returns in the child (PID 1 there); the
/// parent writes the child's pid (as the host sees it) to `pid_file` and
/// exits 0. If the jailer leads its session (e.g. started by screen), the
/// child starts a session of its own, as with Firecracker's jailer, so
/// that the jailer's exit does not hang it up.
pub fn enter_pid_namespace(pid_file: &Path) -> Result<(), Error> {
    // SAFETY: getsid and getpid only read this process's ids.
    let leader = unsafe { libc::getsid(0) == libc::getpid() };
    // SAFETY: unshare with a flag constant; the next child is PID 1 of a new
    // PID namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(os_err("create a PID namespace"));
    }
    // SAFETY: the jailer is single-threaded, so fork is safe here.
    match unsafe { libc::fork() } {
        -1 => Err(os_err("fork into the PID namespace")),
        0 => {
            // SAFETY: setsid has no arguments; the child leads no group.
            if leader && unsafe { libc::setsid() } < 0 {
                return Err(os_err("start a new session"));
            }
            Ok(())
        }
        child => {
            let code = match crate::jail::write_pid_file(pid_file, child as u32) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vmm-jailer: error: {e}");
                    // A VMM nobody could find by its pid file does not run.
                    // SAFETY: kill on the child this process just forked.
                    unsafe { libc::kill(child, libc::SIGKILL) };
                    1
                }
            };
            // SAFETY: the parent's work is done; the child runs on.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Becomes uid:gid with no supplementary groups, no capabilities (bounding,
/// ambient, effective, permitted, inheritable) and no_new_privs.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), Error> {
    // SAFETY: setgroups with an empty list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(os_err("clear the supplementary groups"));
    }
    // SAFETY: plain id arguments.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(os_err(&format!("set the gid to {gid}")));
    }
    // The bounding set needs CAP_SETPCAP to shrink: before setuid.
    for cap in 0..64 {
        // SAFETY: plain integer arguments; EINVAL past the last capability
        // is expected and ignored.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: plain integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // SAFETY: plain id arguments.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(os_err(&format!("set the uid to {uid}")));
    }
    // For uid 0 setuid keeps the capabilities: clear them explicitly.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and two data structs, which
    // `header` and `data` are.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(os_err("clear the capabilities"));
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os_err("set no_new_privs"));
    }
    Ok(())
}

/// Microseconds on `clock`.
pub fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}
