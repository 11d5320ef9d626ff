//! The jail's file system: `<base>/<exec name>/<id>/root` with a copy of
//! the binary (made from the host, as Firecracker's jailer does, refusing a
//! symlink or a hard link in its place), entered through a new mount
//! namespace and pivot_root so that the host's file system is gone, then
//! furnished from inside with its directories (0700, owned by the jail's
//! user), the device nodes the VMM needs and the pid file.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::args::Plan;
use crate::Error;

/// The misc devices' major number (/dev/kvm, /dev/net/tun, /dev/userfaultfd).
const MISC_MAJOR: u32 = 10;

/// Device nodes made in the jail, in Firecracker's order: path, major, minor.
const DEVICES: [(&str, u32, u32); 3] = [
    ("/dev/net/tun", MISC_MAJOR, 200),
    ("/dev/kvm", MISC_MAJOR, 232),
    ("/dev/urandom", 1, 9),
];

/// The directories the jail gets, each 0700 and owned by the jail's user
/// (the VMM's API socket goes to /run by default).
const DIRECTORIES: [&str; 4] = ["/", "/dev", "/dev/net", "/run"];

fn cstr(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Jail(format!("the path {} contains a NUL byte", p.display())))
}

fn os(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let text = format!("{what} {}", p.display());
    move |e| Error::Jail(format!("{text}: {e}"))
}

fn last_os_error(what: &str, p: &Path) -> Error {
    os(what, p)(std::io::Error::last_os_error())
}

/// The jail's directory on the host; `remove` undoes what this run made
/// there before it entered the jail.
pub struct Jail {
    /// The chroot directory.
    pub root: PathBuf,
    /// Directories created by this run, in creation order.
    created: Vec<PathBuf>,
    /// The copy of the binary, when this run created it.
    created_exec: Option<PathBuf>,
}

impl Jail {
    /// Creates the chroot directory (and its missing parents). An existing
    /// root is used as it is, as Firecracker's jailer does: orchestrators put
    /// the kernel and disks there first.
    pub fn create(plan: &Plan) -> Result<Jail, Error> {
        let mut jail = Jail {
            root: plan.jail_root(),
            created: Vec::new(),
            created_exec: None,
        };
        let root = jail.root.clone();
        if let Err(e) = jail.mkdir_all(&root) {
            jail.remove();
            return Err(e);
        }
        match fs::symlink_metadata(&root) {
            Ok(m) if m.is_dir() => Ok(jail),
            _ => {
                jail.remove();
                Err(Error::Jail(format!(
                    "{} is not a directory (a symlink?); remove it or give another --id",
                    root.display()
                )))
            }
        }
    }

