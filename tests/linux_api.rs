//! The project's Linux kernel driven the way Firecracker's users drive it:
//! the getting-started API sequence with curl over the socket, a configuration
//! file with and without the API, a drive replaced on the running guest,
//! metrics, and Ctrl-Alt-Del. Linux guests run one at a time; on PVM a boot
//! that dies of an emulation failure is retried once, saying so.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use common::{
    curl, host, initramfs, kernel, linux_cmdline, linux_timeout, tmp_path, vmm, wait_for_socket,
    Host, Running,
};

const MARKER: &str = "VMM-TEST: userspace up";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Configures and starts a guest over the API with Firecracker's getting-started
/// sequence, and waits for `milestone`; on PVM starts once more if the first
/// boot died of an emulation failure before it.
fn api_boot(host: Host, name: &str, milestone: &str, disk: &Path) -> (Running, PathBuf, PathBuf) {
    for attempt in 0..2 {
        let sock = tmp_path(&format!("{name}.sock"));
        let metrics = tmp_path(&format!("{name}.metrics"));
        let mut cmd = vmm();
        cmd.arg("--api-sock").arg(&sock).args(["--level", "Info"]);
        let mut vm = Running::start(cmd);
        wait_for_socket(&sock, &vm);
        let boot_args = linux_cmdline(host, "vmm.test=wait i8042.noaux i8042.nomux i8042.dumbkbd");
        let calls = [
            (
                "PUT",
                "/metrics".to_string(),
                format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
            ),
            (
                "PUT",
                "/machine-config".into(),
                r#"{"vcpu_count": 1, "mem_size_mib": 128}"#.into(),
            ),
            (
                "PUT",
                "/boot-source".into(),
                format!(
                    r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{boot_args}"}}"#,
                    kernel("vmlinux").display(),
                    initramfs().display()
                ),
            ),
            (
                "PUT",
                "/drives/data".into(),
                format!(
                    r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
                    disk.display()
                ),
            ),
            (
                "PUT",
                "/actions".into(),
                r#"{"action_type": "InstanceStart"}"#.into(),
            ),
        ];
        for (method, path, body) in &calls {
            assert_eq!(
                curl(&sock, method, path, Some(body)),
                (204, String::new()),
                "{method} {path}"
            );
        }
        if vm.wait_for(milestone, linux_timeout(host)) {
            return (vm, sock, metrics);
        }
        let out = vm.finish(Duration::from_secs(10));
        let retry = attempt == 0 && out.pvm_emulation_failure(host);
        assert!(retry, "no {milestone:?}: {}\n{}", out.stderr, out.stdout);
        eprintln!(
            "PVM emulation failure, retrying once: {}",
            out.stderr.trim()
        );
    }
    unreachable!()
}

#[test]
fn api_boots_linux_to_user_space_then_a_bigger_drive_metrics_and_ctrl_alt_del() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let host = host();
    let small = tmp_path("linux-api-small.img");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    let (mut vm, sock, metrics) = api_boot(host, "linux-api", "VMM-TEST: waiting", &small);
    assert!(vm
        .stdout_now()
        .contains("[vda] 2048 512-byte logical blocks"));
    let (code, body) = curl(&sock, "GET", "/", None);
    assert_eq!(code, 200);
    assert!(body.contains(r#""state":"Running""#), "{body}");

    // A bigger image on the running guest: the kernel sees the new capacity.
    let big = tmp_path("linux-api-big.img");
    std::fs::write(&big, vec![0u8; 4 << 20]).unwrap();
    let patch = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
        big.display()
    );
    assert_eq!(
        curl(&sock, "PATCH", "/drives/data", Some(&patch)),
        (204, String::new())
    );
    assert!(
        vm.wait_for(
            "[vda] new size: 8192 512-byte logical blocks",
            Duration::from_secs(120)
        ),
        "the guest did not see the new capacity"
    );
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    assert!(cfg.contains("linux-api-big.img"), "{cfg}");

    // Metrics: the kernel read the disk (partition scan), the drive was updated.
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(
        curl(&sock, "PUT", "/actions", Some(flush)),
        (204, String::new())
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let sum = |group: &str, key: &str| -> u64 {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .map(|v| v[group][key].as_u64().expect("the key exists"))
            .sum()
    };
    eprintln!("asserting: [vda] new size after PATCH, block_data read_count > 0, update_count 1, Ctrl-Alt-Del reboots, exit 0");
    assert!(sum("block_data", "read_count") > 0, "{text}");
    assert!(sum("block_data", "read_bytes") > 0, "{text}");
    assert_eq!(sum("block_data", "update_count"), 1, "{text}");
    assert!(
        sum("uart", "write_count") > 0,
        "the console was written: {text}"
    );
    assert!(sum("vcpu", "exit_io_out") > 0, "{text}");

    // Ctrl-Alt-Del: the kernel restarts (reboot=k), the VMM exits 0.
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(
        curl(&sock, "PUT", "/actions", Some(cad)),
        (204, String::new())
    );
    let out = vm.finish(linux_timeout(host));
    out.assert_console(&[MARKER, "reboot: Restarting system"]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("guest ended: Reset"), "{}", out.stderr);
    assert!(!sock.exists());
}

#[test]
fn config_file_boots_linux_to_user_space_with_and_without_the_api() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let host = host();
    let cfg = tmp_path("linux-config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{
  "boot-source": {{
    "kernel_image_path": "{}",
    "initrd_path": "{}",
    "boot_args": "{}"
  }},
  "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128, "smt": false}},
  "logger": {{"level": "Info"}}
}}"#,
            kernel("vmlinux").display(),
            initramfs().display(),
            linux_cmdline(host, "vmm.test=poweroff")
        ),
    )
    .unwrap();
    for with_api in [false, true] {
        let mut out = None;
        for attempt in 0..2 {
            let sock = tmp_path("linux-config.sock");
            let mut cmd = vmm();
            cmd.arg("--config-file").arg(&cfg);
            if with_api {
                cmd.arg("--api-sock").arg(&sock);
            } else {
                cmd.arg("--no-api");
            }
            let vm = Running::start(cmd);
            if with_api {
                wait_for_socket(&sock, &vm);
                let (code, body) = curl(&sock, "GET", "/", None);
                assert_eq!(code, 200);
                assert!(body.contains(r#""state":"Running""#), "{body}");
            }
            let o = vm.finish(linux_timeout(host));
            if attempt == 0 && o.pvm_emulation_failure(host) {
                eprintln!("PVM emulation failure, retrying once: {}", o.stderr.trim());
                continue;
            }
            out = Some(o);
            break;
        }
        let out = out.expect("a boot");
        eprintln!("asserting (api: {with_api}): user-space marker, ACPI power-off, exit 0");
        out.assert_console(&[MARKER, "reboot: Power down"]);
        assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
        assert!(
            out.stderr.contains("guest ended: PowerOff"),
            "{}",
            out.stderr
        );
    }
}
