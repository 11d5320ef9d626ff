//! Linux guests: the project's own kernel (resources/build-kernel.sh) and busybox
//! initramfs (resources/build-initramfs.sh), booted by the real binary. They prove
//! the VMM against an implementation nobody here wrote.
//!
//! On the PVM host (docs/TESTING-ON-PVM.md) the kernel carries the test-only patches
//! that let user space run, and gets the parameters that avoid instructions PVM's
//! emulator lacks; a boot that dies of an emulation failure is retried once and
//! reported as such. Linux guests run one at a time.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use common::{
    host, initramfs, kernel, linux_cmdline, linux_timeout, resource, run_linux, vmm, Host, Outcome,
};

const MARKER: &str = "VMM-TEST: userspace up";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Boots `args`; on PVM, retries once when the emulator fails, saying so.
fn boot(host: Host, args: &[&str]) -> Outcome {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let make = || {
        let mut cmd = vmm();
        cmd.args(args).args(["--log-level", "info"]);
        cmd
    };
    run_linux(host, make, linux_timeout(host))
}

/// Sum of the e820 ranges the kernel printed ("BIOS-e820: [mem 0xA-0xB] kind").
fn e820_total(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.split("BIOS-e820: [mem ").nth(1))
        .map(|r| {
            let range = r.split(']').next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap();
            let b = u64::from_str_radix(b.trim_start_matches("0x"), 16).unwrap();
            b - a + 1
        })
        .sum()
}

/// How an initramfs boot is asked to end, and what the VMM must then report.
struct Ending {
    param: &'static str,
    console: &'static str,
    exit: &'static str,
}

const POWEROFF: Ending = Ending {
    param: "vmm.test=poweroff",
    console: "reboot: Power down",
    exit: "guest ended: PowerOff",
};
const REBOOT: Ending = Ending {
    param: "vmm.test=reboot",
    console: "reboot: Restarting system",
    exit: "guest ended: Reset",
};

/// Boots `kernel` with the busybox initramfs on `cpus` vCPUs and `mib` MiB and
/// checks the banner, the e820 map, the CPU count, the user-space marker and the
/// ending.
fn boot_initramfs_to_userspace(kernel_name: &str, cpus: u32, mib: u64, ending: Ending) {
    let host = host();
    let (k, i) = (kernel(kernel_name), initramfs());
    let cmd = linux_cmdline(host, ending.param);
    let (cpus_arg, mem_arg) = (cpus.to_string(), format!("{mib}M"));
    let out = boot(
        host,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--cpus",
            &cpus_arg,
            "--memory",
            &mem_arg,
            "--cmdline",
            &cmd,
        ],
    );
    let brought_up = if cpus == 1 {
        "smp: Brought up 1 node, 1 CPU".to_string()
    } else {
        format!("smp: Brought up 1 node, {cpus} CPUs")
    };
    eprintln!("asserting: {kernel_name} banner, e820 = {mib} MiB, {brought_up:?}, user-space marker, {:?}, exit 0", ending.exit);
    out.assert_console(&["Linux version 6.1", &brought_up, MARKER, ending.console]);
    assert_eq!(e820_total(&out.stdout), mib << 20, "{}", out.stdout);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stderr.contains(ending.exit), "stderr: {}", out.stderr);
}

#[test]
fn vmlinux_boots_to_userspace_and_acpi_poweroff_exits_0() {
    boot_initramfs_to_userspace("vmlinux", 1, 256, POWEROFF);
}

#[test]
fn bzimage_boots_two_cpus_to_userspace_and_reboot_exits_0() {
    boot_initramfs_to_userspace("bzImage", 2, 512, REBOOT);
}

#[test]
fn four_cpus_come_up_and_panic_reboot_exits_0() {
    let host = host();
    let k = kernel("vmlinux");
    // No initrd and no root disk: the kernel panics, and panic=-1 reboot=k turn
    // the panic into an i8042 reset.
    let cmd = linux_cmdline(host, "");
    let out = boot(
        host,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--cpus",
            "4",
            "--memory",
            "256M",
            "--cmdline",
            &cmd,
        ],
    );
    eprintln!("asserting: 4 CPUs brought up, kernel panic, reboot, exit 0");
    out.assert_console(&[
        "smp: Brought up 1 node, 4 CPUs",
        "Kernel panic - not syncing",
    ]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("guest ended: Reset"),
        "stderr: {}",
        out.stderr
    );
}

fn rootfs_copy(name: &str) -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    let pristine = IMAGE.get_or_init(|| resource("build-rootfs.sh"));
    let copy = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::copy(pristine, &copy).unwrap();
    copy
}

fn mount_count(image: &Path) -> u64 {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .expect("dumpe2fs (e2fsprogs) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Mount count:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("dumpe2fs prints the mount count")
}

#[test]
fn ext4_rootfs_read_only_disk_and_user_space_dd_to_a_third_disk() {
    let host = host();
    let k = kernel("vmlinux");
    let root = rootfs_copy("linux-rootfs.ext4");
    let before = mount_count(&root);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    // A pseudo-random pattern the guest copies from the read-only disk to the third.
    let mut x: u32 = 0x1234_5678;
    let pattern: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let ro = dir.join("linux-pattern.img");
    std::fs::write(&ro, &pattern).unwrap();
    let out_disk = dir.join("linux-out.img");
    std::fs::write(&out_disk, vec![0u8; 1 << 20]).unwrap();

    let cmd = linux_cmdline(host, "vmm.copy=vdb:vdc:16");
    let ro_spec = format!("path={},readonly=on,id=PATTERN", ro.display());
    let out_spec = format!("path={}", out_disk.display());
    let out = boot(
        host,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--rootfs",
            root.to_str().unwrap(),
            "--disk",
            &ro_spec,
            "--disk",
            &out_spec,
            "--memory",
            "256M",
            "--cmdline",
            &cmd,
        ],
    );
    eprintln!("asserting: vda/vdb/vdc sizes, ext4 mounted rw (mount count +1), init from the rootfs, dd vdb->vdc byte-exact, vdb unchanged, exit 0");
    let blocks = std::fs::metadata(&root).unwrap().len() / 512;
    out.assert_console(&[
        &format!("[vda] {blocks} 512-byte logical blocks"),
        "[vdb] 128 512-byte logical blocks",
        "[vdc] 2048 512-byte logical blocks",
        "EXT4-fs (vda): mounted filesystem",
        "VMM-TEST: rootfs init up",
        "VMM-TEST: copied 16 blocks vdb -> vdc",
    ]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("guest ended: PowerOff"),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(
        mount_count(&root),
        before + 1,
        "the guest's ext4 mount reached the host file"
    );
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        pattern,
        "read-only disk unchanged"
    );
    let written = std::fs::read(&out_disk).unwrap();
    assert_eq!(
        &written[..pattern.len()],
        &pattern[..],
        "guest dd reached the host file byte-exact"
    );
    assert!(written[pattern.len()..].iter().all(|&b| b == 0));
}
