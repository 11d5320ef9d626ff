//! virtio-net with a real TAP device in a network namespace the test creates and
//! removes, and dnsmasq answering DHCP on it. Nothing touches the host's own
//! interfaces or any address outside the namespace. Needs root (CI runs as root).

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::{
    curl, guest, host, kernel, linux_cmdline, resource, run_linux, start_linux, tmp_path,
    wait_for_socket, Host, Running,
};

const HOST_ADDR: &str = "192.168.77.1";
const GUEST_ADDR: &str = "192.168.77.15";
const TAP: &str = "vmmtap0";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `ip ARGS` inside network namespace `ns`; panics unless it succeeds.
fn ip_in(ns: &str, args: &[&str]) {
    sh(&[&["ip", "netns", "exec", ns, "ip"][..], args].concat());
}

/// Creates TAP device `name` with host address `addr` (CIDR) and brings it up,
/// running `ip ARGS` through `ip`.
fn add_tap(ip: impl Fn(&[&str]), name: &str, addr: &str) {
    ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
    ip(&["addr", "add", addr, "dev", name]);
    ip(&["link", "set", name, "up"]);
}

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
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &name]);
        ip_in(&name, &["link", "set", "lo", "up"]);
        add_tap(|a| ip_in(&name, a), TAP, &format!("{HOST_ADDR}/24"));
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

    /// `ip ARGS` inside the namespace; panics unless it succeeds.
    fn ip(&self, args: &[&str]) {
        ip_in(&self.name, args);
    }

    /// Pings `addr` from the namespace until COUNT echo replies have come back
    /// (or 60 s have passed): `ping -c COUNT -w 60 -i INTERVAL ADDR`. Waiting
    /// for the replies, not for a fixed time after the last request, means a
    /// slow reply is not taken for a lost one.
    fn ping(&self, count: u32, interval: &str, addr: &str) -> Pings {
        let out = self
            .command("ping")
            .args(["-c", &count.to_string(), "-w", "60", "-i", interval, addr])
            .output()
            .expect("ping (iputils-ping) is installed");
        Pings {
            count,
            output: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    }

    /// First contact with a guest whose kernel has just configured its network:
    /// resolves its MAC (ARP) and waits until it answers, before pings that are
    /// counted. Right after "IP-Config: Complete" the guest kernel ignores the
    /// first ARP request, under QEMU as under vmm (seen with tcpdump on the TAP:
    /// the request the host repeats a second later is answered), so the echo
    /// requests queued behind it are not a measure of the device.
    fn first_contact(&self, addr: &str) {
        let _ = self.ping(3, "0.2", addr);
    }

    /// The project's Linux kernel on the namespace's TAPs (`nets`: --net specs),
    /// with `extra` on its command line and no root device ever appearing, so
    /// that it stays up with networking running. Returns once the kernel has
    /// configured its network ("IP-Config: Complete"), with whether it did.
    fn kept_alive_linux(&self, host: Host, nets: &[&str], extra: &str) -> (Running, bool) {
        let make = || {
            let mut cmd = self.vmm(&kernel("vmlinux"), nets);
            cmd.args(["--memory", "256M", "--cmdline"])
                .arg(linux_cmdline(
                    host,
                    &format!("{extra} root=/dev/vdz rootwait"),
                ));
            cmd
        };
        start_linux(host, make, "IP-Config: Complete", boot_timeout(host))
    }

    /// `vmm --kernel KERNEL --net NET... --log-level info` inside the namespace,
    /// so that the device counters are logged at exit.
    fn vmm(&self, kernel: &Path, nets: &[&str]) -> Command {
        let mut cmd = self.command(env!("CARGO_BIN_EXE_vmm"));
        cmd.arg("--kernel").arg(kernel);
        for net in nets {
            cmd.args(["--net", net]);
        }
        cmd.args(["--log-level", "info"]).stdin(Stdio::null());
        cmd
    }

    /// `cmd` run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

/// What `NetNs::ping` printed.
struct Pings {
    count: u32,
    output: String,
}

impl Pings {
    /// The sequence numbers among the first `count` echo requests that got no
    /// reply. With -w, ping keeps sending until `count` replies have come, so
    /// a request may still be in flight when it stops; replies come back in
    /// order (one TAP queue, one guest queue), so requests 1..=count all
    /// answered means none of them was lost.
    fn unanswered(&self) -> Vec<u32> {
        let replies: Vec<&str> = self
            .output
            .lines()
            .filter(|l| l.contains(" bytes from "))
            .collect();
        (1..=self.count)
            .filter(|seq| {
                let seq = format!(" icmp_seq={seq} ");
                !replies.iter().any(|l| l.contains(&seq))
            })
            .collect()
    }

    /// ping's closing statistics.
    fn summary(&self) -> &str {
        self.output.split("--- ").nth(1).unwrap_or(&self.output)
    }
}

/// A raw packet socket on the namespace's TAP for frames of `ethertype`: it
/// captures what the guest sends, and what is sent on it goes to the guest.
/// Created by a thread that enters the namespace (setns changes only that thread).
fn packet_socket(ns: &NetNs, ethertype: u16) -> OwnedFd {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::scope(|s| {
        s.spawn(|| {
            let nsfile = std::fs::File::open(&path).expect("the namespace exists");
            // SAFETY: nsfile is an open network namespace; setns changes only this
            // thread, which ends right after creating the socket.
            let rc = unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let proto = i32::from(ethertype.to_be());
            // SAFETY: plain socket creation; the result is checked.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd is a new descriptor owned from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = CString::new(TAP).unwrap();
            // SAFETY: name is a NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex > 0, "{TAP} exists in the namespace");
            // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ethertype.to_be();
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: sll is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval {
                tv_sec: 60,
                tv_usec: 0,
            };
            // SAFETY: timeout is a valid timeval of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(rc, 0);
            fd
        })
        .join()
        .expect("the namespace thread ends")
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_second_interface_on_a_second_tap_answers_pings() {
    let host = host();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("two");
    add_tap(|a| ns.ip(a), "vmmtap1", "192.168.78.1/24");
    // The second interface (eth1) gets a static address on the second TAP's subnet.
    let (vm, up) = ns.kept_alive_linux(
        host,
        &[&format!("tap={TAP}"), "tap=vmmtap1,mac=02:00:00:00:01:15"],
        "ip=192.168.78.15::192.168.78.1:255.255.255.0::eth1:off",
    );
    ns.first_contact("192.168.78.15");
    let pings = ns.ping(10, "0.2", "192.168.78.15");
    vm.signal(libc::SIGTERM);
    let out = vm.finish(Duration::from_secs(20));
    eprintln!("asserting: eth1 configured, 10/10 echo replies over vmmtap1, the second device's counters at exit");
    // The console at exit: the lines after "IP-Config: Complete" may not have
    // been printed yet when the wait ends.
    out.assert_console(&["IP-Config: Complete"]);
    assert!(up, "the milestone came only after the boot timeout");
    out.assert_console(&["device=eth1, hwaddr=02:00:00:00:01:15, ipaddr=192.168.78.15,"]);
    assert_eq!(
        pings.unanswered(),
        Vec::<u32>::new(),
        "echo requests without a reply\n{}\nvmm: {}",
        pings.summary(),
        out.stderr
    );
    assert!(
        rx_packets(&out.stderr, "net1 (vmmtap1)") >= 10,
        "net1 counted the echo requests: {}",
        out.stderr
    );
}

#[test]
fn a_tap_device_the_user_may_not_attach_is_a_one_line_error() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("perm");
    // Owned by another user: attaching needs CAP_NET_ADMIN, which the VMM is
    // started without (as root, so /dev/kvm and /dev/net/tun still open).
    ns.ip(&[
        "tuntap", "add", "dev", "vmmtap1", "mode", "tap", "user", "4242",
    ]);
    let out = ns
        .command("setpriv")
        .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin"])
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .arg("--kernel")
        .arg(guest("hello"))
        .args(["--net", "tap=vmmtap1"])
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("asserting: exit 2, one line naming the TAP device and the fix, no guest output");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("Cannot attach TAP device 'vmmtap1'")
            && stderr.contains("Operation not permitted")
            && stderr.contains("device's owner"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "the guest never ran");
}

#[test]
fn test_guest_frame_is_captured_byte_exact_and_an_injected_frame_reaches_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("frame");
    let guest_mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x42];
    let capture = packet_socket(&ns, 0x88b5);
    let mut cmd = ns.vmm(
        &guest("virtio_net"),
        &[&format!("tap={TAP},mac=02:00:00:00:00:42,id=eth0")],
    );
    let metrics = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("net-frame.metrics");
    let _ = std::fs::remove_file(&metrics);
    cmd.arg("--metrics-path").arg(&metrics);
    let vm = Running::start(cmd);

    // What the guest sends: broadcast, from its MAC, EtherType 0x88b5, 64 bytes.
    let mut want = vec![0xff; 6];
    want.extend(guest_mac);
    want.extend([0x88, 0xb5]);
    want.extend((0..64u32).map(|i| (i * 7 + 3) as u8));
    let mut buf = vec![0u8; 2048];
    // SAFETY: receives into a valid buffer of buf.len() bytes.
    let n = unsafe { libc::recv(capture.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let captured = if n >= 0 { &buf[..n as usize] } else { &[][..] };

    // What the host injects: to the guest's MAC, EtherType 0x88b6, 50 bytes.
    let mut inject = guest_mac.to_vec();
    inject.extend([0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x88, 0xb6]);
    inject.extend((0..50u32).map(|i| (i * 11 + 5) as u8));
    let inject_sock = packet_socket(&ns, 0x88b6);
    // SAFETY: sends from a valid buffer of inject.len() bytes.
    let sent = unsafe {
        libc::send(
            inject_sock.as_raw_fd(),
            inject.as_ptr().cast(),
            inject.len(),
            0,
        )
    };
    let out = vm.finish(Duration::from_secs(60));
    eprintln!("asserting: the guest's frame captured byte-exact on the TAP, the injected frame printed byte-exact by the guest with num_buffers 1, exit 0");
    assert_eq!(hex(captured), hex(&want), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(sent, inject.len() as isize);
    let line = format!(
        "VMM-GUEST: received {:016x} num_buffers {:016x} header {} frame {}",
        inject.len(),
        1,
        hex(&[0; 10]),
        hex(&inject)
    );
    assert!(out.stdout.contains(&line), "want {line}\n{}", out.stdout);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // The metrics line written at exit counts exactly these two frames.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a metrics line")).unwrap();
    // (The TAP may also deliver the host's own frames, e.g. IPv6 neighbour
    // discovery: at least the injected one was received.)
    eprintln!("asserting: the metrics line at exit counts the guest's 1 frame sent and >= 1 received, on net_eth0 and in net");
    for group in ["net_eth0", "net"] {
        assert_eq!(last[group]["tx_packets_count"], 1, "{group}: {text}");
        assert!(
            last[group]["rx_packets_count"].as_u64() >= Some(1),
            "{group}: {text}"
        );
        assert_eq!(
            last[group]["tx_bytes_count"],
            want.len() as u64,
            "{group}: {text}"
        );
    }
}

#[test]
fn a_vmm_that_joined_the_namespace_without_its_sysfs_attaches_the_tap_over_the_api() {
    // nsenter joins only the network namespace: /sys is still the host's, as
    // for a process that called setns(2) (CNI plugins, Kata). The TAP must be
    // found in the namespace all the same.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("setns");
    let sock = tmp_path("net-setns.sock");
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", ns.name))
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null());
    let mut vm = Running::start(cmd);
    wait_for_socket(&sock, &vm);
    let boot = format!(
        r#"{{"kernel_image_path": "{}"}}"#,
        guest("virtio_net").display()
    );
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let iface = format!(
        r#"{{"iface_id": "eth0", "host_dev_name": "{TAP}", "guest_mac": "02:00:00:00:00:42"}}"#
    );
    eprintln!("asserting: PUT /network-interfaces finds {TAP} in the namespace, InstanceStart attaches it, the guest sends a frame");
    assert_eq!(
        curl(&sock, "PUT", "/network-interfaces/eth0", Some(&iface)),
        (204, String::new())
    );
    let missing = r#"{"iface_id": "eth1", "host_dev_name": "vmmnosuch1"}"#;
    let (code, body) = curl(&sock, "PUT", "/network-interfaces/eth1", Some(missing));
    assert_eq!(code, 400);
    assert!(body.contains("no network interface 'vmmnosuch1'"), "{body}");
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(
        curl(&sock, "PUT", "/actions", Some(start)),
        (204, String::new())
    );
    assert!(
        vm.wait_for("VMM-GUEST: frame sent", Duration::from_secs(30)),
        "{}",
        vm.stdout_now()
    );
    vm.signal(libc::SIGTERM);
    let out = vm.finish(Duration::from_secs(30));
    assert_eq!(out.code, Some(128 + libc::SIGTERM), "{}", out.stderr);
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

/// The received-packets counter of `device` ("net0 (vmmtap0)") in the
/// counters vmm logs at exit; 0 if absent.
fn rx_packets(stderr: &str, device: &str) -> u64 {
    stderr
        .lines()
        .find(|l| l.contains(&format!("{device}: tx ")))
        .and_then(|l| l.split("rx ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn cmdline(host: Host, extra: &str) -> String {
    linux_cmdline(host, &format!("ip=dhcp {extra}"))
}

fn boot_timeout(host: Host) -> Duration {
    match host {
        Host::Pvm => Duration::from_secs(900),
        Host::Hardware => Duration::from_secs(60),
    }
}

#[test]
fn linux_gets_a_dhcp_lease_and_answers_100_pings_from_the_host() {
    let host = host();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("ping");
    let (vm, leased) = ns.kept_alive_linux(host, &[&format!("tap={TAP}")], "ip=dhcp");
    ns.first_contact(GUEST_ADDR);
    let pings = ns.ping(100, "0.05", GUEST_ADDR);
    vm.signal(libc::SIGTERM);
    let out = vm.finish(Duration::from_secs(20));
    eprintln!("asserting: DHCP lease {GUEST_ADDR} from dnsmasq on the TAP, 100/100 echo replies, counters at exit");
    out.assert_console(&["IP-Config: Complete"]);
    assert!(leased, "the lease came only after the boot timeout");
    out.assert_console(&[&format!("my address is {GUEST_ADDR}")]);
    assert_eq!(
        pings.unanswered(),
        Vec::<u32>::new(),
        "echo requests without a reply\n{}\nvmm: {}",
        pings.summary(),
        out.stderr
    );
    assert_eq!(out.code, Some(128 + libc::SIGTERM), "{}", out.stderr);
    assert!(
        rx_packets(&out.stderr, "net0 (vmmtap0)") >= 100,
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
    let make = || {
        let mut cmd = ns.vmm(&kernel("vmlinux"), &[&format!("tap={TAP}")]);
        cmd.arg("--rootfs").arg(&root).args([
            "--memory",
            "256M",
            "--cmdline",
            &cmdline(host, &format!("vmm.ping={HOST_ADDR}")),
        ]);
        cmd
    };
    let out = run_linux(host, make, boot_timeout(host));
    eprintln!("asserting: busybox ping from the guest's /sbin/init reaches {HOST_ADDR} on the TAP, power-off, exit 0");
    out.assert_console(&[&format!("VMM-TEST: ping {HOST_ADDR} ok")]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}
