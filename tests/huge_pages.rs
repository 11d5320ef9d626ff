//! `huge_pages` as Firecracker's: guest memory on 2 MiB hugetlbfs pages
//! (reserved from the host's pool when the VM starts, refused in one line
//! when the pool is too small) or advised to use transparent huge pages, with
//! a counting test guest; and the refusals of what cannot work.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn configure(sock: &Path, mem_mib: u32, huge: &str) -> (u16, String) {
    let boot = format!(
        r#"{{"kernel_image_path": "{}"}}"#,
        guest("counter").display()
    );
    assert_eq!(curl(sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    curl(
        sock,
        "PUT",
        "/machine-config",
        Some(&format!(
            r#"{{"vcpu_count": 1, "mem_size_mib": {mem_mib}, "huge_pages": "{huge}"}}"#
        )),
    )
}

fn start(sock: &Path) -> (u16, String) {
    curl(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    )
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Sets the host's pool of 2 MiB pages, and puts the old size back on drop.
struct Pool(String);

impl Pool {
    fn set(pages: u64) -> Pool {
        let old = std::fs::read_to_string(NR_HUGEPAGES).unwrap();
        std::fs::write(NR_HUGEPAGES, pages.to_string()).unwrap();
        Pool(old.trim().to_string())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, &self.0);
    }
}

#[test]
fn a_guest_runs_on_2m_pages_from_the_pool_and_a_small_pool_is_refused() {
    // One test: the pool is the host's, shared by everything that runs.
    let pool = Pool::set(0);
    let (vm, sock) = api_vmm("huge-none", &[]);
    assert_eq!(configure(&sock, 64, "2M"), (204, String::new()));
    let e = fault(start(&sock));
    eprintln!("asserting: no pool, a one-line refusal: {e}");
    assert!(
        e.contains("0 free 2 MiB huge pages") && e.contains("needs 32") && !e.contains('\n'),
        "{e}"
    );
    vm.signal(libc::SIGKILL);
    drop(vm);

    drop(pool);
    let pool = Pool::set(64);
    if meminfo("HugePages_Free") < 32 {
        eprintln!("skipped: the host could not give 32 huge pages");
        return;
    }
    let (mut vm, sock) = api_vmm("huge-2m", &[]);
    assert_eq!(configure(&sock, 64, "2M"), (204, String::new()));
    let before = meminfo("HugePages_Free") - meminfo("HugePages_Rsvd");
    assert_eq!(start(&sock), (204, String::new()), "{}", vm.stdout_now());
    assert!(
        vm.wait_for("VMM-GUEST: count 0000000000000003", TIMEOUT),
        "{}",
        vm.stdout_now()
    );
    let after = meminfo("HugePages_Free") - meminfo("HugePages_Rsvd");
    eprintln!("asserting: the guest took its 32 pages from the pool ({before} -> {after} free and unreserved)");
    assert_eq!(before - after, 32);
    let (code, config) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    assert!(config.contains(r#""huge_pages":"2M""#), "{config}");
    vm.signal(libc::SIGKILL);
    drop(vm);
    drop(pool);
}

#[test]
fn transparent_huge_pages_are_advised_and_odd_sizes_and_files_refused() {
    let (mut vm, sock) = api_vmm("huge-thp", &[]);
    // An odd size cannot be backed by 2 MiB pages.
    let e = fault(configure(&sock, 63, "Transparent"));
    assert!(e.contains("not a multiple of 2 MiB"), "{e}");
    assert_eq!(configure(&sock, 64, "Transparent"), (204, String::new()));
    let enabled =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if enabled.contains("[never]") || enabled.is_empty() {
        let e = fault(start(&sock));
        assert!(e.contains("transparent huge pages"), "{e}");
        return;
    }
    assert_eq!(start(&sock), (204, String::new()));
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000003", TIMEOUT));
    // The guest's 64 MiB mapping carries MADV_HUGEPAGE ("hg").
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vm.pid())).unwrap();
    let advised = smaps.split("\n").collect::<Vec<_>>().windows(30).any(|w| {
        w[0].contains(" rw-p ")
            && w.iter()
                .any(|l| l.starts_with("Size:") && l.contains(" 65536 kB"))
            && w.iter()
                .any(|l| l.starts_with("VmFlags:") && l.contains(" hg"))
    });
    eprintln!("asserting: the guest memory mapping is advised for huge pages");
    assert!(advised, "no 64 MiB mapping with VmFlags hg");
    let (snap, mem) = (tmp_path("huge-thp.snap"), tmp_path("huge-thp.mem"));
    pause_and_snapshot(&sock, &snap, &mem);
    drop(vm);
    // hugetlbfs from a memory file is refused (Firecracker's rule: Uffd only).
    let (vm, sock) = api_vmm("huge-load", &[]);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "huge_pages": "2M"}}"#,
        snap.display(),
        mem.display()
    );
    let e = fault(curl(&sock, "PUT", "/snapshot/load", Some(&body)));
    assert!(e.contains("Please use uffd"), "{e}");
    drop(vm);
    // "Snapshot" keeps the snapshot's Transparent.
    let (vm, sock) = api_vmm("huge-load2", &[]);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "huge_pages": "Snapshot", "resume_vm": true}}"#,
        snap.display(),
        mem.display()
    );
    assert_eq!(
        curl(&sock, "PUT", "/snapshot/load", Some(&body)),
        (204, String::new())
    );
    let (_, config) = curl(&sock, "GET", "/vm/config", None);
    assert!(config.contains(r#""huge_pages":"Transparent""#), "{config}");
    vm.signal(libc::SIGKILL);
}
