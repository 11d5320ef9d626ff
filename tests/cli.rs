//! Bad input: one line on stderr naming the input and the fix, exit status 2,
//! never a panic. Runs the real binary.

mod common;

use std::time::Duration;

use common::{guest, run, vmm};

const EXIT_USAGE: i32 = 2;

fn assert_usage_error(args: &[&str], mentions: &[&str]) {
    let mut cmd = vmm();
    cmd.args(args);
    let out = run(cmd, Duration::from_secs(30));
    assert_eq!(out.code, Some(EXIT_USAGE), "{args:?}: {out:#?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: want one line: {out:#?}");
    assert!(lines[0].starts_with("vmm: error: "), "{args:?}: {out:#?}");
    for m in mentions {
        assert!(
            lines[0].contains(m),
            "{args:?}: {m:?} not in {:?}",
            lines[0]
        );
    }
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"));
    assert!(out.stdout.is_empty(), "{args:?}: {out:#?}");
}

fn tmp(name: &str, bytes: &[u8]) -> String {
    let p = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn kernel_missing_directory_empty_or_not_a_kernel() {
    assert_usage_error(
        &["--kernel", "/nonexistent/vmlinux"],
        &["/nonexistent/vmlinux", "Check the path"],
    );
    assert_usage_error(&["--kernel", "/"], &["'/'", "is a directory"]);
    let empty = tmp("empty-kernel", b"");
    assert_usage_error(&["--kernel", &empty], &[&empty, "is empty"]);
    let text = tmp("text-kernel", b"#!/bin/sh\necho hi\n");
    assert_usage_error(
        &["--kernel", &text],
        &[&text, "neither an ELF vmlinux nor a bzImage"],
    );
}

#[test]
fn truncated_kernels_are_rejected() {
    let elf = std::fs::read(guest("hello")).unwrap();
    let cut = tmp("truncated.elf", &elf[..100]);
    assert_usage_error(&["--kernel", &cut], &[&cut, "truncated or malformed"]);
    // A bzImage header whose protected-mode part is missing.
    let mut bz = vec![0u8; 0x300];
    bz[0x1f1] = 4;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x211] = 1;
    bz[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes());
    bz[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    let bz = tmp("truncated.bzImage", &bz);
    assert_usage_error(&["--kernel", &bz], &[&bz, "truncated or malformed"]);
}

#[test]
fn memory_zero_absurd_or_unparsable() {
    let k = guest("hello");
    let k = k.to_str().unwrap();
    assert_usage_error(
        &["--kernel", k, "--memory", "0"],
        &["--memory 0", "between"],
    );
    assert_usage_error(
        &["--kernel", k, "--memory", "99999G"],
        &["--memory 99999G", "between"],
    );
    assert_usage_error(
        &["--kernel", k, "--memory", "lots"],
        &["--memory 'lots'", "e.g. 512M"],
    );
}

#[test]
fn cpus_zero_or_too_many() {
    let k = guest("hello");
    let k = k.to_str().unwrap();
    assert_usage_error(
        &["--kernel", k, "--cpus", "0"],
        &["--cpus 0", "between 1 and"],
    );
    assert_usage_error(&["--kernel", k, "--cpus", "1000"], &["--cpus 1000"]);
    assert_usage_error(&["--kernel", k, "--cpus", "two"], &["two", "--help"]);
}

#[test]
fn initrd_missing_or_too_big() {
    let k = guest("hello");
    let k = k.to_str().unwrap();
    assert_usage_error(
        &["--kernel", k, "--initrd", "/nonexistent/initrd"],
        &["initrd '/nonexistent/initrd'"],
    );
    let big = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("initrd-20M");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(20 << 20).unwrap();
    let big = big.to_str().unwrap();
    assert_usage_error(
        &["--kernel", k, "--memory", "16M", "--initrd", big],
        &[big, "does not fit", "--memory"],
    );
}

#[test]
fn cmdline_longer_than_the_kernel_accepts() {
    let k = guest("hello");
    let long = "x".repeat(4000);
    assert_usage_error(
        &["--kernel", k.to_str().unwrap(), "--cmdline", &long],
        &["4000 bytes", "shorten --cmdline"],
    );
}

#[test]
fn unknown_or_missing_arguments() {
    // Without arguments vmm serves Firecracker's API on its default socket;
    // VM flags without a kernel are a usage error.
    assert_usage_error(&["--memory", "1G"], &["--kernel"]);
    assert_usage_error(&["--kernel", "x", "--bogus"], &["--bogus"]);
    assert_usage_error(
        &["--kernel", "x", "--rootf", "d"],
        &["a similar argument exists: '--rootfs'"],
    );
    // Firecracker's flags only: Firecracker's exit code for argument parsing.
    let out = run(
        {
            let mut c = vmm();
            c.arg("--bogus");
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(153), "{out:#?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:#?}");
    assert!(out.stderr.contains("--bogus"), "{out:#?}");
}

#[test]
fn bad_disks_are_refused_before_the_guest_starts() {
    let k = guest("hello");
    let k = k.to_str().unwrap();
    assert_usage_error(
        &["--kernel", k, "--rootfs", "/nonexistent/disk.img"],
        &["/nonexistent/disk.img", "Cannot open disk image"],
    );
    assert_usage_error(
        &["--kernel", k, "--disk", "path=/"],
        &["'/'", "is a directory"],
    );
    assert_usage_error(
        &["--kernel", k, "--disk", "path=x.img,cache=none"],
        &["unknown key 'cache'", "path=FILE"],
    );
    assert_usage_error(
        &["--kernel", k, "--disk", "x.img"],
        &["--disk 'x.img'", "path=FILE"],
    );
    let empty = tmp("empty-disk", b"");
    assert_usage_error(
        &["--kernel", k, "--disk", &format!("path={empty}")],
        &[&empty, "smaller than one 512-byte sector"],
    );
}

#[test]
fn bad_network_interfaces_are_refused() {
    let k = guest("hello");
    let k = k.to_str().unwrap();
    assert_usage_error(
        &["--kernel", k, "--net", "tap=vmmnosuchtap0"],
        &["no network interface 'vmmnosuchtap0'", "ip tuntap add"],
    );
    assert_usage_error(
        &["--kernel", k, "--net", "tap=lo"],
        &["'lo' is not a TAP device"],
    );
    assert_usage_error(
        &["--kernel", k, "--net", "tap0"],
        &["--net 'tap0'", "tap=NAME"],
    );
    assert_usage_error(&["--kernel", k, "--net", "tap=t,mac=zz"], &["mac 'zz'"]);
}

#[test]
fn version_prints_a_firecracker_shaped_first_line() {
    // Kata Containers runs `firecracker --version` and parses the second word.
    let out = vmm().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let first = text.lines().next().unwrap();
    let words: Vec<&str> = first.split(' ').collect();
    assert_eq!(words[0], "Firecracker", "{text}");
    let v: Vec<u32> = words[1]
        .trim_start_matches('v')
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(v.len(), 3, "{text}");
    assert!(v[0] >= 1, "{text}");
    assert_eq!(first, "Firecracker v1.16.1", "{text}");
    assert!(text.contains("vmm"), "{text}");
}

#[test]
fn help_lists_run_and_misspelt_commands_are_suggested() {
    let out = run(
        {
            let mut c = vmm();
            c.arg("--help");
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(0));
    assert!(
        out.stdout.contains("vmm run [OPTIONS] -- CMD"),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("--log-level"),
        "one log-level flag shown"
    );
    let out = run(
        {
            let mut c = vmm();
            c.arg("rn");
            c
        },
        Duration::from_secs(30),
    );
    assert_ne!(out.code, Some(0));
    assert_eq!(out.stderr.lines().count(), 1, "{out:#?}");
    assert!(out.stderr.contains("did you mean 'vmm run'?"), "{out:#?}");
}

#[test]
fn vmm_run_errors_are_one_line_and_memory_takes_units() {
    for (args, want) in [
        (
            &["run", "--bogus", "--", "true"][..],
            "unexpected argument '--bogus'",
        ),
        (
            &["run", "--memry", "1G", "--", "true"][..],
            "a similar argument exists: '--memory'",
        ),
        (
            &["run", "--memory", "1X", "--", "true"][..],
            "--memory '1X' is not a size",
        ),
        (
            &["run", "--memory", "8M", "--", "true"][..],
            "--memory 8M is out of range",
        ),
        (
            &["run", "--timeout", "inf", "--", "true"][..],
            "--timeout inf is not a number of seconds",
        ),
    ] {
        let out = run(
            {
                let mut c = vmm();
                c.args(args);
                c
            },
            Duration::from_secs(30),
        );
        assert_eq!(out.code, Some(EXIT_USAGE), "{args:?}: {out:#?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {out:#?}");
        assert!(
            lines[0].starts_with("vmm run: error: "),
            "{args:?}: {out:#?}"
        );
        assert!(lines[0].contains(want), "{args:?}: {:?}", lines[0]);
    }
}

/// `vmm run`'s set-up failures name their cause before anything is built.
#[test]
fn vmm_run_names_a_missing_kvm_cache_or_agent() {
    let one_line = |mut c: std::process::Command, want: &str| {
        c.args(["run", "--", "true"])
            .stdin(std::process::Stdio::null());
        let out = c.output().expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].starts_with("vmm run: error: ") && lines[0].contains(want),
            "{err}"
        );
    };
    let vmm_exe = env!("CARGO_BIN_EXE_vmm");
    // Another user, without access to /dev/kvm (root only here).
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "env"])
            .arg(format!("VMM_CACHE_DIR={}", env!("CARGO_TARGET_TMPDIR")))
            .arg(vmm_exe);
        one_line(c, "Cannot open /dev/kvm: Permission denied");
    } else {
        eprintln!("not root: the /dev/kvm case is not asserted");
    }
    let mut c = std::process::Command::new(vmm_exe);
    c.env("VMM_CACHE_DIR", "/proc/no-such-dir");
    one_line(c, "Cannot use the cache directory '/proc/no-such-dir'");
    // A vmm without its agent beside it.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lonely-vmm");
    std::fs::create_dir_all(&dir).unwrap();
    let lonely = dir.join("vmm");
    // Copied by another process: a descriptor of ours open for writing could
    // leak into a child another test thread forks, and exec would fail
    // with ETXTBSY.
    let copied = std::process::Command::new("cp")
        .arg(vmm_exe)
        .arg(&lonely)
        .status()
        .unwrap();
    assert!(copied.success());
    let c = std::process::Command::new(&lonely);
    one_line(c, "The guest agent");
}