    fn mkdir_all(&mut self, dir: &Path) -> Result<(), Error> {
        let mut missing = Vec::new();
        let mut p = dir;
        while !crate::args::exists(p) {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(parent) => p = parent,
                None => break,
            }
        }
        for d in missing.into_iter().rev() {
            fs::create_dir(&d).map_err(os("Failed to create directory", &d))?;
            self.created.push(d);
        }
        Ok(())
    }

    /// Copies the exec file to `<root>/<exec name>`, owned by uid:gid, with
    /// the exec file's permission bits (less the umask). As Firecracker's
    /// jailer, it refuses a symlink ("Failed to open": it is not followed)
    /// or a hard link ("Detected hard link at") in that place, and writes
    /// over an existing regular file of its own; it also refuses anything
    /// else that is not a regular file (a device node or a FIFO), which it
    /// never opens.
    pub fn copy_exec(&mut self, plan: &Plan) -> Result<(), Error> {
        let dest = self.root.join(&plan.exec_name);
        let mut src =
            fs::File::open(&plan.exec_file).map_err(os("Failed to open file", &plan.exec_file))?;
        let src_mode = src
            .metadata()
            .map_err(os("Cannot get metadata for a file:", &plan.exec_file))?
            .permissions()
            .mode()
            & 0o777;
        let existed = match fs::symlink_metadata(&dest) {
            Ok(m) if !m.is_file() && !m.file_type().is_symlink() => {
                return Err(Error::Jail(format!("{} is not a file", dest.display())))
            }
            Ok(_) => true,
            Err(_) => false,
        };
        // No O_TRUNC: a hard link must be found before anything is written.
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(src_mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&dest)
            .map_err(os("Failed to open", &dest))?;
        if !existed {
            self.created_exec = Some(dest.clone());
        }
        let m = out
            .metadata()
            .map_err(os("Cannot get metadata for a file:", &dest))?;
        if !m.is_file() {
            return Err(Error::Jail(format!("{} is not a file", dest.display())));
        }
        if m.nlink() > 1 {
            return Err(Error::Jail(format!(
                "Detected hard link at: {}",
                dest.display()
            )));
        }
        // SAFETY: fchown on a descriptor this function owns.
        if unsafe { libc::fchown(out.as_raw_fd(), plan.uid, plan.gid) } != 0 {
            return Err(last_os_error("Failed to change owner for", &dest));
        }
        // A file left by an earlier run gets the mode a new one would.
        // SAFETY: umask only swaps the process's mask (single-threaded here),
        // and the second call puts it back.
        let umask = unsafe { libc::umask(0) };
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        out.set_permissions(fs::Permissions::from_mode(src_mode & !umask))
            .map_err(os("Failed to change permissions on", &dest))?;
        out.set_len(0).map_err(os("Failed to truncate", &dest))?;
        std::io::copy(&mut src, &mut out).map_err(|e| {
            Error::Jail(format!(
                "Failed to copy {} to {}: {e}",
                plan.exec_file.display(),
                dest.display()
            ))
        })?;
        Ok(())
    }

    /// Removes what this run created: the binary's copy, then the
    /// directories, deepest first (with no descriptor needed, so this works
    /// under a tiny no-file limit too; a directory someone else put a file
    /// in stays).
    pub fn remove(&mut self) {
        if let Some(exe) = self.created_exec.take() {
            let _ = fs::remove_file(exe);
        }
        for d in self.created.drain(..).rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Removes `p` if it exists (a symlink itself, not what it points to).
fn remove_existing(p: &Path) -> Result<(), Error> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(os("Failed to replace", p)(e)),
        _ => Ok(()),
    }
}

/// The userfaultfd misc device's minor, read before the jail is entered
/// (it is dynamic): from /proc/misc, as Firecracker's jailer reads it, or
/// else from the host's /dev/userfaultfd. None if the host has none.
pub fn host_userfaultfd() -> Option<(u32, u32)> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(misc) = fs::read_to_string("/proc/misc") {
        return misc.lines().find_map(|l| {
            let (minor, name) = l.trim().split_once(' ')?;
            (name.trim() == "userfaultfd")
                .then(|| minor.parse().ok())
                .flatten()
                .map(|minor| (MISC_MAJOR, minor))
        });
    }
    let m = fs::metadata("/dev/userfaultfd").ok()?;
    m.file_type()
        .is_char_device()
        .then(|| (libc::major(m.rdev()), libc::minor(m.rdev())))
}

/// Makes `dir` a real directory (whatever else stands there is replaced),
/// 0700 and owned by uid:gid; done through a descriptor opened without
/// following a symlink.
fn own_directory(dir: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            remove_existing(dir)?;
            fs::create_dir(dir).map_err(os("Failed to create directory", dir))?;
        }
        Err(_) => fs::create_dir(dir).map_err(os("Failed to create directory", dir))?,
    }
    let d = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(os("Failed to open directory", dir))?;
    d.set_permissions(fs::Permissions::from_mode(0o700))
        .map_err(os("Failed to change permissions on", dir))?;
    // SAFETY: fchown on a descriptor this function owns.
    if unsafe { libc::fchown(d.as_raw_fd(), uid, gid) } != 0 {
        return Err(last_os_error("Failed to change owner for", dir));
    }
    Ok(())
}

