//! Purpose-built test guests, each proving one VMM mechanism through the real
//! binary under KVM in seconds (see tests/guests/*.S).

mod common;

use std::time::Duration;

use common::{guest, host, run, vmm, Running};

const TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_CRASH: i32 = 3;

#[test]
fn serial_output_reaches_stdout_and_i8042_reset_exits_0() {
    host();
    let mut cmd = vmm();
    cmd.arg("--kernel").arg(guest("hello"));
    let out = run(cmd, TIMEOUT);
    assert_eq!(out.guest_lines(), ["hello from the test guest"], "{out:#?}");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.is_empty(), "{out:#?}");
}

fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("not hex: {s}"))
}

/// Runs the boot-params guest and returns (e820 entries, rsdp, initrd line, cmdline).
fn boot_params(memory: &str, extra: &[&str]) -> (Vec<(u64, u64, u64)>, u64, String, String) {
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("bootparams"))
        .args(["--memory", memory, "--cmdline", "console=ttyS0 hello=world"])
        .args(extra);
    let out = run(cmd, TIMEOUT);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let lines = out.guest_lines();
    let count = lines
        .iter()
        .find_map(|l| l.strip_prefix("e820 entries "))
        .map(parse_hex)
        .expect("entry count");
    let entries: Vec<(u64, u64, u64)> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("e820 "))
        .filter(|l| !l.starts_with("entries"))
        .map(|l| {
            let f: Vec<u64> = l.split(' ').map(parse_hex).collect();
            (f[0], f[1], f[2])
        })
        .collect();
    assert_eq!(entries.len() as u64, count);
    let rsdp = lines
        .iter()
        .find_map(|l| l.strip_prefix("rsdp "))
        .map(parse_hex)
        .unwrap();
    let initrd = lines
        .iter()
        .find_map(|l| l.strip_prefix("initrd "))
        .unwrap()
        .to_string();
    let cmdline = lines
        .iter()
        .find_map(|l| l.strip_prefix("cmdline "))
        .unwrap()
        .to_string();
    (entries, rsdp, initrd, cmdline)
}

#[test]
fn guest_reads_back_e820_that_adds_up_to_memory() {
    host();
    for (memory, bytes) in [("128M", 128u64 << 20), ("5G", 5u64 << 30)] {
        let (e820, rsdp, _, cmdline) = boot_params(memory, &[]);
        let total: u64 = e820.iter().map(|e| e.1).sum();
        assert_eq!(total, bytes, "{memory}: {e820:x?}");
        let usable: u64 = e820.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        assert!(usable >= bytes - (1 << 20), "{memory}: {e820:x?}");
        // Nothing usable inside the 32-bit MMIO hole.
        assert!(
            e820.iter()
                .all(|&(a, s, _)| a + s <= 0xc000_0000 || a >= 0x1_0000_0000),
            "{e820:x?}"
        );
        assert_eq!(rsdp, 0xe0000);
        assert_eq!(cmdline, "console=ttyS0 hello=world");
    }
}

#[test]
fn initrd_is_loaded_where_the_zero_page_says() {
    host();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let initrd = dir.join("initrd-pattern");
    let mut data = b"INITRD!!".to_vec();
    data.resize(3 * 4096 + 17, 0x5a);
    std::fs::write(&initrd, &data).unwrap();
    let (_, _, line, _) = boot_params("64M", &["--initrd", initrd.to_str().unwrap()]);
    let f: Vec<u64> = line.split(' ').map(parse_hex).collect();
    let (addr, size, head) = (f[0], f[1], f[2]);
    assert_eq!(size, data.len() as u64);
    assert_eq!(addr % 4096, 0);
    assert!(addr + size <= 64 << 20 && addr >= 0x100000, "{addr:#x}");
    assert_eq!(head.to_be_bytes(), *b"INITRD!!");
}

#[test]
fn every_vcpu_reports_a_distinct_apic_id() {
    host();
    for cpus in [1u64, 2, 4, 8, 64] {
        let mut cmd = vmm();
        cmd.arg("--kernel")
            .arg(guest("smp"))
            .args(["--cpus", &cpus.to_string()]);
        let out = run(cmd, TIMEOUT);
        assert_eq!(out.code, Some(0), "{out:#?}");
        let mut ids: Vec<u64> = out
            .guest_lines()
            .iter()
            .filter_map(|l| l.strip_prefix("cpu up, apic id "))
            .map(parse_hex)
            .collect();
        ids.sort();
        assert_eq!(ids, (0..cpus).collect::<Vec<_>>(), "{out:#?}");
        let done = out
            .guest_lines()
            .iter()
            .find_map(|l| l.strip_prefix("all cpus up: "))
            .map(parse_hex);
        assert_eq!(done, Some(cpus), "{out:#?}");
    }
}

