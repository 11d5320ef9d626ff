//! Diff snapshots and dirty-page tracking with a test guest that dirties
//! known pages on demand (tests/guests/dirty.S): after a Full snapshot the
//! guest fills 16 pages with a pattern and its virtio-blk device reads 4 KiB
//! into another; the Diff holds exactly those pages (and the few the guest's
//! stack and queue use), merged onto the Full it restores with the guest
//! continuing where it stopped, and chains of Diffs merge likewise.

mod common;

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const MEM_MIB: u64 = 64;
const PAGE: u64 = 4096;
/// Where step N's 16 pattern pages and its read page are (dirty.S).
const PATTERN: u64 = 0x100_0000;
const READS: u64 = 0x180_0000;
const DISK_BYTE: u8 = 0xa5;

/// A VMM with an API socket and its console on a pipe.
fn api_vmm(name: &str) -> (Running, PathBuf) {
    let mut cmd = vmm();
    cmd.stdin(Stdio::piped());
    serve_api(name, cmd)
}

fn put(sock: &Path, path: &str, body: &str) {
    assert_eq!(
        curl(sock, "PUT", path, Some(body)),
        (204, String::new()),
        "PUT {path} {body}"
    );
}

fn patch_vm(sock: &Path, state: &str) {
    let r = curl(
        sock,
        "PATCH",
        "/vm",
        Some(&format!(r#"{{"state": "{state}"}}"#)),
    );
    assert_eq!(r.0, 204, "{}", r.1);
}

fn snapshot(sock: &Path, kind: &str, snap: &Path, mem: &Path) -> (u16, String) {
    curl(
        sock,
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            snap.display(),
            mem.display()
        )),
    )
}

/// The disk the guest reads: 64 KiB of DISK_BYTE.
fn disk(name: &str) -> PathBuf {
    let p = tmp_path(&format!("{name}.img"));
    std::fs::write(&p, vec![DISK_BYTE; 64 << 10]).unwrap();
    p
}

/// Paths `PREFIX-NAME` in the scratch directory, the `.snap` and `.mem` of
/// each of `names` removed first (tmp_path removes what is there, once per
/// file; the returned closure gives the plain paths).
fn scratch(prefix: &'static str, names: &[&str]) -> impl Fn(&str) -> PathBuf {
    for n in names {
        for ext in ["snap", "mem"] {
            tmp_path(&format!("{prefix}-{n}.{ext}"));
        }
    }
    move |s| Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{s}"))
}

/// Boots the dirty guest with `track` and waits for it to be ready.
fn boot(name: &str, track: bool) -> (Running, PathBuf) {
    let (mut vm, sock) = api_vmm(name);
    put(
        &sock,
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, guest("dirty").display()),
    );
    put(
        &sock,
        "/machine-config",
        &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {MEM_MIB}, "track_dirty_pages": {track}}}"#),
    );
    put(
        &sock,
        "/drives/disk",
        &format!(
            r#"{{"drive_id": "disk", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
            disk(name).display()
        ),
    );
    put(&sock, "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(
        vm.wait_for("VMM-GUEST: ready", TIMEOUT),
        "{}",
        vm.stdout_now()
    );
    (vm, sock)
}

/// Takes step `n` (the guest's console input) and checks its line: read
/// status 0 and `bad` wrong bytes among the earlier steps' pages.
fn step(vm: &mut Running, n: u64, bad: u64) {
    vm.type_on_console("s");
    let line = format!("VMM-GUEST: step {n:016x} status 0000000000000000 bad {bad:016x}");
    assert!(
        vm.wait_for(&line, TIMEOUT),
        "no '{line}': {}",
        vm.stdout_now()
    );
}

/// The 4 KiB pages of `file` that hold data (SEEK_DATA/SEEK_HOLE), as guest
/// page numbers (guest memory below the 32-bit hole is the file from 0).
fn data_pages(file: &Path) -> Vec<u64> {
    let f = std::fs::File::open(file).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut pages = Vec::new();
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on a descriptor this test owns.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        pages.extend((data as u64 / PAGE)..(hole as u64).div_ceil(PAGE));
        at = hole;
    }
    pages
}

