//! virtio-pmem with the project's Linux kernel, configured through the API
//! as a Firecracker SDK does: the guest boots from a read-only pmem root
//! device (no initramfs, `root=/dev/pmem0 ro`), mounts a read-write pmem
//! device with DAX and writes to it (the bytes checked on the host, in the
//! file's ext4), reads a raw read-only pmem device whose file never changes;
//! a snapshot restores with its pmem devices where they were, and a reboot
//! ends the VMM with exit code 0.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::golden::shell;
use common::{
    curl, host, kernel, linux_cmdline, linux_timeout, pause_and_snapshot, resource, tmp_path,
    wait_for_socket, Running,
};

/// What the guest copies from the raw device to the DAX-mounted one.
const WRITTEN: usize = 96 << 10;

/// A copy of the project's test root file system (an ext4 image with
/// busybox and an init that can run a shell).
fn rootfs_copy(name: &str) -> PathBuf {
    let copy = tmp_path(name);
    std::fs::copy(resource("build-rootfs.sh"), &copy).unwrap();
    copy
}

/// A 3 MiB ext4 image holding `greeting` (not a multiple of 2 MiB: the
/// guest sees 4 MiB).
fn data_image(path: &Path) {
    let dir = tmp_path("pmem-data-tree");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("greeting"), "hello from the host\n").unwrap();
    let _ = std::fs::remove_file(path);
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&dir)
        .arg(path)
        .arg("3M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) runs")
        .success();
    assert!(ok, "mkfs.ext4 failed");
}

/// File `name` of the ext4 image `image`, read on the host with debugfs.
fn ext4_file(image: &Path, name: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat /{name}"))
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    out.stdout
}

/// `vmm --api-sock SOCK`, its console on a pipe, once it listens.
fn start(sock: &Path) -> Running {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.stdin(std::process::Stdio::piped())
        .arg("--api-sock")
        .arg(sock)
        .args(["--level", "Info"]);
    let vm = Running::start(cmd);
    wait_for_socket(sock, &vm);
    vm
}

fn put(sock: &Path, path: &str, body: serde_json::Value) -> (u16, String) {
    curl(sock, "PUT", path, Some(&body.to_string()))
}

