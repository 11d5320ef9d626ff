//! Snapshots through the API with real clients: a counting test guest is
//! paused, saved to a state file and a memory file, its VMM killed, and the
//! guest restored in fresh VMMs, which continue counting exactly where it
//! stopped — several times from the same snapshot.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Boots the counter guest over the API, pauses it and snapshots it; returns
/// the state file, the memory file and what the guest printed (the pause may
/// fall in the middle of a line, which the restored guest then completes).
fn counter_snapshot(name: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let (mut vm, sock) = api_vmm(&format!("{name}-origin"), &[]);
    let boot = format!(
        r#"{{"kernel_image_path": "{}"}}"#,
        guest("counter").display()
    );
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    assert_eq!(
        curl(
            &sock,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#)
        )
        .0,
        204
    );
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(curl(&sock, "PUT", "/actions", Some(start)).0, 204);
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000003", TIMEOUT));
    let (snap, mem) = (
        tmp_path(&format!("{name}.snap")),
        tmp_path(&format!("{name}.mem")),
    );
    let create = create_body(&snap, &mem);
    // Firecracker's rule: only a paused VM.
    assert!(fault(curl(&sock, "PUT", "/snapshot/create", Some(&create)))
        .contains("save/restore unavailable while running"));
    assert_eq!(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let t = Instant::now();
    assert_eq!(
        curl(&sock, "PUT", "/snapshot/create", Some(&create)),
        (204, String::new())
    );
    eprintln!("snapshot created in {:?}", t.elapsed());
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 64 << 20);
    // Everything the paused guest wrote has reached the pipe.
    std::thread::sleep(Duration::from_millis(200));
    let printed = vm.stdout_now();
    vm.signal(libc::SIGKILL);
    drop(vm);
    (snap, mem, printed)
}

/// Asserts that the original's output followed by a clone's counts 1, 2, 3,
/// ... with nothing skipped or repeated, at least two past the original's
/// last full line.
fn assert_continues(original: &str, clone: &str, what: &str) {
    let before = guest_counts(original).len() as u64;
    let seen = guest_counts(&format!("{original}{clone}"));
    let want: Vec<u64> = (1..=seen.len() as u64).collect();
    eprintln!(
        "asserting ({what}): counts 1..={} with nothing skipped or repeated across the restore (the original stopped after {before})",
        seen.len()
    );
    assert_eq!(seen, want, "{what}");
    assert!(seen.len() as u64 >= before + 2, "{what}: {seen:?}");
}

