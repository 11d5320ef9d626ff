//! The jail's file system: `<base>/<exec name>/<id>/root`, entered through a
//! new mount namespace and pivot_root so that the host's file system is gone,
//! then furnished from inside with a copy of the binary and the device nodes
//! it needs.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::args::Plan;
use crate::Error;

/// Device nodes made in the jail: path, major, minor.
const DEVICES: [(&str, u32, u32); 3] = [
    ("dev/kvm", 10, 232),
    ("dev/net/tun", 10, 200),
    ("dev/urandom", 1, 9),
];

fn cstr(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Jail(format!("the path {} contains a NUL byte", p.display())))
}

fn os(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let text = format!("cannot {what} {}", p.display());
    move |e| Error::Jail(format!("{text}: {e}"))
}

fn last_os_error(what: &str, p: &Path) -> Error {
    os(what, p)(std::io::Error::last_os_error())
}

/// The jail's directory on the host; `remove` undoes what `create` made.
pub struct Jail {
    /// The chroot directory.
    pub root: PathBuf,
    /// Directories created by this run, in creation order.
    created: Vec<PathBuf>,
}

impl Jail {
    /// Creates the chroot directory (and its missing parents). An existing
    /// root is used as it is, as Firecracker's jailer does: orchestrators put
    /// the kernel and disks there first. Nothing else is written on the
    /// host's side: the binary and the device nodes are made from inside
    /// the jail (`furnish`), where a symlink a previous jailed process left
    /// cannot point outside it.
    pub fn create(plan: &Plan) -> Result<Jail, Error> {
        let mut jail = Jail {
            root: plan.jail_root(),
            created: Vec::new(),
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
            fs::create_dir(&d).map_err(os("create the directory", &d))?;
            self.created.push(d);
        }
        Ok(())
    }

    /// Removes the directories this run created (with what is in them).
    pub fn remove(&mut self) {
        if let Some(first) = self.created.first() {
            let _ = fs::remove_dir_all(first);
        }
        self.created.clear();
    }
}

/// Removes `p` if it exists (a symlink itself, not what it points to).
fn remove_existing(p: &Path) -> Result<(), Error> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(os("replace", p)(e)),
        _ => Ok(()),
    }
}

/// The host's /dev/userfaultfd (a misc device with a dynamic minor), read
/// before the jail is entered: (major, minor), if the host has one.
pub fn host_userfaultfd() -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = fs::metadata("/dev/userfaultfd").ok()?;
    m.file_type()
        .is_char_device()
        .then(|| (libc::major(m.rdev()), libc::minor(m.rdev())))
}

/// From inside the jail (after `enter`): copies the binary in from `exe`
/// (opened on the host), makes /dev/kvm, /dev/net/tun, /dev/urandom and
/// (if the host has it, for the Uffd snapshot backend) /dev/userfaultfd,
/// and gives them and the root to uid:gid. Whatever stood at those paths is
/// replaced; no path can lead out of the jail any more.
pub fn furnish(
    exe: &mut fs::File,
    plan: &Plan,
    userfaultfd: Option<(u32, u32)>,
) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let dest = Path::new("/").join(&plan.exec_name);
    remove_existing(&dest)?;
    // A copy, not a link: the jailed process shares no pages or inode with
    // another microVM's binary.
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&dest)
        .map_err(os("create", &dest))?;
    std::io::copy(exe, &mut out).map_err(os("copy the exec file to", &dest))?;
    drop(out);
    // Real directories for the nodes (a symlink or file there is replaced).
    for dir in ["/dev", "/dev/net"] {
        let dir = Path::new(dir);
        match fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => remove_existing(dir)?,
            Err(_) => {}
        }
        fs::create_dir(dir).map_err(os("create the directory", dir))?;
    }
    let uffd = userfaultfd.map(|(major, minor)| ("dev/userfaultfd", major, minor));
    for (path, major, minor) in DEVICES.into_iter().chain(uffd) {
        let node = Path::new("/").join(path);
        remove_existing(&node)?;
        let c = cstr(&node)?;
        // SAFETY: `c` is a NUL-terminated path; mknod reads it only.
        let rc = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(major, minor),
            )
        };
        if rc != 0 {
            return Err(last_os_error("create the device node", &node));
        }
        chown(&node, plan.uid, plan.gid)?;
    }
    chown(Path::new("/"), plan.uid, plan.gid)
}

fn chown(p: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    let c = cstr(p)?;
    // SAFETY: `c` is a NUL-terminated path; chown reads it only.
    if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
        return Err(last_os_error("change the owner of", p));
    }
    Ok(())
}

fn mount(src: Option<&Path>, target: &Path, flags: libc::c_ulong) -> Result<(), Error> {
    let t = cstr(target)?;
    let s = src.map(cstr).transpose()?;
    let sp = s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: the paths are NUL-terminated (or null where mount allows it);
    // no filesystem type or data is passed.
    let rc = unsafe { libc::mount(sp, t.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
    if rc != 0 {
        return Err(last_os_error("mount", target));
    }
    Ok(())
}

/// Makes `root` this process's root in a mount namespace of its own: the
/// host's mounts are unmounted from that namespace and unreachable.
pub fn enter(root: &Path) -> Result<(), Error> {
    // SAFETY: unshare with a flag constant; affects only this process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(last_os_error("unshare the mount namespace for", root));
    }
    // Nothing mounted in here propagates back to the host.
    mount(None, Path::new("/"), libc::MS_SLAVE | libc::MS_REC)?;
    // pivot_root needs the new root to be a mount point.
    mount(Some(root), root, libc::MS_BIND | libc::MS_REC)?;
    std::env::set_current_dir(root).map_err(os("enter", root))?;
    let old = Path::new("old_root");
    fs::create_dir(old).map_err(os("create", &root.join("old_root")))?;
    let dot = cstr(Path::new("."))?;
    let oldc = cstr(old)?;
    // SAFETY: two NUL-terminated relative paths; pivot_root has no libc
    // wrapper, so it is called by number.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), oldc.as_ptr()) } != 0 {
        return Err(last_os_error("pivot_root into", root));
    }
    std::env::set_current_dir("/").map_err(os("enter", Path::new("/")))?;
    let old_abs = cstr(Path::new("/old_root"))?;
    // SAFETY: a NUL-terminated path; a lazy unmount of the old root.
    if unsafe { libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_os_error("unmount", Path::new("/old_root")));
    }
    fs::remove_dir("/old_root").map_err(os("remove", Path::new("/old_root")))?;
    Ok(())
}
