//! Firecracker's `Uffd` memory backend for a snapshot load: guest memory is
//! anonymous and registered with a userfaultfd, and the VMM hands that
//! descriptor and the memory layout to a page fault handler listening on a
//! Unix socket (`backend_path`). The handler then serves every first touch
//! of a page, from wherever it keeps the memory (a file, the network, a
//! cache shared by many clones). The message is Firecracker's: one JSON
//! array of `{base_host_virt_addr, size, offset, page_size, page_size_kib}`
//! (page sizes in bytes, as Firecracker sends them), with the descriptor in
//! SCM_RIGHTS. UFFD_FEATURE_EVENT_REMOVE is asked for, so the handler learns
//! of pages the balloon drops.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use devices::memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{Error, MemoryRegionState};

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFD_API: u64 = 0xaa;
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Page size of anonymous guest memory.
const PAGE_SIZE: u64 = 4096;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// One region as the page fault handler learns of it.
#[derive(serde::Serialize)]
struct Mapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
    page_size_kib: u64,
}

fn uffd_error(path: &Path, what: &str, err: std::io::Error) -> Error {
    Error::Map {
        path: path.display().to_string(),
        err: format!("{what}: {err}"),
    }
}

/// Anonymous guest memory laid out as `regions`, registered with a new
/// userfaultfd that is sent, with the layout, to the handler at `socket`.
/// Returns the memory and the VMM's copy of the descriptor.
pub fn guest_memory(
    socket: &Path,
    regions: &[MemoryRegionState],
    backing: crate::vstate::memory::Backing,
) -> Result<(GuestMemoryMmap, OwnedFd), Error> {
    let ranges = regions
        .iter()
        .map(|r| {
            usize::try_from(r.size)
                .map(|s| (GuestAddress(r.gpa), s))
                .map_err(|e| uffd_error(socket, "a region's size", std::io::Error::other(e)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mem = crate::vstate::memory::from_ranges(&ranges, backing)
        .map_err(|e| Error::State(e.to_string()))?;
    // The unit the handler must copy in (UFFDIO_COPY of a whole huge page).
    let page_size = if backing.huge_pages == crate::config::HugePages::Hugetlbfs2M {
        2 << 20
    } else {
        PAGE_SIZE
    };

    let uffd = new_userfaultfd().map_err(|e| uffd_error(socket, "userfaultfd", e))?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_EVENT_REMOVE,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a uffdio_api, which `api` is, on a
    // userfaultfd this function owns.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(uffd_error(
            socket,
            "UFFDIO_API",
            std::io::Error::last_os_error(),
        ));
    }
    let mut mappings = Vec::with_capacity(regions.len());
    for (region, state) in mem.iter().zip(regions) {
        let base = region.as_ptr() as u64;
        let mut reg = UffdioRegister {
            start: base,
            len: region.len(),
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register, which
        // `reg` is; the range is a mapping of guest memory this process made.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(uffd_error(
                socket,
                "UFFDIO_REGISTER",
                std::io::Error::last_os_error(),
            ));
        }
        mappings.push(Mapping {
            base_host_virt_addr: base,
            size: region.len(),
            offset: state.offset,
            page_size,
            page_size_kib: page_size,
        });
    }
    let message = serde_json::to_vec(&mappings)
        .map_err(|e| uffd_error(socket, "the layout", std::io::Error::other(e)))?;
    let stream = UnixStream::connect(socket)
        .map_err(|e| uffd_error(socket, "connecting to the page fault handler", e))?;
    send_with_fd(&stream, &message, uffd.as_raw_fd())
        .map_err(|e| uffd_error(socket, "sending to the page fault handler", e))?;
    Ok((mem, uffd))
}

/// A new userfaultfd that may serve faults the kernel takes on the VMM's
/// behalf (KVM's): from the system call where the process may (root, or
/// vm.unprivileged_userfaultfd=1), else from /dev/userfaultfd (Linux 6.1+;
/// access by file permission, which is how a jailed VMM gets one: the
/// jailer makes the node in the jail, as Firecracker's does).
fn new_userfaultfd() -> std::io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by userfaultfd; no one else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let syscall_err = std::io::Error::last_os_error();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| syscall_err)?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns
    // a new descriptor or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the ioctl; no one else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `data` with descriptor `fd` in one message.
fn send_with_fd(stream: &UnixStream, data: &[u8], fd: i32) -> std::io::Result<()> {
    let iov = [IoSlice::new(data)];
    // Room for one cmsghdr carrying one int, aligned as CMSG_SPACE wants.
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid; the fields set below point at
    // `iov` and `control`, which outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    // SAFETY: msg_control points at `control`, which is at least
    // CMSG_SPACE(sizeof(int)) bytes (32 >= 24) and 8-byte aligned, so the
    // first header and its data lie within it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
    }
    // SAFETY: `msg` is a valid msghdr whose buffers are alive for the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(std::io::Error::other("the message was sent in part"));
    }
    Ok(())
}
