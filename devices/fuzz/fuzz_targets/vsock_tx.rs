//! Guest-controlled virtio-vsock transmit chains: the fuzz input is written
//! over the transmit queue's descriptor table, available ring and buffers,
//! so headers, lengths, operations, ports and credit are the guest's. A Unix
//! listener stands at one host port so that connections can be made. The
//! device must never panic, hang, read outside guest memory or buffer
//! without bound; the receive queue (with room for answers) is served after.
#![no_main]

mod common;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use common::{queue, NoIrq};
use devices::virtio::vsock::muxer::Muxer;
use devices::virtio::vsock::Vsock;
use devices::virtio::{Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use devices::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x40000;
const QSIZE: u16 = 16;

/// A directory with a listener at host port 1024 (`v.sock_1024`).
fn dir() -> &'static (PathBuf, UnixListener) {
    static DIR: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vmm-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let l = UnixListener::bind(d.join("v.sock_1024")).unwrap();
        l.set_nonblocking(true).unwrap();
        (d, l)
    })
}

fuzz_target!(|data: &[u8]| {
    let (d, listener) = dir();
    // Accepted host ends are dropped at once: the device sees them close.
    while listener.accept().is_ok() {}
    let mem = devices::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)], false).unwrap();
    // Transmit rings at 0x8000 (descriptors) and 0x9000 (available ring);
    // the rest of the input is buffer memory from 0x10000. Receive buffers:
    // a ring at 0x1000 left empty, so answers wait in the device (bounded).
    let (desc, rest) = data.split_at(data.len().min(16 * QSIZE as usize));
    let (avail, bufs) = rest.split_at(rest.len().min(4 + 2 * QSIZE as usize));
    mem.write_slice(desc, GuestAddress(0x8000)).unwrap();
    mem.write_slice(avail, GuestAddress(0x9000)).unwrap();
    mem.write_slice(&bufs[..bufs.len().min(0x20000)], GuestAddress(0x10000))
        .unwrap();
    let uds = d.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let mut dev = Vsock::new(Muxer::new(3, &uds).unwrap());
    dev.activate(
        mem,
        vec![
            queue(0x1000, QSIZE, false),
            queue(0x8000, QSIZE, false),
            queue(0x4000, QSIZE, false),
        ],
        Interrupt::new(Arc::new(NoIrq)),
    )
    .unwrap();
    let _ = dev.process_queue(1);
    let _ = dev.process_backend();
    let _ = dev.process_queue(0);
});