#[test]
fn a_counting_guest_continues_where_it_stopped_three_times_from_one_snapshot() {
    let (snap, mem, original) = counter_snapshot("counter");
    let last = guest_counts(&original).len() as u64;
    for round in 0..3 {
        let (mut clone, sock) = api_vmm(&format!("snap-clone{round}"), &[]);
        let t = Instant::now();
        assert_eq!(
            load_snapshot(&sock, &snap, &mem, true),
            (204, String::new()),
            "round {round}"
        );
        eprintln!("round {round}: loaded and resumed in {:?}", t.elapsed());
        let (_, info) = curl(&sock, "GET", "/", None);
        assert!(info.contains(r#""state":"Running""#), "{info}");
        let want = format!("VMM-GUEST: count {:016x}", last + 3);
        assert!(
            clone.wait_for(&want, TIMEOUT),
            "round {round}: {}",
            clone.stdout_now()
        );
        assert_continues(&original, &clone.stdout_now(), &format!("round {round}"));
        // The restored VM has the configuration it was booted with.
        let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
        assert!(cfg.contains(r#""vcpu_count":2"#), "{cfg}");
        clone.signal(libc::SIGTERM);
        assert_eq!(clone.finish(TIMEOUT).code, Some(128 + libc::SIGTERM));
    }
}

#[test]
fn bad_snapshots_and_late_loads_are_refused_and_nothing_starts() {
    let junk = tmp_path("junk.snap");
    std::fs::write(&junk, b"VMMSNAP\0\x01\x00\x00\x00").unwrap();
    let mem = tmp_path("junk.mem");
    std::fs::write(&mem, vec![0u8; 4096]).unwrap();
    // A load that is tried and fails ends the VMM, as Firecracker's: the VM
    // may be half built. Each bad file gets a fresh VMM.
    for (state, want) in [
        (junk.clone(), "truncated"),
        (tmp_path("none.snap"), "none.snap"),
    ] {
        let (vm, sock) = api_vmm("snap-bad", &[]);
        let msg = fault(curl(
            &sock,
            "PUT",
            "/snapshot/load",
            Some(&load_body(&state, &mem, true)),
        ));
        assert!(msg.contains(want), "{msg}");
        assert!(msg.starts_with("Load snapshot error: "), "{msg}");
        let out = vm.finish(TIMEOUT);
        eprintln!("asserting: the failed load ended the VMM with status 1, no guest output");
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(!sock.exists(), "the socket is removed");
    }
    // Firecracker's rule: no load once a boot resource was configured; that
    // refusal leaves the VMM as it was.
    let (vm, sock) = api_vmm("snap-late", &[]);
    assert_eq!(
        curl(
            &sock,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#)
        )
        .0,
        204
    );
    let msg = fault(curl(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&load_body(&junk, &mem, true)),
    ));
    assert!(
        msg.contains("not allowed after configuring boot-specific resources"),
        "{msg}"
    );
    let (_, info) = curl(&sock, "GET", "/", None);
    assert!(info.contains("Not started"), "{info}");
    drop(vm);
}

/// Firecracker 1.16's other load options: `vsock_override` names a device the
/// snapshot must have; `clock_realtime` needs a clock saved with its
/// wall-clock reference, which --describe-snapshot tells.
#[test]
fn vsock_override_and_clock_realtime_are_checked_against_the_snapshot() {
    let (snap, mem, original) = counter_snapshot("counter-opts");
    let (vm, sock) = api_vmm("opts-vsock", &[]);
    let body = load_body(&snap, &mem, true).replace(
        r#""resume_vm""#,
        r#""vsock_override": {"uds_path": "/tmp/v.sock"}, "resume_vm""#,
    );
    let msg = fault(curl(&sock, "PUT", "/snapshot/load", Some(&body)));
    assert!(msg.contains("Unknown Vsock Device"), "{msg}");
    // A failed load ends the VMM, as Firecracker's.
    assert_eq!(vm.finish(TIMEOUT).code, Some(1));

    let described = vmm()
        .arg("--describe-snapshot")
        .arg(&snap)
        .output()
        .unwrap();
    let described = String::from_utf8_lossy(&described.stdout).into_owned();
    let allowed = described.contains("clock_realtime allowed");
    assert!(
        allowed || described.contains("clock_realtime refused"),
        "{described}"
    );
    let (mut clone, sock) = api_vmm("opts-clock", &[]);
    let body = load_body(&snap, &mem, true)
        .replace(r#""resume_vm""#, r#""clock_realtime": true, "resume_vm""#);
    let answer = curl(&sock, "PUT", "/snapshot/load", Some(&body));
    eprintln!(
        "asserting: clock_realtime {} as --describe-snapshot said",
        if allowed { "loads" } else { "is refused" }
    );
    if allowed {
        assert_eq!(answer, (204, String::new()));
        let last = guest_counts(&original).len() as u64;
        let want = format!("VMM-GUEST: count {:016x}", last + 2);
        assert!(clone.wait_for(&want, TIMEOUT), "{}", clone.stdout_now());
    } else {
        assert!(fault(answer).contains("wall-clock reference"));
    }
}

#[test]
fn the_command_line_describes_and_restores_a_snapshot() {
    let (snap, mem, original) = counter_snapshot("counter-cli");
    let last = guest_counts(&original).len() as u64;
    let out = vmm()
        .arg("--describe-snapshot")
        .arg(&snap)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success());
    assert!(
        text.contains("format 1.3") && text.contains("checksum ok"),
        "{text}"
    );
    assert!(
        text.contains("vCPU 0: RIP 0x2") && text.contains("vCPU 1:"),
        "{text}"
    );
    assert!(
        text.contains("the memory file must be 67108864 bytes"),
        "{text}"
    );

    let mut cmd = vmm();
    cmd.arg("--restore")
        .arg(&snap)
        .arg("--restore-mem")
        .arg(&mem);
    let mut vm = Running::start(cmd);
    let want = format!("VMM-GUEST: count {:016x}", last + 3);
    assert!(vm.wait_for(&want, TIMEOUT), "{}", vm.stdout_now());
    assert_continues(&original, &vm.stdout_now(), "--restore");
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish(TIMEOUT).code, Some(128 + libc::SIGTERM));

    // A memory file of the wrong size: one line, exit 2, nothing runs.
    let short = tmp_path("counter-cli-short.mem");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    let mut cmd = vmm();
    cmd.arg("--restore")
        .arg(&snap)
        .arg("--restore-mem")
        .arg(&short);
    let out = run(cmd, TIMEOUT);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("has 4096 bytes"), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let out = vmm()
        .arg("--describe-snapshot")
        .arg(&short)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "Firecracker's GenericError");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"));
}

#[test]
fn a_clone_snapshots_itself_over_the_files_it_was_restored_from() {
    // The clone's memory is mapped from counter-self.mem; writing the new
    // snapshot there must neither crash it nor corrupt the files.
    let (snap, mem, original) = counter_snapshot("counter-self");
    let (mut clone, sock) = api_vmm("snap-self", &[]);
    // Logger and metrics may come first (firecracker-go-sdk configures them).
    let log = tmp_path("snap-self.log");
    let logger = format!(r#"{{"log_path": "{}", "level": "Info"}}"#, log.display());
    assert_eq!(curl(&sock, "PUT", "/logger", Some(&logger)).0, 204);
    let metrics = format!(
        r#"{{"metrics_path": "{}"}}"#,
        tmp_path("snap-self.metrics").display()
    );
    assert_eq!(curl(&sock, "PUT", "/metrics", Some(&metrics)).0, 204);
    assert_eq!(
        load_snapshot(&sock, &snap, &mem, true),
        (204, String::new())
    );
    let last = guest_counts(&original).len() as u64;
    assert!(clone.wait_for(&format!("VMM-GUEST: count {:016x}", last + 3), TIMEOUT));
    assert_eq!(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let same = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.display(),
        snap.display()
    );
    assert!(fault(curl(&sock, "PUT", "/snapshot/create", Some(&same))).contains("same file"));
    assert_eq!(
        curl(
            &sock,
            "PUT",
            "/snapshot/create",
            Some(&create_body(&snap, &mem))
        ),
        (204, String::new())
    );
    std::thread::sleep(Duration::from_millis(200));
    let second = format!("{original}{}", clone.stdout_now());
    assert_eq!(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    let n = guest_counts(&second).len() as u64;
    assert!(clone.wait_for(&format!("VMM-GUEST: count {:016x}", n + 2), TIMEOUT));
    clone.signal(libc::SIGTERM);
    assert_eq!(clone.finish(TIMEOUT).code, Some(128 + libc::SIGTERM));
    // The new snapshot restores where the clone was paused.
    let (mut again, sock) = api_vmm("snap-self-again", &[]);
    assert_eq!(
        load_snapshot(&sock, &snap, &mem, true),
        (204, String::new())
    );
    assert!(again.wait_for(&format!("VMM-GUEST: count {:016x}", n + 2), TIMEOUT));
    assert_continues(&second, &again.stdout_now(), "snapshot of a clone");
    // A FIFO is not a snapshot: refused at once, the VMM still answers.
    let fifo = tmp_path("snap.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    drop(again);
    let (vm, sock) = api_vmm("snap-fifo", &[]);
    let msg = fault(curl(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&load_body(&fifo, &mem, true)),
    ));
    assert!(msg.contains("not a regular file"), "{msg}");
    drop(vm);
}

/// The "VMM-GUEST: wrote N S" lines of the virtio_blk_seq guest, complete
/// lines only: (sector, status).
fn writes(out: &str) -> Vec<(u64, u64)> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("VMM-GUEST: wrote "))
        .filter_map(|rest| {
            let (n, s) = rest.split_once(' ')?;
            Some((
                u64::from_str_radix(n, 16).ok()?,
                u64::from_str_radix(s, 16).ok()?,
            ))
        })
        .collect()
}

/// The image the virtio_blk_seq guest writes: 128 sectors of a pattern.
fn seq_image_bytes() -> Vec<u8> {
    (0..128 * 512u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// The image after the guest wrote sectors 0-63.
fn seq_image_written() -> Vec<u8> {
    let mut expect = seq_image_bytes();
    for (i, sector) in expect.chunks_mut(512).take(64).enumerate() {
        sector.fill((37 * i as u32 + 11) as u8);
    }
    expect
}

/// Boots the virtio_blk_seq guest in a VMM started in `cwd` with its drive
/// at `drive_path` (relative paths resolve against `cwd`), snapshots it a few
/// requests in and kills it; returns the state file, the memory file and
/// what the guest printed.
fn seq_snapshot(name: &str, cwd: &Path, drive_path: &str) -> (PathBuf, PathBuf, String) {
    let sock = tmp_path(&format!("{name}.sock"));
    let mut cmd = vmm();
    cmd.current_dir(cwd).arg("--api-sock").arg(&sock);
    let mut vm = Running::start(cmd);
    wait_for_socket(&sock, &vm);
    let boot = format!(
        r#"{{"kernel_image_path": "{}"}}"#,
        guest("virtio_blk_seq").display()
    );
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{drive_path}", "is_root_device": false, "is_read_only": false}}"#
    );
    assert_eq!(curl(&sock, "PUT", "/drives/data", Some(&drive)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(curl(&sock, "PUT", "/actions", Some(start)).0, 204);
    assert!(
        vm.wait_for("VMM-GUEST: wrote 0000000000000005", TIMEOUT),
        "{}",
        vm.stdout_now()
    );
    let (snap, mem) = (
        tmp_path(&format!("{name}.snap")),
        tmp_path(&format!("{name}.mem")),
    );
    pause_and_snapshot(&sock, &snap, &mem);
    std::thread::sleep(Duration::from_millis(200));
    let original = vm.stdout_now();
    vm.signal(libc::SIGKILL);
    drop(vm);
    let done_before = writes(&original).len();
    assert!((6..64).contains(&done_before), "{original}");
    (snap, mem, original)
}

/// Waits for a clone of the virtio_blk_seq guest to finish, kills it, and
/// asserts every request ran exactly once across the restore, answered OK.
fn assert_seq_completes(mut clone: Running, original: &str) {
    assert!(
        clone.wait_for(
            "VMM-GUEST: all written, flush status 0000000000000000",
            TIMEOUT
        ),
        "{}",
        clone.stdout_now()
    );
    let after = clone.stdout_now();
    clone.signal(libc::SIGKILL);
    drop(clone);
    let want: Vec<(u64, u64)> = (0..64).map(|i| (i, 0)).collect();
    assert_eq!(writes(&format!("{original}{after}")), want, "{after}");
}

#[test]
fn a_virtio_blk_guest_snapshotted_between_requests_completes_them_after_restore() {
    let img = tmp_path("blk-seq.img");
    std::fs::write(&img, seq_image_bytes()).unwrap();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (snap, mem, original) = seq_snapshot("blk-seq", root, &img.display().to_string());

    let (clone, sock) = api_vmm("blk-seq-clone", &[]);
    assert_eq!(
        load_snapshot(&sock, &snap, &mem, true),
        (204, String::new())
    );
    // The disk is reopened by path and locked: a second clone of a VM with
    // a writable disk is refused while the first runs, and nothing starts:
    // the failed load ends that VMM (as Firecracker's), without guest output.
    let (second, sock2) = api_vmm("blk-seq-second", &[]);
    let refused = fault(load_snapshot(&sock2, &snap, &mem, true));
    assert!(refused.contains("in use by another process"), "{refused}");
    let out = second.finish(TIMEOUT);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    assert_seq_completes(clone, &original);
    assert!(
        std::fs::read(&img).unwrap() == seq_image_written(),
        "sectors 0-63 hold their pattern, 64-127 are untouched"
    );
}

/// The documented rule for clones of a VM with a writable disk: its path is
/// reopened as saved, so a relative path, resolved against each clone's
/// working directory, gives every clone its own copy; they run at once.
#[test]
fn clones_in_their_own_directories_each_write_their_own_copy_of_a_relative_disk() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seq-dirs");
    let _ = std::fs::remove_dir_all(&root);
    let dirs: Vec<PathBuf> = ["origin", "a", "b"].iter().map(|d| root.join(d)).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(dirs[0].join("data.img"), seq_image_bytes()).unwrap();
    let (snap, mem, original) = seq_snapshot("seq-dirs", &dirs[0], "data.img");
    // Each clone's copy is the disk as the snapshot left it.
    let mut clones = Vec::new();
    for (i, d) in dirs[1..].iter().enumerate() {
        std::fs::copy(dirs[0].join("data.img"), d.join("data.img")).unwrap();
        let mut cmd = vmm();
        cmd.current_dir(d)
            .arg("--restore")
            .arg(&snap)
            .arg("--restore-mem")
            .arg(&mem);
        clones.push(Running::start(cmd));
        eprintln!("clone {i} restored in {}", d.display());
    }
    for clone in clones {
        assert_seq_completes(clone, &original);
    }
    for d in &dirs[1..] {
        assert!(
            std::fs::read(d.join("data.img")).unwrap() == seq_image_written(),
            "{}: sectors 0-63 hold their pattern",
            d.display()
        );
    }
    let origin = std::fs::read(dirs[0].join("data.img")).unwrap();
    assert!(
        origin != seq_image_written(),
        "the origin's copy stopped part way"
    );
}

/// A snapshot whose guest was given a CPU feature or an MSR this host's KVM
/// does not have is refused before anything runs, naming what is missing.
#[test]
fn a_snapshot_needing_what_this_host_lacks_is_refused_naming_it() {
    use vmm::snapshot::{format, MicrovmState};
    let (snap, mem, _) = counter_snapshot("counter-host");
    let (_, state): (_, MicrovmState) = format::read(&snap).unwrap();
    // A leaf 7 EBX feature bit this host does not give its guests.
    let leaf7 = |s: &MicrovmState| {
        *s.vcpus[0]
            .cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 7 && e.index == 0)
            .unwrap()
    };
    let bit = (0..32)
        .find(|b| leaf7(&state).ebx & (1 << b) == 0)
        .expect("a feature bit this host lacks");
    let mut cpu = state;
    for v in &mut cpu.vcpus {
        for e in v.cpuid.as_mut_slice() {
            if e.function == 7 && e.index == 0 {
                e.ebx |= 1 << bit;
            }
        }
    }
    let bad_cpu = tmp_path("counter-host-cpuid.snap");
    format::write(&bad_cpu, &cpu).unwrap();
    let (_, mut msr): (_, MicrovmState) = format::read(&snap).unwrap();
    let mut entries = msr.vcpus[0].msrs.as_slice().to_vec();
    entries.push(kvm_bindings::kvm_msr_entry {
        index: 0x4b56_4dff,
        ..Default::default()
    });
    msr.vcpus[0].msrs = kvm_bindings::Msrs::from_entries(&entries).unwrap();
    let bad_msr = tmp_path("counter-host-msr.snap");
    format::write(&bad_msr, &msr).unwrap();
    for (file, want) in [
        (&bad_cpu, format!("leaf 0x7.0 EBX bit {bit}")),
        (&bad_msr, "MSRs of vCPU 0: 0x4b564dff".to_string()),
    ] {
        let (vm, sock) = api_vmm("host-lacks", &[]);
        let msg = fault(load_snapshot(&sock, file, &mem, true));
        assert!(
            msg.contains("This host's KVM lacks") && msg.contains(&want),
            "{msg}"
        );
        // Nothing ran; the failed load ended the VMM, as Firecracker's.
        let out = vm.finish(TIMEOUT);
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
}

/// A virtio device is restored exactly where its snapshot placed it: a
/// snapshot whose device sits outside this VMM's window, whose two devices
/// claim one interrupt line, or whose device is on virtio-mmio in a VM saved
/// with PCI, is refused in one answer naming the device, and nothing starts.
#[test]
fn a_snapshot_placing_a_device_where_this_vmm_cannot_is_refused() {
    use vmm::snapshot::{format, MicrovmState, PlacedTransport};
    let img = tmp_path("blk-place.img");
    std::fs::write(&img, seq_image_bytes()).unwrap();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (snap, mem, _) = seq_snapshot("blk-place", root, &img.display().to_string());
    let read = || -> MicrovmState { format::read(&snap).unwrap().1 };
    assert_eq!(read().virtio.len(), 1);
    let mut outside = read();
    let PlacedTransport::Mmio { mmio_base, .. } = &mut outside.virtio[0].placed else {
        panic!("a virtio-mmio device");
    };
    *mmio_base = 0xc000_0000;
    let mut bad_line = read();
    let PlacedTransport::Mmio { irq, .. } = &mut bad_line.virtio[0].placed else {
        panic!("a virtio-mmio device");
    };
    *irq = 40;
    for (name, state, want) in [
        ("outside", outside, "virtio-mmio page 0xc0000000"),
        ("line", bad_line, "interrupt line 0x28"),
    ] {
        let file = tmp_path(&format!("blk-place-{name}.snap"));
        format::write(&file, &state).unwrap();
        let (vm, sock) = api_vmm(&format!("blk-place-{name}"), &[]);
        let msg = fault(load_snapshot(&sock, &file, &mem, true));
        assert!(
            msg.contains("Cannot place virtio device 'data'") && msg.contains(want),
            "{msg}"
        );
        let out = vm.finish(TIMEOUT);
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
    // A state that says its VM had PCI but keeps a virtio-mmio device.
    let mut mixed = read();
    mixed.pci = true;
    let file = tmp_path("blk-place-mixed.snap");
    format::write(&file, &mixed).unwrap();
    let (vm, sock) = api_vmm("blk-place-mixed", &[]);
    let msg = fault(load_snapshot(&sock, &file, &mem, true));
    assert!(
        msg.contains("device 'data' is on virtio-mmio, but its VM had a PCI segment"),
        "{msg}"
    );
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
}