/// From inside the jail (after `enter`), as Firecracker's jailer: `/`,
/// `/dev`, `/dev/net` and `/run` made 0700 and owned by uid:gid, then
/// /dev/net/tun, /dev/kvm, /dev/urandom and (if the host has it, for the
/// Uffd snapshot backend) /dev/userfaultfd, 0600 and owned by uid:gid.
/// Whatever stood at those paths is replaced; no path can lead out of the
/// jail any more.
pub fn furnish(plan: &Plan, userfaultfd: Option<(u32, u32)>) -> Result<(), Error> {
    for dir in DIRECTORIES {
        own_directory(Path::new(dir), plan.uid, plan.gid)?;
    }
    let uffd = userfaultfd.map(|(major, minor)| ("/dev/userfaultfd", major, minor));
    for (path, major, minor) in DEVICES.into_iter().chain(uffd) {
        let node = Path::new(path);
        remove_existing(node)?;
        let c = cstr(node)?;
        // SAFETY: `c` is a NUL-terminated path; mknod reads it only.
        let rc = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(major, minor),
            )
        };
        if rc != 0 {
            return Err(Error::Jail(format!(
                "Failed to create {path} via mknod inside the jail: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `c` is a NUL-terminated path; lchown reads it only (and
        // would not follow a symlink, though mknod just made the node).
        if unsafe { libc::lchown(c.as_ptr(), plan.uid, plan.gid) } != 0 {
            return Err(last_os_error("Failed to change owner for", node));
        }
    }
    Ok(())
}

/// Writes `pid` (no newline, as Firecracker) to `path` inside the jail, a
/// new file (one an earlier run left is replaced), mode 0666 less the umask.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<(), Error> {
    remove_existing(path)?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(path)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
        .map_err(os("Failed to write to", path))
}

fn mount(src: Option<&Path>, target: &Path, flags: libc::c_ulong) -> Result<(), Error> {
    let t = cstr(target)?;
    let s = src.map(cstr).transpose()?;
    let sp = s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: the paths are NUL-terminated (or null where mount allows it);
    // no filesystem type or data is passed.
    let rc = unsafe { libc::mount(sp, t.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
    if rc != 0 {
        return Err(last_os_error("Failed to mount", target));
    }
    Ok(())
}

/// Makes `root` this process's root in a mount namespace of its own: the
/// host's mounts are unmounted from that namespace and unreachable.
pub fn enter(root: &Path) -> Result<(), Error> {
    // SAFETY: unshare with a flag constant; affects only this process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(last_os_error(
            "Failed to unshare into a new mount namespace for",
            root,
        ));
    }
    // Nothing mounted in here propagates back to the host.
    mount(None, Path::new("/"), libc::MS_SLAVE | libc::MS_REC)?;
    // pivot_root needs the new root to be a mount point.
    mount(Some(root), root, libc::MS_BIND | libc::MS_REC)?;
    std::env::set_current_dir(root).map_err(os("Failed to change directory to", root))?;
    let old = Path::new("old_root");
    fs::create_dir(old).map_err(os("Failed to create directory", &root.join("old_root")))?;
    let dot = cstr(Path::new("."))?;
    let oldc = cstr(old)?;
    // SAFETY: two NUL-terminated relative paths; pivot_root has no libc
    // wrapper, so it is called by number.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), oldc.as_ptr()) } != 0 {
        return Err(last_os_error("Failed to pivot root into", root));
    }
    std::env::set_current_dir("/").map_err(os("Failed to change directory to", Path::new("/")))?;
    let old_abs = cstr(Path::new("/old_root"))?;
    // SAFETY: a NUL-terminated path; a lazy unmount of the old root.
    if unsafe { libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_os_error("Failed to unmount", Path::new("/old_root")));
    }
    fs::remove_dir("/old_root").map_err(os("Failed to remove", Path::new("/old_root")))?;
    Ok(())
}
