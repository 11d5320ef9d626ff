//! Linux with `--enable-pci`, started as a Firecracker SDK starts it (an API
//! socket, a configuration file and the flag): every virtio device is a
//! modern virtio PCI function with MSI-X, none is on virtio-mmio; the guest
//! reads and writes its drives (the bytes checked on the host), pings over
//! its network interface and runs a command through the agent over vsock;
//! a drive and a pmem device are hotplugged and unplugged; a snapshot of it restores (in a VMM
//! started without the flag, as Firecracker restores one) and goes on with
//! its I/O on PCI, and a reboot ends the VMM with exit code 0.

mod common;

use std::path::Path;
use std::time::Duration;

use common::golden::{agent_initramfs, shell, Netns, AGENT_PORT};
use common::{curl, host, kernel, linux_cmdline, linux_timeout, pause_and_snapshot, tmp_path};
use common::{wait_for_socket, Running};
use vmm::run::vsock_connect;
use vmm_agent::{AgentClient, ExecRequest};

const GUEST_IP: &str = "172.31.251.2";
const HOST_IP: &str = "172.31.251.1";
const DATA_BYTES: usize = 256 << 10;
const HOT_BYTES: usize = 64 << 10;
/// Small drives beside the six devices the test uses: 64 virtio devices.
const EXTRA_DRIVES: usize = 58;