#[test]
fn linux_boots_from_pmem_writes_through_dax_and_restores() {
    let host = host();
    let root = rootfs_copy("pmem-root.ext4");
    let root_before = std::fs::read(&root).unwrap();
    let data = tmp_path("pmem-data.ext4");
    data_image(&data);
    let plain = tmp_path("pmem-plain.bin");
    let plain_bytes: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 ^ 0xa5).collect();
    std::fs::write(&plain, &plain_bytes).unwrap();

    let sock = tmp_path("pmem.sock");
    let mut vm = start(&sock);

    let boot = serde_json::json!({
        "kernel_image_path": kernel("vmlinux"),
        "boot_args": linux_cmdline(host, "vmm.test=shell"),
    });
    assert_eq!(put(&sock, "/boot-source", boot).0, 204);
    let machine = serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128});
    assert_eq!(put(&sock, "/machine-config", machine).0, 204);
    // Firecracker's checks of root devices, with its messages.
    let small = tmp_path("pmem-drive.img");
    std::fs::write(&small, vec![7u8; 4096]).unwrap();
    let drive = |root: bool| serde_json::json!({"drive_id": "d", "path_on_host": small, "is_root_device": root, "is_read_only": true});
    assert_eq!(put(&sock, "/drives/d", drive(true)).0, 204);
    let pmem_root = serde_json::json!({"id": "root", "path_on_host": root, "root_device": true, "read_only": true});
    let refused = put(&sock, "/pmem/root", pmem_root.clone());
    eprintln!("asserting: a root pmem device beside a root drive is refused: {refused:?}");
    assert_eq!(refused.0, 400);
    assert!(refused.1.contains(
        "Attempt to add pmem as a root device while the root device defined as a block device"
    ));
    assert_eq!(put(&sock, "/drives/d", drive(false)).0, 204);
    assert_eq!(put(&sock, "/pmem/root", pmem_root).0, 204);
    let refused = put(&sock, "/drives/d", drive(true));
    assert!(
        refused.1.contains(
            "Attempt to add block as a root device while the root device defined as a pmem device"
        ),
        "{refused:?}"
    );
    let second = serde_json::json!({"id": "other", "path_on_host": plain, "root_device": true});
    let refused = put(&sock, "/pmem/other", second);
    assert!(
        refused.1.contains("A root pmem device already exist"),
        "{refused:?}"
    );
    let no_path = curl(&sock, "PUT", "/pmem/x", Some(r#"{"id": "x"}"#));
    assert!(
        no_path.1.contains("missing field `path_on_host`"),
        "{no_path:?}"
    );
    let limiter = serde_json::json!({"ops": {"size": 100, "refill_time": 100}});
    let data_dev = serde_json::json!({"id": "data", "path_on_host": data, "rate_limiter": limiter});
    assert_eq!(put(&sock, "/pmem/data", data_dev).0, 204);
    let plain_dev = serde_json::json!({"id": "plain", "path_on_host": plain, "read_only": true});
    assert_eq!(put(&sock, "/pmem/plain", plain_dev).0, 204);
    let config: serde_json::Value =
        serde_json::from_str(&curl(&sock, "GET", "/vm/config", None).1).unwrap();
    eprintln!("asserting: GET /vm/config lists the pmem devices as Firecracker does");
    assert_eq!(
        config["pmem"][0],
        serde_json::json!({"id": "root", "path_on_host": root, "root_device": true, "read_only": true, "rate_limiter": null})
    );
    assert_eq!(config["pmem"][1]["rate_limiter"]["ops"]["size"], 100);
    let before_start = curl(&sock, "PATCH", "/pmem/data", Some(r#"{"id": "data"}"#));
    assert!(
        before_start.1.contains("not supported before starting"),
        "{before_start:?}"
    );
    let started = put(
        &sock,
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    assert_eq!(started, (204, String::new()), "{}", vm.stdout_now());
    assert!(
        vm.wait_for("VMM-TEST: rootfs init up", linux_timeout(host)),
        "the guest did not boot from pmem: {}",
        vm.stdout_now()
    );
    std::thread::sleep(Duration::from_secs(2));

    let cmdline = shell(&mut vm, "cmd", 1, "cat /proc/cmdline");
    eprintln!("asserting: the kernel was told its root is /dev/pmem0, read-only: {cmdline}");
    assert!(cmdline.contains("root=/dev/pmem0 ro"), "{cmdline}");
    let mounted = shell(
        &mut vm,
        "root",
        2,
        "mount -t sysfs sysfs /sys; echo $(grep ' / ' /proc/mounts | cut -d' ' -f3-4) $(dmesg | grep -o 'readonly on device [0-9:]*' | cut -d' ' -f4) $(cat /sys/block/pmem0/dev)",
    );
    eprintln!("asserting: / is ext4, read-only, on pmem0 (the kernel's root device numbers, pmem0's): {mounted}");
    let m: Vec<&str> = mounted.split_whitespace().collect();
    assert_eq!(m.len(), 4, "{mounted}");
    assert!(m[0] == "ext4" && m[1].starts_with("ro,"), "{mounted}");
    assert_eq!(m[2], m[3], "{mounted}");
    let sizes = shell(
        &mut vm,
        "sizes",
        3,
        "echo $(cat /sys/block/pmem0/size /sys/block/pmem1/size /sys/block/pmem2/size)",
    );
    eprintln!("asserting: pmem sizes in sectors, each rounded up to 2 MiB: {sizes}");
    assert_eq!(sizes, format!("{} 8192 4096", 64 << 11));

    // DAX: loads and stores straight to the host file's pages.
    let dax = shell(
        &mut vm,
        "dax",
        4,
        "mount -t tmpfs t /tmp && mkdir -p /tmp/m && mount -o dax /dev/pmem1 /tmp/m && echo $(grep -c 'pmem1 /tmp/m ext4 rw.*dax' /proc/mounts) $(cat /tmp/m/greeting)",
    );
    eprintln!("asserting: pmem1 mounted with DAX, the host's file read: {dax}");
    assert_eq!(dax, "1 hello from the host");
    let wrote = shell(
        &mut vm,
        "wr",
        5,
        &format!("dd if=/dev/pmem2 of=/tmp/m/out bs=4096 count={} conv=fsync 2>/dev/null; sync; wc -c < /tmp/m/out", WRITTEN / 4096),
    );
    assert_eq!(wrote, WRITTEN.to_string());
    let raw = shell(
        &mut vm,
        "raw",
        6,
        "dd if=/dev/pmem2 bs=4096 count=256 2>/dev/null | md5sum | cut -d' ' -f1",
    );
    let want = Command::new("md5sum")
        .arg(&plain)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap();
    eprintln!("asserting: the raw read-only device reads the host file's bytes");
    assert_eq!(raw, want);

    // The host sees the guest's file in the image, with no unmount.
    let out = ext4_file(&data, "out");
    eprintln!(
        "asserting: {} bytes the guest wrote through DAX, read on the host",
        out.len()
    );
    assert!(out == plain_bytes[..WRITTEN]);

    // Snapshot, restore: the devices are where they were.
    let snap = tmp_path("pmem.snap");
    let mem = tmp_path("pmem.mem");
    pause_and_snapshot(&sock, &snap, &mem);
    vm.signal(libc::SIGKILL);
    drop(vm);
    let described = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--describe-snapshot")
        .arg(&snap)
        .output()
        .unwrap();
    let described = String::from_utf8_lossy(&described.stdout).into_owned();
    eprintln!("asserting: the snapshot names its pmem devices: {described}");
    assert!(described.contains("virtio-pmem 'data'"), "{described}");
    let mut vm = start(&sock);
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        snap.display(),
        mem.display()
    );
    let loaded = curl(&sock, "PUT", "/snapshot/load", Some(&load));
    assert_eq!(loaded, (204, String::new()), "{}", vm.stdout_now());
    let after = shell(
        &mut vm,
        "after",
        7,
        "echo $(wc -c < /tmp/m/out) $(cat /tmp/m/greeting)",
    );
    eprintln!("asserting: after the restore, the DAX mount still reads: {after}");
    assert_eq!(after, format!("{WRITTEN} hello from the host"));
    // PATCH of a running device's rate limiter, as Firecracker's.
    let patched = curl(
        &sock,
        "PATCH",
        "/pmem/data",
        Some(r#"{"id": "data", "rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#),
    );
    assert_eq!(patched, (204, String::new()));
    let missing = curl(&sock, "PATCH", "/pmem/nosuch", Some(r#"{"id": "nosuch"}"#));
    assert!(missing.1.contains("not found"), "{missing:?}");
    let config: serde_json::Value =
        serde_json::from_str(&curl(&sock, "GET", "/vm/config", None).1).unwrap();
    assert_eq!(config["pmem"][1]["rate_limiter"]["ops"]["size"], 10);

    vm.type_on_console("umount /tmp/m; reboot -f\n");
    let outcome = vm.finish(Duration::from_secs(120));
    eprintln!("asserting: reboot ends the VMM with exit code 0; the read-only files are unchanged");
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    assert!(std::fs::read(&plain).unwrap() == plain_bytes);
    assert!(std::fs::read(&root).unwrap() == root_before);
}