#[test]
fn triple_fault_exits_with_the_crash_code_and_a_report() {
    host();
    let mut cmd = vmm();
    cmd.arg("--kernel").arg(guest("triple_fault"));
    let out = run(cmd, TIMEOUT);
    assert_eq!(out.guest_lines(), ["about to triple fault"], "{out:#?}");
    assert_eq!(out.code, Some(EXIT_CRASH), "{out:#?}");
    let report: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(report.len(), 1, "{out:#?}");
    assert!(
        report[0].starts_with("vmm: guest crashed: triple fault on vCPU 0, RIP 0x2"),
        "{out:#?}"
    );
    // The faulting instruction is `mov (%rax), %rax`.
    assert!(report[0].contains("instruction bytes 48 8b 00"), "{out:#?}");
}

#[test]
fn acpi_poweroff_through_the_fadt_sleep_register_exits_0() {
    host();
    let mut cmd = vmm();
    cmd.arg("--kernel").arg(guest("acpi_poweroff"));
    let out = run(cmd, TIMEOUT);
    assert_eq!(
        out.guest_lines(),
        ["fadt sleep control register at 0000000000000600"],
        "{out:#?}"
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
}

fn halted_guest(sig: i32) -> common::Outcome {
    let mut cmd = vmm();
    cmd.arg("--kernel").arg(guest("halt")).args(["--cpus", "2"]);
    let mut vm = Running::start(cmd);
    assert!(
        vm.wait_for("VMM-GUEST: halted", TIMEOUT),
        "{}",
        vm.stdout_now()
    );
    let pid = vm.child.id();
    let before = common::cpu_time(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = common::cpu_time(pid) - before;
    // A halted vCPU (and an AP waiting for SIPI) sleeps in KVM: no busy loop.
    assert!(
        used < Duration::from_millis(200),
        "VMM used {used:?} of CPU in 2 s while the guest was halted"
    );
    vm.signal(sig);
    let out = vm.finish(Duration::from_secs(10));
    // The process is gone (finish reaped it) and no thread of it survives.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    out
}

#[test]
fn halted_guest_idles_and_sigterm_stops_it_cleanly() {
    host();
    let out = halted_guest(libc::SIGTERM);
    assert_eq!(out.code, Some(128 + libc::SIGTERM), "{out:#?}");
    assert!(out.stderr.is_empty(), "{out:#?}");
}

#[test]
fn sigint_stops_the_vmm_with_its_own_status() {
    host();
    let out = halted_guest(libc::SIGINT);
    assert_eq!(out.code, Some(128 + libc::SIGINT), "{out:#?}");
}

#[test]
fn pvh_entry_gets_start_info_with_a_memory_map_that_adds_up() {
    host();
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("pvh"))
        .args(["--memory", "96M"]);
    let out = run(cmd, TIMEOUT);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let lines = out.guest_lines();
    assert!(lines.contains(&"pvh entry"), "{out:#?}");
    assert!(
        lines.iter().any(|l| l.starts_with("start_info magic ok")),
        "{out:#?}"
    );
    let total: u64 = lines
        .iter()
        .filter_map(|l| l.strip_prefix("memmap "))
        .map(|l| parse_hex(l.split(' ').nth(1).unwrap()))
        .sum();
    assert_eq!(total, 96 << 20, "{out:#?}");
}

#[test]
fn host_input_reaches_the_guest_through_the_uart() {
    host();
    use std::io::Write;
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("echo"))
        .stdin(std::process::Stdio::piped());
    let mut vm = Running::start(cmd);
    assert!(
        vm.wait_for("ready for input", TIMEOUT),
        "{}",
        vm.stdout_now()
    );
    // More than the UART's 64-byte FIFO, so the VMM's input queue is exercised.
    let text = "the quick brown fox jumps over the lazy dog, twice: the quick brown fox jumps over the lazy dog";
    let mut stdin = vm.child.stdin.take().unwrap();
    writeln!(stdin, "{text}").unwrap();
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.guest_lines().contains(&format!("got {text}").as_str()),
        "{out:#?}"
    );
}

