//! virtio-net with a real TAP device in a network namespace the test creates and
//! removes, and dnsmasq answering DHCP on it. Nothing touches the host's own
//! interfaces or any address outside the namespace. Needs root (CI runs as root).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::{host, kernel, linux_cmdline, resource, Host, Running};

const HOST_ADDR: &str = "192.168.77.1";
const GUEST_ADDR: &str = "192.168.77.15";
const TAP: &str = "vmmtap0";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("command runs");
    assert!(st.success(), "{args:?} failed");
}

/// A network namespace with a TAP device at HOST_ADDR and dnsmasq leasing
/// GUEST_ADDR on it; removed on drop.
struct NetNs {
    name: String,
    dnsmasq: Child,
}

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("vmm-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        sh(&["ip", "netns", "add", &name]);
        let exec = |rest: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &name];
            v.extend_from_slice(rest);
            sh(&v);
        };
        exec(&["ip", "link", "set", "lo", "up"]);
        exec(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
        exec(&["ip", "addr", "add", &format!("{HOST_ADDR}/24"), "dev", TAP]);
        exec(&["ip", "link", "set", TAP, "up"]);
        let leases = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.leases"));
        let dnsmasq = Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "dnsmasq",
                "--no-daemon",
                "--port=0",
                "--no-resolv",
                "--no-hosts",
            ])
            .arg(format!("--interface={TAP}"))
            .args(["--bind-interfaces", "--except-interface=lo"])
            .arg(format!("--dhcp-range={GUEST_ADDR},{GUEST_ADDR},1h"))
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (dnsmasq-base) is installed");
        NetNs { name, dnsmasq }
    }

    /// `cmd` run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn cmdline(host: Host, extra: &str) -> String {
    linux_cmdline(host, &format!("ip=dhcp {extra}"))
}

fn boot_timeout(host: Host) -> Duration {
    match host {
        Host::Pvm => Duration::from_secs(600),
        Host::Hardware => Duration::from_secs(60),
    }
}

#[test]
fn linux_gets_a_dhcp_lease_and_answers_100_pings_from_the_host() {
    let host = host();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("ping");
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_vmm"));
    cmd.arg("--kernel").arg(kernel("vmlinux")).args([
        "--net",
        &format!("tap={TAP}"),
        "--memory",
        "256M",
        "--log-level",
        "info",
    ]);
    // No root device ever appears: the kernel stays up, networking running.
    cmd.args(["--cmdline", &cmdline(host, "root=/dev/vdz rootwait")]);
    let mut vm = Running::start(cmd);
    let leased = vm.wait_for("IP-Config: Complete", boot_timeout(host));
    let console = vm.stdout_now();
    // First contact: let both sides resolve each other's MAC (ARP) before the
    // measured pings; the echo requests of this warm-up are not counted.
    let _ = ns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "5", "-q", GUEST_ADDR])
        .output();
    let ping = ns
        .command("ping")
        .args(["-c", "100", "-i", "0.05", "-W", "5", "-q", GUEST_ADDR])
        .output()
        .expect("ping (iputils-ping) is installed");
    vm.signal(libc::SIGTERM);
    let out = vm.finish(Duration::from_secs(20));
    eprintln!("asserting: DHCP lease {GUEST_ADDR} from dnsmasq on the TAP, 100/100 echo replies, counters at exit");
    assert!(leased, "no DHCP lease: {console}");
    assert!(
        console.contains(&format!("my address is {GUEST_ADDR}")),
        "{console}"
    );
    let summary = String::from_utf8_lossy(&ping.stdout);
    assert!(
        summary.contains("100 packets transmitted, 100 received"),
        "{summary}\nvmm: {}",
        out.stderr
    );
    assert_eq!(out.code, Some(128 + libc::SIGTERM), "{}", out.stderr);
    let counters = out
        .stderr
        .lines()
        .find(|l| l.contains("net0 (vmmtap0): tx "))
        .unwrap_or_default();
    let rx: u64 = counters
        .split("rx ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        rx >= 100,
        "the device counted the echo requests: {}",
        out.stderr
    );
}

#[test]
fn guest_user_space_pings_the_host() {
    let host = host();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("uping");
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("net-rootfs.ext4");
    std::fs::copy(resource("build-rootfs.sh"), &root).unwrap();
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_vmm"));
    cmd.arg("--kernel")
        .arg(kernel("vmlinux"))
        .arg("--rootfs")
        .arg(&root)
        .args([
            "--net",
            &format!("tap={TAP}"),
            "--memory",
            "256M",
            "--log-level",
            "info",
        ])
        .args([
            "--cmdline",
            &cmdline(host, &format!("vmm.ping={HOST_ADDR}")),
        ]);
    let out = Running::start(cmd).finish(boot_timeout(host));
    eprintln!("asserting: busybox ping from the guest's /sbin/init reaches {HOST_ADDR} on the TAP, power-off, exit 0");
    assert!(
        out.stdout
            .contains(&format!("VMM-TEST: ping {HOST_ADDR} ok")),
        "{}",
        out.stdout
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}