fn data_byte(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

/// Where the hotplugged drive lands: the 65th virtio function (function 0
/// of devices 1-31, function 1 of each, then function 2 of devices 1-3).
const HOT_FN: &str = "0000:00:03.2";
/// Where the hotplugged pmem device lands, next.
const HOT_PMEM_FN: &str = "0000:00:04.2";
/// Its block device's directory in sysfs.
const HOT_DISK: &str = "/sys/bus/pci/devices/0000:00:03.2/virtio*/block";

/// The guest's block device whose serial is `serial` (a drive's ID), as
/// shell: disks are named in the order the guest probes PCI functions.
fn disk(serial: &str) -> String {
    format!("/dev/$(grep -lx {serial} /sys/block/vd*/serial | cut -d/ -f4)")
}

/// Has the guest copy 128 KiB of drive `data` onto drive `out` from 4 KiB
/// block `first`, asserting the copy succeeded in the guest.
fn copy_data_to_out(vm: &mut Running, tag: &str, n: u32, first: u32) {
    let copied = shell(
        vm,
        tag,
        n,
        &format!(
            "dd if={} of={} bs=4096 skip={first} seek={first} count=32 conv=fsync 2>/dev/null && echo copied",
            disk("data"),
            disk("out")
        ),
    );
    assert_eq!(copied, "copied");
}

/// Has the guest ping the host once: "pong" when it answered.
fn ping_host(vm: &mut Running, tag: &str, n: u32) -> String {
    shell(
        vm,
        tag,
        n,
        &format!("ping -c 1 -W 10 {HOST_IP} >/dev/null && echo pong"),
    )
}

/// Runs `argv` in the guest through the agent: (stdout, exit code).
fn agent_run(uds: &Path, argv: &[&str]) -> (String, i32) {
    let s = vsock_connect(uds, AGENT_PORT).expect("the agent accepts");
    let client = AgentClient::from_unix(s).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let req = ExecRequest::new(argv.iter().copied());
    let status = client
        .exec(&req, std::io::empty(), &mut out, &mut err)
        .expect("the command runs");
    (
        String::from_utf8_lossy(&out).into_owned(),
        status.shell_code(),
    )
}

/// Starts `vmm --api-sock S [--enable-pci] ARGS` in `ns`.
fn start(ns: &Netns, name: &str, pci: bool, args: &[&str]) -> (Running, std::path::PathBuf) {
    let sock = tmp_path(&format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = ns.vmm();
    cmd.arg("--api-sock").arg(&sock).args(["--level", "Info"]);
    if pci {
        cmd.arg("--enable-pci");
    }
    cmd.args(args);
    let vm = Running::start(cmd);
    wait_for_socket(&sock, &vm);
    (vm, sock)
}

#[test]
fn a_pci_guest_uses_every_device_over_msix_snapshots_restores_and_reboots() {
    let host = host();
    let ns = Netns::new("pci");
    ns.add_tap("vmmtap0", Some(&format!("{HOST_IP}/24")));
    let data = tmp_path("pci-data.img");
    let out = tmp_path("pci-out.img");
    let bytes: Vec<u8> = (0..DATA_BYTES).map(data_byte).collect();
    std::fs::write(&data, &bytes).unwrap();
    std::fs::write(&out, vec![0u8; 2 * DATA_BYTES]).unwrap();
    let hot = tmp_path("pci-hot.img");
    let hot_bytes: Vec<u8> = (0..HOT_BYTES)
        .map(|i| (i * 31 % 239) as u8 ^ 0x5a)
        .collect();
    std::fs::write(&hot, &hot_bytes).unwrap();
    let uds = tmp_path("pci-v.sock");
    let _ = std::fs::remove_file(&uds);
    let boot_args = linux_cmdline(
        host,
        &format!(
            "ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off i8042.noaux i8042.nomux i8042.dumbkbd"
        ),
    );
    let mut drives = vec![
        serde_json::json!({"drive_id": "data", "path_on_host": data, "is_root_device": false, "is_read_only": true}),
        serde_json::json!({"drive_id": "out", "path_on_host": out, "is_root_device": false, "is_read_only": false}),
    ];
    for i in 0..EXTRA_DRIVES {
        let path = tmp_path(&format!("pci-extra-{i}.img"));
        std::fs::write(&path, vec![i as u8; 4096]).unwrap();
        drives.push(serde_json::json!({
            "drive_id": format!("x{i}"), "path_on_host": path,
            "is_root_device": false, "is_read_only": true,
        }));
    }
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel("vmlinux"),
            "initrd_path": agent_initramfs(),
            "boot_args": boot_args,
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": drives,
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "vmmtap0"}],
        "vsock": {"guest_cid": 3, "uds_path": uds},
        "entropy": {},
        "balloon": {"amount_mib": 0, "deflate_on_oom": false},
    });
    let config_file = tmp_path("pci-vm.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let config_arg = config_file.display().to_string();
    let (mut vm, sock) = start(&ns, "pci", true, &["--config-file", &config_arg]);
    assert!(
        vm.wait_for("VMM-TEST: shell", linux_timeout(host)),
        "no shell: {}",
        vm.stdout_now()
    );

    // What the guest sees on its PCI bus: the host bridge and 64 virtio
    // functions, modern IDs (0x1040 + the virtio device ID), the first 31
    // as function 0 of devices 1-31, the others as further functions.
    let ids = shell(
        &mut vm,
        "ids",
        1,
        "mkdir -p /sys; mount -t sysfs sysfs /sys 2>/dev/null; cat /sys/bus/pci/devices/*/vendor /sys/bus/pci/devices/*/device | sort | uniq -c | tr '\\n' ' '",
    );
    eprintln!("asserting: PCI vendor and device IDs (count, ID) {ids}");
    let blocks = (2 + EXTRA_DRIVES).to_string();
    let virtio = (6 + EXTRA_DRIVES).to_string();
    let want = [
        "1", "0x0d57", // host bridge
        "1", "0x1041", // net
        &blocks, "0x1042", // block
        "1", "0x1044", // entropy
        "1", "0x1045", // balloon
        "1", "0x1053", // vsock
        &virtio, "0x1af4", // virtio's vendor
        "1", "0x8086", // the host bridge's
    ];
    assert_eq!(ids.split_whitespace().collect::<Vec<_>>(), want);
    let disks = shell(&mut vm, "disks", 11, "ls /sys/block | grep -c vd");
    eprintln!("asserting: {disks} virtio-blk disks in the guest");
    assert_eq!(disks, (2 + EXTRA_DRIVES).to_string());
    // Every virtio device hangs off PCI; none is a virtio-mmio platform device.
    let parents = shell(
        &mut vm,
        "par",
        2,
        "echo $(ls /sys/bus/virtio/devices | wc -l) $(ls -l /sys/bus/virtio/devices | grep -c /pci0000:00/)",
    );
    eprintln!("asserting: virtio devices, and how many are PCI functions: {parents}");
    let n = (6 + EXTRA_DRIVES).to_string();
    assert_eq!(
        parents.split_whitespace().collect::<Vec<_>>(),
        [n.as_str(), n.as_str()]
    );
    // One MSI-X vector per queue plus one for configuration changes.
    let msi = shell(
        &mut vm,
        "msi",
        3,
        "grep PCI-MSI /proc/interrupts | grep -c virtio",
    );
    let vectors: u32 = msi.parse().unwrap_or(0);
    eprintln!("asserting: {vectors} PCI-MSI interrupt lines of virtio devices");
    // blk 1+1 each, net 2+1, entropy 1+1, balloon 2+1 (no statistics), vsock 3+1.
    assert!(vectors as usize >= 15 + 2 * EXTRA_DRIVES, "{msi}");

    // I/O: the read-only drive copied onto the writable one, checked on the host.
    copy_data_to_out(&mut vm, "dd", 4, 0);
    let written = std::fs::read(&out).unwrap();
    eprintln!("asserting: 128 KiB of drive 'data' on drive 'out', on the host");
    assert!(written[..128 << 10] == bytes[..128 << 10]);
    assert!(written[128 << 10..].iter().all(|&b| b == 0));
    // Network and vsock.
    eprintln!("asserting: the guest pings the host over virtio-net on PCI");
    assert_eq!(ping_host(&mut vm, "ping", 5), "pong");
    let (agent_out, code) = agent_run(&uds, &["sh", "-c", "echo through-$((6*7))"]);
    eprintln!("asserting: a command runs through the agent over vsock on PCI");
    assert_eq!((agent_out.as_str(), code), ("through-42\n", 0));

    // Hotplug: a drive added to the running VM, found after a rescan.
    let hot_body = format!(
        r#"{{"drive_id": "hot", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
        hot.display()
    );
    let plugged = curl(&sock, "PUT", "/drives/hot", Some(&hot_body));
    eprintln!("asserting: PUT /drives/hot on the running PCI VM: {plugged:?}");
    assert_eq!(plugged, (204, String::new()));
    let again = curl(&sock, "PUT", "/drives/hot", Some(&hot_body));
    assert_eq!(again.0, 400, "{again:?}");
    assert!(again.1.contains("Device ID in use"), "{again:?}");
    let found = shell(
        &mut vm,
        "hot",
        8,
        &format!("echo 1 > /sys/bus/pci/rescan; i=0; while [ ! -e {HOT_DISK} ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; echo $(cat /sys/bus/pci/devices/{HOT_FN}/device) $(dd if=/dev/$(ls {HOT_DISK}) of={} bs=4096 seek=64 count=16 conv=fsync 2>/dev/null && echo copied)", disk("out")),
    );
    eprintln!("asserting: the guest finds the hotplugged drive at {HOT_FN} and reads it: {found}");
    assert_eq!(found, "0x1042 copied");
    let written = std::fs::read(&out).unwrap();
    assert!(written[DATA_BYTES..DATA_BYTES + HOT_BYTES] == hot_bytes[..]);
    // And a read-only pmem device: its file in guest-physical memory.
    let hot_pmem = tmp_path("pci-hotpm.bin");
    let mut pmem_bytes = b"vmm-pmem-hotplug".to_vec();
    pmem_bytes.resize(1 << 20, 0x3c);
    std::fs::write(&hot_pmem, &pmem_bytes).unwrap();
    let pmem_body = format!(
        r#"{{"id": "hotpm", "path_on_host": "{}", "read_only": true}}"#,
        hot_pmem.display()
    );
    let plugged = curl(&sock, "PUT", "/pmem/hotpm", Some(&pmem_body));
    eprintln!("asserting: PUT /pmem/hotpm on the running PCI VM: {plugged:?}");
    assert_eq!(plugged, (204, String::new()));
    let found = shell(
        &mut vm,
        "hotpm",
        12,
        &format!("echo 1 > /sys/bus/pci/rescan; i=0; while [ ! -e /dev/pmem0 ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; echo $(cat /sys/bus/pci/devices/{HOT_PMEM_FN}/device) $(head -c 16 /dev/pmem0) $(cat /sys/block/pmem0/size)"),
    );
    eprintln!("asserting: the guest finds the hotplugged pmem device at {HOT_PMEM_FN} and reads its file: {found}");
    assert_eq!(found, "0x105b vmm-pmem-hotplug 4096");

    // Snapshot (with the hotplugged drive), then a VMM without the flag
    // refuses it and one with it goes on.
    let snap = tmp_path("pci.snap");
    let mem = tmp_path("pci.mem");
    pause_and_snapshot(&sock, &snap, &mem);
    vm.signal(libc::SIGKILL);
    drop(vm);
    let load = |uds: &Path| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true, "vsock_override": {{"uds_path": "{}"}}}}"#,
            snap.display(),
            mem.display(),
            uds.display()
        )
    };
    // As Firecracker (whose own suite restores PCI snapshots so): the
    // devices come back on PCI in a VMM started without --enable-pci.
    let uds2 = tmp_path("pci-v2.sock");
    let _ = std::fs::remove_file(&uds2);
    let (mut vm, sock) = start(&ns, "pci-restored", false, &[]);
    let (status, body) = curl(&sock, "PUT", "/snapshot/load", Some(&load(&uds2)));
    eprintln!("asserting: a VMM started without --enable-pci restores the PCI snapshot");
    assert_eq!((status, body.as_str()), (204, ""), "{}", vm.stdout_now());
    copy_data_to_out(&mut vm, "dd2", 6, 32);
    let written = std::fs::read(&out).unwrap();
    eprintln!("asserting: after the restore the guest wrote the other 128 KiB, on the host");
    assert!(written[..DATA_BYTES] == bytes[..]);
    assert_eq!(ping_host(&mut vm, "ping2", 7), "pong");
    let (agent_out, code) = agent_run(&uds2, &["cat", "/proc/sys/kernel/hostname"]);
    assert_eq!(code, 0, "{agent_out}");

    // Unplug: refused while the guest drives it, done once it let go.
    let busy = curl(&sock, "DELETE", "/drives/hot", None);
    eprintln!("asserting: DELETE while the guest uses the drive: {busy:?}");
    assert_eq!(busy.0, 400, "{busy:?}");
    assert!(busy.1.contains(&format!("{HOT_FN}/remove")), "{busy:?}");
    let root = curl(&sock, "DELETE", "/drives/nosuch", None);
    assert!(root.1.contains("Device not found"), "{root:?}");
    let released = shell(
        &mut vm,
        "rm",
        9,
        &format!("echo $(dd if=/dev/$(ls {HOT_DISK}) bs=4096 count=1 2>/dev/null | wc -c) $(head -c 16 /dev/pmem0) $(echo 1 > /sys/bus/pci/devices/{HOT_FN}/remove; echo 1 > /sys/bus/pci/devices/{HOT_PMEM_FN}/remove; ls /sys/bus/pci/devices | wc -l)"),
    );
    eprintln!(
        "asserting: the restored guest reads the hotplugged drive, then releases it: {released}"
    );
    assert_eq!(
        released,
        format!("4096 vmm-pmem-hotplug {}", 7 + EXTRA_DRIVES)
    );
    let unplugged = curl(&sock, "DELETE", "/drives/hot", None);
    eprintln!("asserting: DELETE /drives/hot after the guest released it: {unplugged:?}");
    assert_eq!(unplugged, (204, String::new()));
    let unplugged = curl(&sock, "DELETE", "/pmem/hotpm", None);
    eprintln!("asserting: DELETE /pmem/hotpm after the guest released it: {unplugged:?}");
    assert_eq!(unplugged, (204, String::new()));
    let config = curl(&sock, "GET", "/vm/config", None).1;
    assert!(
        !config.contains("pci-hot.img") && !config.contains("pci-hotpm.bin"),
        "{config}"
    );
    let gone = shell(
        &mut vm,
        "gone",
        10,
        "echo 1 > /sys/bus/pci/rescan; ls /sys/bus/pci/devices | wc -l",
    );
    eprintln!("asserting: a rescan does not find it again: {gone} functions");
    assert_eq!(gone, (7 + EXTRA_DRIVES).to_string());

    vm.type_on_console("reboot -f\n");
    let outcome = vm.finish(Duration::from_secs(120));
    eprintln!("asserting: reboot ends the VMM with exit code 0");
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    drop(sock);
}
