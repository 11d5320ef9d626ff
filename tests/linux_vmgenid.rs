//! Clones of the suite's golden Linux guest and the VM generation ID: each
//! restore gives the guest a new ID and an ACPI notification, its vmgenid
//! driver reseeds the kernel's RNG, and two clones read different bytes from
//! /dev/urandom; with `--no-vmgenid` the clones' bytes repeat (the test can
//! fail). And firecracker-python's restore request, with the deprecated
//! `enable_diff_snapshots`, restores a guest whose Diff then merges and
//! restores.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::golden::{self, Golden, Netns};
use common::{curl, host, serve_api, tmp_path, Running};

/// A clone of the golden guest with `extra` flags on the VMM, restored
/// with `load` (a PUT /snapshot/load body) and resumed.
fn clone(ns: &Netns, name: &str, extra: &[&str], load: &str) -> (Running, PathBuf) {
    let _ = std::fs::remove_file(golden::vsock_path(name));
    let mut cmd = ns.vmm();
    cmd.args(["--level", "Info"]).args(extra);
    let (vm, sock) = serve_api(name, cmd);
    let r = curl(&sock, "PUT", "/snapshot/load", Some(load));
    assert_eq!(r, (204, String::new()), "{name}: {}", vm.stdout_now());
    (vm, sock)
}

/// The suite's load body for the golden guest on `tap`, its own vsock socket.
fn load_body(g: &Golden, mem: &Path, tap: &str, name: &str, extra: &str) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true, "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "{tap}"}}], "vsock_override": {{"uds_path": "{}"}}{extra}}}"#,
        g.snap.display(),
        mem.display(),
        golden::vsock_path(name).display()
    )
}

/// 16 bytes of /dev/urandom, read first thing after the restore, in hex.
fn urandom(vm: &mut Running, tag: &str) -> String {
    let bytes = golden::shell(
        vm,
        tag,
        1,
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '",
    );
    assert_eq!(bytes.len(), 32, "{tag}: '{bytes}'");
    bytes
}

#[test]
fn clones_reseed_on_restore_and_repeat_without_the_generation_id() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("vmgenid");
    ns.add_tap("vmmtap20", None);
    // The golden guest may be due for its kernel's periodic reseed (from the
    // host's RDSEED as well), which would make any two clones differ: a
    // first clone reads random bytes (reseeding if due) and is saved again;
    // the clones below come from that snapshot, well inside the reseed
    // interval.
    let body = load_body(&g, &g.mem, "vmmtap20", "gen-base", "");
    let (mut vm, sock) = clone(&ns, "gen-base", &["--no-vmgenid"], &body);
    urandom(&mut vm, "BASE");
    let (snap, mem) = (tmp_path("gen-base.snap"), tmp_path("gen-base.mem"));
    common::pause_and_snapshot(&sock, &snap, &mem);
    drop(vm);
    let base = Golden {
        snap,
        mem,
        disk: g.disk.clone(),
    };
    let mut seen = Vec::new();
    for (name, extra) in [
        ("gen-a", &[][..]),
        ("gen-b", &[][..]),
        ("gen-c", &["--no-vmgenid"][..]),
        ("gen-d", &["--no-vmgenid"][..]),
    ] {
        let body = load_body(&base, &base.mem, "vmmtap20", name, "");
        let (mut vm, _sock) = clone(&ns, name, extra, &body);
        let bytes = urandom(&mut vm, "RND");
        vm.type_on_console("mkdir -p /sys && mount -t sysfs sys /sys\n");
        let bound = golden::shell(&mut vm, "DRV", 2, "ls /sys/bus/acpi/drivers/vmgenid");
        let reseeded = golden::shell(
            &mut vm,
            "FORK",
            3,
            "dmesg | grep -c 'crng reseeded due to virtual machine fork'",
        );
        eprintln!("{name} {extra:?}: urandom {bytes}, vmgenid driver bound to '{bound}', fork reseeds {reseeded}");
        // The device is in the snapshot either way; the driver binds it.
        assert!(bound.contains("VMGENCTR:00"), "{name}: {bound}");
        if extra.is_empty() {
            assert!(reseeded != "0", "{name}: a reseed at this restore");
        } else {
            assert_eq!(reseeded, "0", "{name}: no new ID, no reseed");
        }
        vm.type_on_console("poweroff -f\n");
        drop(vm);
        seen.push(bytes);
    }
    eprintln!(
        "asserting: clones with a new generation ID read different bytes, without it the same"
    );
    assert_ne!(seen[0], seen[1], "two clones with vmgenid");
    assert_eq!(seen[2], seen[3], "two clones without a new ID repeat");
}

#[test]
fn firecracker_python_s_restore_with_enable_diff_snapshots_runs_and_its_diff_merges() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("fcpy");
    ns.add_tap("vmmtap21", None);
    // Exactly what firecracker-python's restore sends (its fork too).
    let body = format!(
        r#"{{"enable_diff_snapshots": true, "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "snapshot_path": "{}", "resume_vm": true, "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "vmmtap21"}}]}}"#,
        g.mem.display(),
        g.snap.display()
    );
    // The request names no vsock socket: the snapshot's is used, and a
    // stale one from the VMM that took the golden snapshot is in the way.
    let _ = std::fs::remove_file(g.snap.parent().unwrap().join("golden-v.sock"));
    let (mut vm, sock) = serve_api("fcpy", ns.vmm());
    let out = Command::new("curl")
        .args(["-si", "--unix-socket"])
        .arg(&sock)
        .args([
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ])
        .arg("http://localhost/snapshot/load")
        .output()
        .unwrap();
    let response = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("asserting: 204 with Firecracker's Deprecation header: {response:?}");
    assert!(response.starts_with("HTTP/1.1 204"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("deprecation: true"),
        "{response}"
    );
    let (code, config) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(v["machine-config"]["track_dirty_pages"], true, "{config}");
    assert_eq!(golden::shell(&mut vm, "UP", 1, "echo alive"), "alive");

    // The guest writes a file in its tmpfs; a Diff holds what changed since
    // the restore, merged onto a copy of the golden memory it restores with
    // the file there.
    let _ = golden::shell(
        &mut vm,
        "W",
        2,
        "echo diff-content-42 > /tmp/marker && echo ok",
    );
    let (snap, diff) = (tmp_path("fcpy-diff.snap"), tmp_path("fcpy-diff.mem"));
    assert_eq!(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let create = format!(
        r#"{{"snapshot_type": "Diff", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.display(),
        diff.display()
    );
    assert_eq!(
        curl(&sock, "PUT", "/snapshot/create", Some(&create)),
        (204, String::new())
    );
    drop(vm);
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let (d, full) = (allocated(&diff), allocated(&g.mem));
    eprintln!("asserting: the Diff allocates {d} bytes, the golden Full {full}");
    assert!(d > 0 && d < full / 2, "{d} vs {full}");
    let merged = tmp_path("fcpy-merged.mem");
    std::fs::copy(&g.mem, &merged).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["snapshot", "rebase", "--base-mem"])
        .arg(&merged)
        .arg("--diff-mem")
        .arg(&diff)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true, "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "vmmtap21"}}], "vsock_override": {{"uds_path": "{}"}}}}"#,
        snap.display(),
        merged.display(),
        golden::vsock_path("fcpy-merged").display()
    );
    let (mut vm, _) = clone(&ns, "fcpy-merged", &[], &body);
    assert_eq!(
        golden::shell(&mut vm, "R", 3, "cat /tmp/marker"),
        "diff-content-42"
    );
    vm.type_on_console("poweroff -f\n");
}
