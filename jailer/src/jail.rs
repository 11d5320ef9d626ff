//! The jail's file system: `<base>/<exec name>/<id>/root` with a copy of the
//! binary and the device nodes it needs, then entered through a new mount
//! namespace and pivot_root, so that the host's file system is gone.

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

/// The jail being built; `remove` undoes what `create` made.
pub struct Jail {
    /// The chroot directory.
    pub root: PathBuf,
    /// Directories created by this run, in creation order.
    created: Vec<PathBuf>,
    /// Files created by this run in directories that existed before it.
    files: Vec<PathBuf>,
}

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

impl Jail {
    /// Creates the chroot directory, copies the binary in and makes the
    /// device nodes, owned by the jail's uid and gid. On failure nothing it
    /// created is left.
    pub fn create(plan: &Plan) -> Result<Jail, Error> {
        let mut jail = Jail {
            root: plan.jail_root(),
            created: Vec::new(),
            files: Vec::new(),
        };
        if let Err(e) = jail.build(plan) {
            jail.remove();
            return Err(e);
        }
        Ok(jail)
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

    fn build(&mut self, plan: &Plan) -> Result<(), Error> {
        let root = self.root.clone();
        // An existing root is used as it is (as Firecracker's jailer does):
        // orchestrators put the kernel and disks there first.
        self.mkdir_all(&root)?;
        let exe = root.join(&plan.exec_name);
        // A copy, not a link: the jailed process shares no pages or inode
        // with another microVM's binary.
        if !crate::args::exists(&exe) {
            self.files.push(exe.clone());
        }
        fs::copy(&plan.exec_file, &exe).map_err(os("copy the exec file to", &exe))?;
        for (path, major, minor) in DEVICES {
            let node = root.join(path);
            if let Some(parent) = node.parent() {
                self.mkdir_all(parent)?;
            }
            let c = cstr(&node)?;
            if crate::args::exists(&node) {
                fs::remove_file(&node).map_err(os("replace", &node))?;
            } else {
                self.files.push(node.clone());
            }
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
        chown(&root, plan.uid, plan.gid)
    }

    /// Removes the files and directories this run created.
    pub fn remove(&mut self) {
        for f in self.files.drain(..) {
            let _ = fs::remove_file(f);
        }
        if let Some(first) = self.created.first() {
            let _ = fs::remove_dir_all(first);
        }
        self.created.clear();
    }
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