#[test]
fn a_disk_in_use_by_another_vmm_is_refused_and_left_unchanged() {
    host();
    let img = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("locked.img");
    let content: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&img, &content).unwrap();
    let mut first = vmm();
    first
        .arg("--kernel")
        .arg(guest("halt"))
        .arg("--rootfs")
        .arg(&img);
    let mut first = Running::start(first);
    assert!(
        first.wait_for("VMM-GUEST: halted", TIMEOUT),
        "{}",
        first.stdout_now()
    );

    for args in [
        vec!["--rootfs".to_string(), img.display().to_string()],
        vec![
            "--disk".into(),
            format!("path={},readonly=on", img.display()),
        ],
    ] {
        let mut second = vmm();
        second.arg("--kernel").arg(guest("hello")).args(&args);
        let out = run(second, TIMEOUT);
        assert_eq!(out.code, Some(2), "{out:#?}");
        assert!(
            out.stderr.contains("is in use by another process"),
            "{out:#?}"
        );
        assert!(
            out.guest_lines().is_empty(),
            "the second guest must not start: {out:#?}"
        );
    }
    first.signal(libc::SIGTERM);
    let out = first.finish(Duration::from_secs(10));
    assert_eq!(out.code, Some(128 + libc::SIGTERM));
    assert_eq!(std::fs::read(&img).unwrap(), content);
}

/// Runs the virtio-blk driver guest against `disk_spec` until it halts, then
/// SIGKILLs the VMM; returns the guest's report lines.
fn virtio_blk_guest(disk_spec: &str) -> Vec<String> {
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("virtio_blk"))
        .args(["--disk", disk_spec]);
    let mut vm = Running::start(cmd);
    let halted = vm.wait_for("VMM-GUEST: flushed, halting", TIMEOUT);
    // No orderly exit: whatever the guest flushed must already be on the file.
    vm.signal(libc::SIGKILL);
    let out = vm.finish(Duration::from_secs(10));
    assert!(halted, "{out:#?}");
    assert_eq!(out.signal, Some(libc::SIGKILL));
    out.guest_lines().iter().map(|s| s.to_string()).collect()
}

fn disk_image(name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let bytes: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn expect_line(lines: &[String], prefix: &str) -> Vec<String> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {lines:#?}"))
        .split(' ')
        .map(str::to_string)
        .collect()
}

#[test]
fn virtio_blk_guest_driver_reads_writes_and_a_flush_survives_sigkill() {
    host();
    let (img, mut bytes) = disk_image("virtio-rw.img");
    let lines = virtio_blk_guest(&format!("path={},serial=DISK-SERIAL-1", img.display()));
    assert_eq!(
        expect_line(&lines, "get_id status "),
        ["0000000000000000", "DISK-SERIAL-1"]
    );
    let read = expect_line(&lines, "read status ");
    let sum: u64 = bytes[..4096].iter().map(|&b| u64::from(b)).sum();
    assert_eq!(read[0], "0000000000000000", "{lines:#?}");
    assert_eq!(
        parse_hex(&read[1]),
        sum,
        "sectors 0-7 as the guest read them"
    );
    assert_eq!(parse_hex(&read[2]).to_be_bytes(), bytes[..8], "{lines:#?}");
    assert_eq!(expect_line(&lines, "write status "), ["0000000000000000"]);
    assert_eq!(expect_line(&lines, "flush status "), ["0000000000000000"]);
    for (i, b) in bytes[4096..8192].iter_mut().enumerate() {
        *b = ((13 * i + 7) & 0xff) as u8;
    }
    assert_eq!(
        std::fs::read(&img).unwrap(),
        bytes,
        "pattern in sectors 8-15, the rest untouched"
    );
}

#[test]
fn virtio_blk_write_to_a_read_only_disk_fails_and_leaves_the_file() {
    host();
    let (img, bytes) = disk_image("virtio-ro.img");
    let lines = virtio_blk_guest(&format!("path={},readonly=on", img.display()));
    assert_eq!(expect_line(&lines, "read status ")[0], "0000000000000000");
    assert_eq!(
        expect_line(&lines, "write status "),
        ["0000000000000001"],
        "VIRTIO_BLK_S_IOERR"
    );
    assert_eq!(std::fs::read(&img).unwrap(), bytes);
}

#[test]
fn rootfs_adds_root_to_the_cmdline_unless_the_user_named_one() {
    host();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let img = dir.join("cmdline-root.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let data = dir.join("cmdline-data.img");
    std::fs::write(&data, vec![0u8; 4096]).unwrap();
    let cmdline_of = |user: &str| {
        let mut cmd = vmm();
        cmd.arg("--kernel")
            .arg(guest("bootparams"))
            .arg("--rootfs")
            .arg(&img)
            .arg("--disk")
            .arg(format!("path={},readonly=on", data.display()))
            .args(["--cmdline", user]);
        let out = run(cmd, TIMEOUT);
        assert_eq!(out.code, Some(0), "{out:#?}");
        out.guest_lines()
            .iter()
            .find_map(|l| l.strip_prefix("cmdline "))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        cmdline_of("console=ttyS0"),
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 root=/dev/vda rw"
    );
    assert_eq!(
        cmdline_of("console=ttyS0 root=/dev/vdb"),
        "console=ttyS0 root=/dev/vdb virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    );
}
