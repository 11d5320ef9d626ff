//! Firecracker's Uffd memory backend: a clone of the suite's golden Linux
//! guest restored with `mem_backend: {"backend_type": "Uffd"}` gets its
//! memory page by page from a page fault handler (tests/common/uffd.rs, in
//! this process) that serves the snapshot's memory file. The guest runs a
//! command and reads its disk; a balloon inflate sends the handler
//! UFFD_EVENT_REMOVE, and the pages it removed come back as zero pages.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::golden::{self, disk_byte, Netns};
use common::{curl, host, tmp_path, uffd};

#[test]
fn a_clone_runs_on_memory_served_by_a_page_fault_handler() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("uffd");
    ns.add_tap("vmmtap12", None);
    let socket = tmp_path("uffd-handler.sock");
    let handler = uffd::serve(&socket, &g.mem);
    let t = Instant::now();
    let (mut vm, sock) = golden::restore_from(&ns, "vmmtap12", &g, "uffd", &[], ("Uffd", &socket));
    let load = t.elapsed();
    let answer = golden::shell(
        &mut vm,
        "UFFD",
        1,
        "echo $((6 * 7))-$(dd if=/dev/vda bs=1 skip=1000 count=1 2>/dev/null | od -An -tu1 | tr -d ' ')",
    );
    let after_command = handler.copied.load(Ordering::SeqCst);
    // The balloon takes 8 MiB: the handler hears of the removed pages.
    assert_eq!(
        curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 8}"#)),
        (204, String::new())
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while handler.removes.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no UFFD_EVENT_REMOVE");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#)),
        (204, String::new())
    );
    std::thread::sleep(Duration::from_secs(3));
    eprintln!(
        "after the balloon: {:?}; copied {} zeroed {} removes {}",
        curl(&sock, "GET", "/balloon/statistics", None),
        handler.copied.load(Ordering::SeqCst),
        handler.zeroed.load(Ordering::SeqCst),
        handler.removes.load(Ordering::SeqCst)
    );
    let again = golden::shell(&mut vm, "UFFD", 2, "echo $((7 * 6))");
    vm.type_on_console("poweroff -f\n");
    let outcome = vm.finish(Duration::from_secs(120));
    let (copied, zeroed, removes) = (
        handler.copied.load(Ordering::SeqCst),
        handler.zeroed.load(Ordering::SeqCst),
        handler.removes.load(Ordering::SeqCst),
    );
    drop(handler);
    eprintln!(
        "uffd: load {load:?}; {after_command} pages copied by the first command's answer, {copied} in all; {removes} remove events; {zeroed} zero pages"
    );
    eprintln!("asserting: the command's answer and the disk byte, pages served by the handler, remove events after an inflate, a second command after the deflate, exit 0");
    assert_eq!(answer, format!("42-{}", disk_byte(1000)));
    assert_eq!(again, "42");
    assert!(
        after_command > 100,
        "only {after_command} pages were served"
    );
    assert!(removes > 0);
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}
