//! A page fault handler for Firecracker's Uffd memory backend, written the
//! way a Firecracker user writes one: it listens on a Unix socket, receives
//! the guest memory layout (JSON) and the userfaultfd (SCM_RIGHTS) from the
//! VMM, maps the snapshot's memory file, and answers each fault by copying
//! the page in (UFFDIO_COPY), or a zero page for a range the balloon
//! removed (UFFD_EVENT_REMOVE).

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const PAGE: u64 = 4096;

/// The running handler; it stops when dropped.
pub struct Handler {
    /// Faults served from the file.
    pub copied: Arc<AtomicU64>,
    /// Faults served with a zero page (removed by the balloon).
    pub zeroed: Arc<AtomicU64>,
    /// UFFD_EVENT_REMOVE events.
    pub removes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Region {
    base: u64,
    size: u64,
    offset: u64,
}

/// Serves the memory in `mem_file` to the VMM that connects to `socket`.
pub fn serve(socket: &Path, mem_file: &Path) -> Handler {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).expect("the handler binds its socket");
    let file = std::fs::File::open(mem_file).expect("the memory file opens");
    let (copied, zeroed, removes) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counters = (
        copied.clone(),
        zeroed.clone(),
        removes.clone(),
        stop.clone(),
    );
    let thread = std::thread::spawn(move || {
        let (copied, zeroed, removes, stop) = counters;
        listener.set_nonblocking(true).unwrap();
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if !stop.load(Ordering::SeqCst) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(_) => return,
            }
        };
        stream.set_nonblocking(false).unwrap();
        let (layout, uffd) = receive(&stream);
        let regions: Vec<Region> = serde_json::from_slice::<serde_json::Value>(&layout)
            .expect("the layout is JSON")
            .as_array()
            .expect("an array")
            .iter()
            .map(|m| {
                assert_eq!(m["page_size"], PAGE, "{m}");
                Region {
                    base: m["base_host_virt_addr"].as_u64().unwrap(),
                    size: m["size"].as_u64().unwrap(),
                    offset: m["offset"].as_u64().unwrap(),
                }
            })
            .collect();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a private read-only mapping of a file this thread holds open.
        let src = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(src, libc::MAP_FAILED);
        let mut removed: HashSet<u64> = HashSet::new();
        // Faults the kernel asked to retry (EAGAIN: an event such as a
        // remove is pending, and it must be read before the fault can be
        // served).
        let mut pending: Vec<u64> = Vec::new();
        let mut uffd_file = std::fs::File::from(uffd);
        let fd = uffd_file.as_raw_fd();
        let find = |page: u64| {
            let r = regions
                .iter()
                .find(|r| (r.base..r.base + r.size).contains(&page))
                .expect("a fault inside guest memory");
            src as u64 + r.offset + (page - r.base)
        };
        while !stop.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let wait = if pending.is_empty() { 50 } else { 1 };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, wait) } > 0;
            let mut msg = [0u8; 32];
            if ready && uffd_file.read_exact(&mut msg).is_ok() {
                let word = |at: usize| u64::from_le_bytes(msg[at..at + 8].try_into().unwrap());
                match msg[0] {
                    UFFD_EVENT_PAGEFAULT => pending.push(word(16) & !(PAGE - 1)),
                    UFFD_EVENT_REMOVE => {
                        let (start, end) = (word(8), word(16));
                        removed.extend((start..end).step_by(PAGE as usize));
                        removes.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
            pending.retain(|&page| {
                let zero = removed.contains(&page);
                let mut z = [page, PAGE, 0, 0];
                let mut c = [page, find(page), PAGE, 0, 0];
                // SAFETY: UFFDIO_ZEROPAGE takes a uffdio_zeropage (range,
                // mode, result) and UFFDIO_COPY a uffdio_copy (dst, src, len,
                // mode, result), which `z` and `c` are laid out as; the source
                // is a page of the mapped file.
                let r = unsafe {
                    if zero {
                        libc::ioctl(fd, UFFDIO_ZEROPAGE, z.as_mut_ptr())
                    } else {
                        libc::ioctl(fd, UFFDIO_COPY, c.as_mut_ptr())
                    }
                };
                let err = std::io::Error::last_os_error().raw_os_error();
                if r != 0 && err == Some(libc::EAGAIN) {
                    return true;
                }
                // EEXIST: the page is there already.
                assert!(
                    r == 0 || err == Some(libc::EEXIST),
                    "serving {page:#x}: {err:?}"
                );
                if zero {
                    removed.remove(&page);
                    zeroed.fetch_add(1, Ordering::SeqCst);
                } else {
                    copied.fetch_add(1, Ordering::SeqCst);
                }
                false
            });
        }
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(src, len) };
    });
    Handler {
        copied,
        zeroed,
        removes,
        stop,
        thread: Some(thread),
    }
}

/// One message and the descriptor that came with it.
fn receive(stream: &std::os::unix::net::UnixStream) -> (Vec<u8>, OwnedFd) {
    let mut buf = vec![0u8; 16384];
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; it is pointed at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg into the buffers `msg` describes.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) };
    assert!(n > 0, "recvmsg: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel filled `control` with the message's headers.
    let fd = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null(), "no descriptor came");
        assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>())
    };
    buf.truncate(n as usize);
    // SAFETY: SCM_RIGHTS gave this process a new descriptor it now owns.
    (buf, unsafe { OwnedFd::from_raw_fd(fd) })
}
