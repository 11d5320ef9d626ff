//! The project's Linux kernel driven the way Firecracker's users drive it: a
//! configuration file with and without the API, and (on the suite's golden
//! guest, which the getting-started API sequence booted) a drive replaced on
//! the running guest, metrics, and Ctrl-Alt-Del. Linux guests boot one at a
//! time; on PVM a boot that dies of an emulation failure is retried once,
//! saying so.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::golden::{self, Netns};
use common::{
    curl, host, initramfs, kernel, linux_cmdline, linux_timeout, tmp_path, vmm, wait_for_socket,
    Running,
};

const MARKER: &str = "VMM-TEST: userspace up";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The golden guest (booted with Firecracker's getting-started API sequence
/// and saved once for the suite, tests/common/golden.rs) restored with
/// metrics configured first, as Firecracker allows before a load.
#[test]
fn a_restored_linux_gets_a_bigger_drive_metrics_and_ctrl_alt_del() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("linux-api");
    ns.add_tap("vmmtap0", None);
    let metrics = tmp_path("linux-api.metrics");
    let before = [(
        "/metrics",
        format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    )];
    let (mut vm, sock) = golden::restore_after(&ns, "vmmtap0", &g, "linux-api", &before);
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
    // User space reads the new image through the restored device.
    vm.type_on_console("dd if=/dev/vda of=/dev/null bs=4096 count=16 && echo READ-$((2 + 2))\n");
    assert!(
        vm.wait_for("READ-4", Duration::from_secs(120)),
        "{}",
        vm.stdout_now()
    );

    // Metrics: the guest read the disk, the drive was updated.
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
    eprintln!("asserting: [vda] new size after PATCH, block_data read_bytes >= 64 KiB, update_count 1, Ctrl-Alt-Del reboots, exit 0");
    assert!(sum("block_data", "read_count") > 0, "{text}");
    assert!(sum("block_data", "read_bytes") >= 65536, "{text}");
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
    out.assert_console(&["reboot: Restarting system"]);
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