/// The pages step `n` writes on purpose: its 16 pattern pages and its read page.
fn step_pages(n: u64) -> Vec<u64> {
    let first = (PATTERN + (n - 1) * 0x10000) / PAGE;
    let mut v: Vec<u64> = (first..first + 16).collect();
    v.push((READS + (n - 1) * PAGE) / PAGE);
    v
}

/// Pages the guest writes besides its steps': the stack at 0x8000, the
/// identity page tables at 0x9000-0xefff (the CPU sets their accessed and
/// dirty bits), and its queue, header and status in .bss just past its code
/// at 0x200000.
fn incidental(page: u64) -> bool {
    (0x8..=0xe).contains(&page) || (0x200..0x210).contains(&page)
}

fn read_at(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Asserts that the Diff `mem` holds exactly step `n`'s pages with their
/// contents, plus only incidental ones.
fn assert_diff_holds_step(mem: &Path, n: u64) {
    assert_eq!(std::fs::metadata(mem).unwrap().len(), MEM_MIB << 20);
    let pages = data_pages(mem);
    let want = step_pages(n);
    let missing: Vec<_> = want.iter().filter(|p| !pages.contains(p)).collect();
    let extra: Vec<_> = pages
        .iter()
        .filter(|p| !want.contains(p) && !incidental(**p))
        .collect();
    eprintln!(
        "asserting: the Diff after step {n} holds its 17 pages ({} pages in all, {} incidental)",
        pages.len(),
        pages.len() - want.len()
    );
    assert!(
        missing.is_empty(),
        "pages missing from the Diff: {missing:x?}"
    );
    assert!(
        extra.is_empty(),
        "pages nobody wrote in the Diff: {extra:x?}"
    );
    assert!(pages.len() <= want.len() + 4, "{pages:x?}");
    let pattern = read_at(mem, PATTERN + (n - 1) * 0x10000, 0x10000);
    assert!(pattern.iter().all(|&b| b == n as u8));
    let read = read_at(mem, READS + (n - 1) * PAGE, PAGE as usize);
    assert!(
        read.iter().all(|&b| b == DISK_BYTE),
        "the virtio-blk read reached the Diff"
    );
}

fn rebase(base: &Path, diff: &Path) -> Outcome {
    let mut cmd = vmm();
    cmd.args(["snapshot", "rebase", "--base-mem"])
        .arg(base)
        .arg("--diff-mem")
        .arg(diff);
    run(cmd, Duration::from_secs(30))
}

/// Restores `snap` with `mem` in a fresh VMM, resumed.
fn restore(name: &str, snap: &Path, mem: &Path) -> (Running, PathBuf) {
    let (vm, sock) = api_vmm(name);
    let r = load_snapshot(&sock, snap, mem, true);
    assert_eq!(r, (204, String::new()), "{}", vm.stdout_now());
    (vm, sock)
}

#[test]
fn a_diff_holds_exactly_the_dirtied_pages_and_merged_chains_restore() {
    let f = scratch("diff", &["0", "1", "2", "3", "short", "m1", "m2", "m3"]);
    let (mut vm, sock) = boot("diff-origin", true);
    patch_vm(&sock, "Paused");
    assert_eq!(snapshot(&sock, "Full", &f("0.snap"), &f("0.mem")).0, 204);
    patch_vm(&sock, "Resumed");
    step(&mut vm, 1, 0);
    patch_vm(&sock, "Paused");
    assert_eq!(
        snapshot(&sock, "Diff", &f("1.snap"), &f("1.mem")),
        (204, String::new())
    );
    assert_diff_holds_step(&f("1.mem"), 1);
    patch_vm(&sock, "Resumed");
    step(&mut vm, 2, 0);
    patch_vm(&sock, "Paused");
    assert_eq!(snapshot(&sock, "Diff", &f("2.snap"), &f("2.mem")).0, 204);
    assert_diff_holds_step(&f("2.mem"), 2);
    // A Diff onto a memory file of another size is refused in one line.
    std::fs::write(f("short.mem"), b"not a guest's memory").unwrap();
    let e = fault(snapshot(&sock, "Diff", &f("3.snap"), &f("short.mem")));
    eprintln!("asserting: a Diff onto a file of another size is refused: {e}");
    assert!(e.contains("has 20 bytes") && !e.contains('\n'), "{e}");
    assert_eq!(
        std::fs::read(f("short.mem")).unwrap(),
        b"not a guest's memory"
    );
    vm.signal(libc::SIGKILL);
    drop(vm);

    // Diff 1 merged onto the Full restores with Diff 1's state: the guest's
    // step-1 pages are back (bad 0) and it goes on with step 2.
    std::fs::copy(f("0.mem"), f("m1.mem")).unwrap();
    let out = rebase(&f("m1.mem"), &f("1.mem"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.starts_with("merged "), "{}", out.stdout);
    let (mut clone, _) = restore("diff-clone1", &f("1.snap"), &f("m1.mem"));
    step(&mut clone, 2, 0);
    drop(clone);

    // The chain: Full + Diff 1 + Diff 2, restored with Diff 2's state.
    std::fs::copy(f("0.mem"), f("m2.mem")).unwrap();
    for d in ["1.mem", "2.mem"] {
        assert_eq!(rebase(&f("m2.mem"), &f(d)).code, Some(0));
    }
    let (mut clone, _) = restore("diff-clone2", &f("2.snap"), &f("m2.mem"));
    step(&mut clone, 3, 0);
    drop(clone);

    // Without Diff 1 the chain is broken, and the guest sees it: step 1's
    // 16 pattern pages and its read page are zero (the test can fail).
    std::fs::copy(f("0.mem"), f("m3.mem")).unwrap();
    assert_eq!(rebase(&f("m3.mem"), &f("2.mem")).code, Some(0));
    let (mut clone, _) = restore("diff-clone3", &f("2.snap"), &f("m3.mem"));
    step(&mut clone, 3, 16 * 4096 + 4096);
    drop(clone);

    // A Diff onto a base of another size, and onto itself: one line, exit 1,
    // nothing changed.
    let out = rebase(&f("short.mem"), &f("1.mem"));
    eprintln!(
        "asserting: a mismatched base is refused: {}",
        out.stderr.trim()
    );
    assert_eq!(out.code, Some(1));
    assert!(out
        .stderr
        .contains("applies only to the memory file of the same VM"));
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert_eq!(
        std::fs::read(f("short.mem")).unwrap(),
        b"not a guest's memory"
    );
    let out = rebase(&f("1.mem"), &f("1.mem"));
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("is both the base and the diff"),
        "{}",
        out.stderr
    );
}

#[test]
fn without_tracking_a_diff_holds_every_page_in_core_and_still_merges() {
    // As Firecracker since 1.13: mincore(2) tells which pages the guest has
    // touched since it booted, more than changed since the Full but never
    // fewer (this host has no swap; with swap the VMM refuses).
    let f = scratch("mincore", &["0", "1", "m"]);
    let (mut vm, sock) = boot("mincore-origin", false);
    patch_vm(&sock, "Paused");
    assert_eq!(snapshot(&sock, "Full", &f("0.snap"), &f("0.mem")).0, 204);
    patch_vm(&sock, "Resumed");
    step(&mut vm, 1, 0);
    patch_vm(&sock, "Paused");
    let r = snapshot(&sock, "Diff", &f("1.snap"), &f("1.mem"));
    if swap_on() {
        let e = fault(r);
        assert!(e.contains("swap"), "{e}");
        return;
    }
    assert_eq!(r, (204, String::new()));
    drop(vm);
    let pages = data_pages(&f("1.mem"));
    let missing: Vec<_> = step_pages(1)
        .into_iter()
        .filter(|p| !pages.contains(p))
        .collect();
    eprintln!(
        "asserting: the mincore Diff holds step 1's 17 pages among its {}",
        pages.len()
    );
    assert!(missing.is_empty(), "{missing:x?}");
    std::fs::copy(f("0.mem"), f("m.mem")).unwrap();
    assert_eq!(rebase(&f("m.mem"), &f("1.mem")).code, Some(0));
    let (mut clone, _) = restore("mincore-clone", &f("1.snap"), &f("m.mem"));
    step(&mut clone, 2, 0);
}

/// Whether the host has swap on (/proc/swaps lists more than its header).
fn swap_on() -> bool {
    std::fs::read_to_string("/proc/swaps")
        .map(|s| s.lines().count() > 1)
        .unwrap_or(false)
}
