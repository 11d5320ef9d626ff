//! The control API through the real binary and real clients (curl over the
//! Unix socket, Python's http.client over AF_UNIX, raw sockets for hostile
//! clients), with test guests: Firecracker's conventions, the lifecycle,
//! pause/resume, configuration files, metrics, logs, and clients that misbehave.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// Asserts a 400 whose fault_message contains `want`.
fn assert_fault((code, body): (u16, String), want: &str) {
    assert_eq!(code, 400, "{body}");
    let msg = json(&body)["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message: {body}"))
        .to_string();
    assert!(msg.contains(want), "fault {msg:?} lacks {want:?}");
}

/// A VMM serving its API on a fresh socket, with `args` added.
fn state(sock: &Path) -> String {
    let (code, body) = curl(sock, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    json(&body)["state"].as_str().unwrap().to_string()
}

/// The counts the counter guest has printed so far.
fn counts(vm: &Running) -> Vec<u64> {
    guest_counts(&vm.stdout_now())
}

/// CPU time of the VMM's thread named `name`.
fn thread_cpu(pid: u32, name: &str) -> Duration {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.join("stat")).unwrap();
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
            // SAFETY: sysconf has no memory-safety preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
            return Duration::from_millis(ticks * 1000 / hz);
        }
    }
    panic!("no thread {name:?} in {pid}");
}

fn count_entries(dir: String) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The number of entries in `dir` once it has not changed for 200 ms (the
/// server closes a connection only after it sees the client's end).
fn settled_count(dir: String) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = count_entries(dir.clone());
    let mut stable_since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = count_entries(dir.clone());
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(200) {
            break;
        }
    }
    last
}

#[test]
fn getting_started_sequence_then_pause_and_resume_exactly() {
    let (mut vm, sock) = api_vmm("api-lifecycle", &[]);
    assert_eq!(state(&sock), "Not started");
    let (code, body) = curl(&sock, "GET", "/machine-config", None);
    assert_eq!(code, 200);
    let m = json(&body);
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(1), Some(128))
    );

    let kernel = guest("counter");
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let mc = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
    assert_eq!(
        curl(&sock, "PUT", "/machine-config", Some(mc)),
        (204, String::new())
    );
    assert_eq!(
        curl(
            &sock,
            "PATCH",
            "/machine-config",
            Some(r#"{"mem_size_mib": 96}"#)
        )
        .0,
        204
    );
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    let cfg = json(&cfg);
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 96);
    assert_eq!(
        cfg["boot-source"]["kernel_image_path"],
        kernel.to_str().unwrap()
    );

    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(
        curl(&sock, "PUT", "/actions", Some(start)),
        (204, String::new())
    );
    assert_eq!(state(&sock), "Running");
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000003", TIMEOUT));
    // Pre-boot calls are refused now.
    assert_fault(
        curl(&sock, "PUT", "/boot-source", Some(&boot)),
        "not supported after starting",
    );
    assert_fault(
        curl(&sock, "PUT", "/machine-config", Some(mc)),
        "not supported after starting",
    );
    assert_fault(
        curl(&sock, "PUT", "/actions", Some(start)),
        "not supported after starting",
    );
    // Hotplug and unplug need PCI (--enable-pci), in Firecracker's words.
    let hot = r#"{"drive_id": "hot", "path_on_host": "/dev/null", "is_root_device": false, "is_read_only": true}"#;
    assert_fault(
        curl(&sock, "PUT", "/drives/hot", Some(hot)),
        "PCI is not enabled",
    );
    assert_fault(
        curl(&sock, "DELETE", "/drives/hot", None),
        "PCI is not enabled",
    );
    assert_fault(
        curl(&sock, "DELETE", "/network-interfaces/eth9", None),
        "PCI is not enabled",
    );
    let pmem = r#"{"id": "hotpm", "path_on_host": "/dev/null"}"#;
    assert_fault(
        curl(&sock, "PUT", "/pmem/hotpm", Some(pmem)),
        "PCI is not enabled",
    );
    assert_fault(
        curl(&sock, "DELETE", "/pmem/hotpm", None),
        "PCI is not enabled",
    );

    assert_eq!(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    assert_eq!(state(&sock), "Paused");
    let pid = vm.child.id();
    let seen = counts(&vm).len();
    let cpu = thread_cpu(pid, "fc_vcpu 0");
    std::thread::sleep(Duration::from_secs(2));
    let paused = counts(&vm);
    eprintln!("asserting: no guest output and no vCPU CPU time for 2 s while paused");
    assert_eq!(paused.len(), seen, "the guest printed while paused");
    let spent = thread_cpu(pid, "fc_vcpu 0") - cpu;
    assert!(
        spent <= Duration::from_millis(20),
        "vCPU used {spent:?} while paused"
    );
    // Pausing again changes nothing (as Firecracker).
    assert_eq!(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );

    assert_eq!(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    assert_eq!(state(&sock), "Running");
    let last = *paused.last().unwrap();
    let next = format!("VMM-GUEST: count {:016x}", last + 1);
    assert!(vm.wait_for(&next, TIMEOUT), "no {next} after resume");
    let after = counts(&vm);
    eprintln!("asserting: counting resumed at {} after {last}", last + 1);
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "a count was skipped or repeated"
    );

    vm.signal(libc::SIGTERM);
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.code, Some(128 + libc::SIGTERM), "{}", out.stderr);
    assert!(!sock.exists(), "the API socket is removed at exit");
}

#[test]
fn calls_out_of_order_are_refused_with_firecracker_s_rules() {
    let (vm, sock) = api_vmm("api-rules", &[]);
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        ),
        "without kernel configuration",
    );
    assert_fault(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        "not supported before starting",
    );
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        ),
        "not supported before starting",
    );
    assert_fault(
        curl(
            &sock,
            "PATCH",
            "/drives/rootfs",
            Some(r#"{"drive_id": "rootfs", "path_on_host": "/x"}"#),
        ),
        "not supported before starting",
    );
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
        ),
        "not supported before starting",
    );
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/nonexistent/k"}"#),
        ),
        "'/nonexistent/k'",
    );
    let img = tmp_path("api-rules-disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let d = |id: &str, root: bool| {
        format!(
            r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": {root}, "is_read_only": false, "rate_limiter": {{"ops": {{"size": 100, "refill_time": 1000}}}}}}"#,
            img.display()
        )
    };
    assert_eq!(curl(&sock, "PUT", "/drives/a", Some(&d("a", true))).0, 204);
    assert_fault(
        curl(&sock, "PUT", "/drives/b", Some(&d("b", true))),
        "both root devices",
    );
    assert_fault(
        curl(&sock, "PUT", "/drives/c", Some(&d("d", false))),
        "does not match",
    );
    // Stored and returned.
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    let cfg = json(&cfg);
    assert_eq!(cfg["drives"].as_array().unwrap().len(), 1);
    assert_eq!(cfg["drives"][0]["rate_limiter"]["ops"]["size"], 100);
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "vmmnosuchtap9"}"#),
        ),
        "no network interface 'vmmnosuchtap9'",
    );
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/mmds/config",
            Some(r#"{"network_interfaces": ["eth9"]}"#),
        ),
        "does not correspond to any existing network interface: 'eth9'",
    );
    assert_fault(
        curl(&sock, "GET", "/balloon", None),
        "No balloon device is configured",
    );
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#),
        ),
        "not supported before starting",
    );
    assert_fault(
        curl(&sock, "GET", "/no/such/path", None),
        "Invalid request method and/or path",
    );
    let (code, body) = curl(&sock, "GET", "/version", None);
    assert_eq!(code, 200);
    assert!(json(&body)["firecracker_version"].is_string());
    drop(vm);
}

#[test]
fn python_http_client_over_af_unix_configures_and_boots() {
    let (mut vm, sock) = api_vmm("api-python", &["--id", "py-vm-1"]);
    let script = r#"
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
c = Conn(sys.argv[1])
def call(method, path, body=None):
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if data else None)
# One keep-alive connection for everything.
assert call("GET", "/") == (200, {"app_name": "vmm", "id": "py-vm-1", "state": "Not started", "vmm_version": call("GET", "/")[1]["vmm_version"]})
assert call("PUT", "/boot-source", {"kernel_image_path": sys.argv[2]}) == (204, None)
assert call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32, "smt": False, "track_dirty_pages": False}) == (204, None)
s, b = call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32, "bogus": 1})
assert s == 400 and "unknown field" in b["fault_message"], b
assert call("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
assert call("GET", "/")[1]["state"] == "Running"
print("python client: ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&sock)
        .arg(guest("counter"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000001", TIMEOUT));
    vm.signal(libc::SIGINT);
    assert_eq!(vm.finish(TIMEOUT).code, Some(128 + libc::SIGINT));
}

#[test]
fn config_file_boots_with_and_without_the_api() {
    let cfg = tmp_path("api-config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#,
            guest("hello").display()
        ),
    )
    .unwrap();
    let out = run(
        {
            let mut c = vmm();
            c.arg("--no-api").arg("--config-file").arg(&cfg);
            c
        },
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.guest_lines(), ["hello from the test guest"]);

    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#,
            guest("counter").display()
        ),
    )
    .unwrap();
    let (mut vm, sock) = api_vmm("api-config", &["--config-file", cfg.to_str().unwrap()]);
    assert_eq!(state(&sock), "Running");
    let (_, body) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(json(&body)["machine-config"]["mem_size_mib"], 64);
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000002", TIMEOUT));
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish(TIMEOUT).code, Some(128 + libc::SIGTERM));
}

/// Runs `vmm args`, expects exit 2 with one line naming `want`.
/// Firecracker's exit codes for bad input (only Firecracker's flags given).
const FC_GENERIC: i32 = 1;
const FC_ARG_PARSING: i32 = 153;

fn assert_refused(args: &[&str], want: &str, code: i32) {
    let out = run(
        {
            let mut c = vmm();
            c.args(args);
            c
        },
        TIMEOUT,
    );
    assert_eq!(out.code, Some(code), "{args:?}: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {}", out.stderr);
    assert!(lines[0].contains(want), "{args:?}: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"));
}

#[test]
fn bad_process_flags_and_files_are_one_line_errors() {
    assert_refused(
        &["--no-api"],
        "--no-api needs --config-file",
        FC_ARG_PARSING,
    );
    assert_refused(
        &["--no-api", "--config-file", "/nonexistent/vm.json"],
        "'/nonexistent/vm.json' cannot be read",
        FC_GENERIC,
    );
    let bad = tmp_path("api-bad-config.json");
    std::fs::write(
        &bad,
        r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "balloon": {"amount_mib": 65, "deflate_on_oom": true}}"#,
    )
    .unwrap();
    assert_refused(
        &["--no-api", "--config-file", bad.to_str().unwrap()],
        "balloon amount_mib 65 is more than the guest's 64 MiB of memory",
        FC_GENERIC,
    );
    std::fs::write(
        &bad,
        r#"{"boot-source": {"kernel_image_path": "k", "bogus": 1}}"#,
    )
    .unwrap();
    assert_refused(
        &["--no-api", "--config-file", bad.to_str().unwrap()],
        "unknown field `bogus`",
        FC_GENERIC,
    );
    assert_refused(
        &[
            "--api-sock",
            "/tmp/x.sock",
            "--metadata",
            "/nonexistent/m.json",
        ],
        "Unable to open or read from the mmds content file '/nonexistent/m.json'",
        FC_GENERIC,
    );
    assert_refused(
        &["--api-sock", "/tmp/x.sock", "--id", "bad id"],
        "--id 'bad id'",
        FC_ARG_PARSING,
    );
    let taken = tmp_path("api-taken.sock");
    std::fs::write(&taken, b"not a socket").unwrap();
    assert_refused(
        &["--api-sock", taken.to_str().unwrap()],
        "Failed to open the API socket at",
        FC_GENERIC,
    );
    assert_eq!(
        std::fs::read(&taken).unwrap(),
        b"not a socket",
        "left as it was"
    );
}

#[test]
fn flush_metrics_counts_block_io_and_the_log_has_the_boot_time() {
    let img = tmp_path("api-metrics-disk.img");
    let bytes: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&img, &bytes).unwrap();
    let metrics = tmp_path("api-metrics.json");
    let log = tmp_path("api-metrics.log");
    let (mut vm, sock) = api_vmm(
        "api-metrics",
        &[
            "--kernel",
            guest("virtio_blk").to_str().unwrap(),
            "--disk",
            &format!("path={},id=data", img.display()),
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
            "--show-level",
        ],
    );
    assert!(
        vm.wait_for("VMM-GUEST: flushed, halting", TIMEOUT),
        "{}",
        vm.stdout_now()
    );
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(
        curl(&sock, "PUT", "/actions", Some(flush)),
        (204, String::new())
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(json).collect();
    assert!(!lines.is_empty());
    let sum = |group: &str, key: &str| -> u64 {
        lines
            .iter()
            .map(|l| {
                l[group][key]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{group}.{key} missing: {l}"))
            })
            .sum()
    };
    eprintln!("asserting: block_data counters nonzero after the guest's I/O, every group present");
    assert!(sum("block_data", "write_count") > 0, "{text}");
    assert!(sum("block_data", "read_count") > 0, "{text}");
    assert!(sum("block_data", "flush_count") > 0, "{text}");
    assert_eq!(
        sum("block", "write_bytes"),
        sum("block_data", "write_bytes")
    );
    assert!(sum("put_api_requests", "actions_count") >= 1);
    for g in [
        "api_server",
        "net",
        "vcpu",
        "vmm",
        "uart",
        "i8042",
        "signals",
        "latencies_us",
        "get_api_requests",
        "patch_api_requests",
        "logger",
        "mmds",
        "seccomp",
    ] {
        assert!(lines[0][g].is_object(), "group {g} missing");
    }
    vm.signal(libc::SIGTERM);
    vm.finish(TIMEOUT);

    // The counter guest signals boot completion to the boot timer.
    let (mut vm, _sock) = api_vmm(
        "api-boot-timer",
        &[
            "--kernel",
            guest("counter").to_str().unwrap(),
            "--boot-timer",
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
            "--show-level",
        ],
    );
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000001", TIMEOUT));
    vm.signal(libc::SIGTERM);
    vm.finish(TIMEOUT);
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("Guest-boot-time"))
        .unwrap_or_else(|| panic!("no boot time logged:\n{text}"));
    assert!(
        line.contains("[anonymous-instance:fc_vcpu 0:INFO]"),
        "{line}"
    );
}

/// Sends `bytes` on a new connection and returns what came back before the
/// server closed it or `wait` passed.
fn raw_exchange(sock: &Path, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn status_of(resp: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(resp);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn body_of(resp: &[u8]) -> String {
    let text = String::from_utf8_lossy(resp).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
fn hostile_clients_neither_stop_the_vmm_nor_the_guest_nor_leak() {
    let (mut vm, sock) = api_vmm(
        "api-hostile",
        &["--kernel", guest("counter").to_str().unwrap()],
    );
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000001", TIMEOUT));
    let pid = vm.child.id();
    // Settle the baseline: one request served.
    assert_eq!(state(&sock), "Running");
    let fds = settled_count(format!("/proc/{pid}/fd"));
    let threads = settled_count(format!("/proc/{pid}/task"));

    // 500 malformed requests: each well-formed HTTP one gets a 400 with a
    // fault_message; junk gets a 400 or a closed connection.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let long_path = format!("/{}", "a".repeat(5000));
    let bodies = [
        "{",
        "[]",
        "null",
        r#"{"vcpu_count": "two", "mem_size_mib": 1}"#,
        r#"{"vcpu_count": 1}"#,
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "x": 1}"#,
        r#"{"vcpu_count": -1, "mem_size_mib": 128}"#,
        r#"{"action_type": "Explode"}"#,
        r#"{"state": 1}"#,
        "\u{0}\u{7f}",
    ];
    let paths = [
        "/machine-config",
        "/actions",
        "/vm",
        "/drives/a-b",
        "/drives/x",
        "/boot-source",
        "/network-interfaces/e",
        "/logger",
    ];
    let mut well_formed_400 = 0;
    for i in 0..500 {
        let req: Vec<u8> = match i % 5 {
            0 | 1 => {
                let body = bodies[(rnd() % bodies.len() as u64) as usize];
                let path = paths[(rnd() % paths.len() as u64) as usize];
                let method = if path == "/vm" { "PATCH" } else { "PUT" };
                format!("{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
            }
            2 => format!("GET {long_path} HTTP/1.1\r\nConnection: close\r\n\r\n").into_bytes(),
            3 => {
                let mut v =
                    b"PUT /actions HTTP/1.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"
                        .to_vec();
                v.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
                v
            }
            _ => (0..(rnd() % 300)).map(|_| rnd() as u8).collect(),
        };
        let resp = raw_exchange(&sock, &req, Duration::from_secs(10));
        match i % 5 {
            4 => {
                if let Some(code) = status_of(&resp) {
                    assert_eq!(code, 400, "junk got {code}");
                }
            }
            _ => {
                assert_eq!(
                    status_of(&resp),
                    Some(400),
                    "request {i}: {}",
                    String::from_utf8_lossy(&resp)
                );
                let body = json(&body_of(&resp));
                assert!(body["fault_message"].is_string(), "request {i}: {body}");
                well_formed_400 += 1;
            }
        }
    }
    eprintln!("asserting: {well_formed_400} well-formed bad requests got 400 + fault_message");

    // A 10 MB body is refused without being read.
    let big = format!(
        "PUT /drives/x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    );
    let resp = raw_exchange(&sock, big.as_bytes(), Duration::from_secs(10));
    assert_eq!(status_of(&resp), Some(400));
    assert!(
        body_of(&resp).contains("larger than the limit of 51200"),
        "{}",
        body_of(&resp)
    );

    // 20 clients sit on half-sent headers and one leaves mid-request, while
    // 100 others are served concurrently.
    let stalled: Vec<UnixStream> = (0..20)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: loc").unwrap();
            s
        })
        .collect();
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
            .unwrap();
    }
    let served: Vec<_> = (0..100)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let resp = raw_exchange(
                    &sock,
                    b"GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n",
                    Duration::from_secs(20),
                );
                status_of(&resp)
            })
        })
        .collect();
    let ok = served
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|s| *s == Some(200))
        .count();
    assert_eq!(ok, 100, "every concurrent client is served");
    drop(stalled);

    // The guest kept running and the VMM still answers; nothing leaked.
    let before = counts(&vm).last().copied().unwrap_or(0);
    assert!(vm.wait_for(&format!("VMM-GUEST: count {:016x}", before + 2), TIMEOUT));
    assert_eq!(state(&sock), "Running");
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_entries(format!("/proc/{pid}/fd")) != fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        count_entries(format!("/proc/{pid}/fd")),
        fds,
        "descriptors leaked"
    );
    assert_eq!(
        count_entries(format!("/proc/{pid}/task")),
        threads,
        "threads leaked"
    );
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish(TIMEOUT).code, Some(128 + libc::SIGTERM));
}

#[test]
fn the_socket_answers_within_milliseconds_of_appearing() {
    // firecracker-go-sdk polls GET /machine-config every 10 ms; Kata polls GET /.
    let sock = tmp_path("api-ready.sock");
    let mut cmd = vmm();
    cmd.arg("--api-sock").arg(&sock).stdout(Stdio::null());
    let started = Instant::now();
    let vm = Running::start(cmd);
    while !sock.exists() {
        assert!(started.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_micros(200));
    }
    let appeared = started.elapsed();
    let t = Instant::now();
    let resp = raw_exchange(
        &sock,
        b"GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n",
        TIMEOUT,
    );
    let answered = t.elapsed();
    eprintln!("socket after {appeared:?}, first answer {answered:?} later");
    assert_eq!(status_of(&resp), Some(200));
    assert!(answered < Duration::from_millis(500), "{answered:?}");
    drop(vm);
}

#[test]
fn the_vmm_exits_while_clients_keep_calling_and_removes_its_socket() {
    let (mut vm, sock) = api_vmm(
        "api-busy-exit",
        &["--kernel", guest("counter").to_str().unwrap()],
    );
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000001", TIMEOUT));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::spawn(move || {
                // Keep-alive connections, reopened whenever the VMM drops one;
                // once the socket is gone there is nothing to call.
                let mut calls = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let Ok(mut s) = UnixStream::connect(&sock) else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    s.set_read_timeout(Some(Duration::from_millis(500)))
                        .unwrap();
                    let mut buf = [0u8; 4096];
                    while s.write_all(b"GET / HTTP/1.1\r\n\r\n").is_ok()
                        && matches!(s.read(&mut buf), Ok(n) if n > 0)
                    {
                        calls += 1;
                    }
                }
                calls
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    vm.signal(libc::SIGTERM);
    let out = vm.finish(TIMEOUT);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let calls: u32 = callers.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(
        calls > 10,
        "the clients were served before the stop ({calls} calls)"
    );
    eprintln!("asserting: exit 143 within {TIMEOUT:?} under a stream of API calls, socket removed");
    assert_eq!(out.code, Some(128 + libc::SIGTERM), "{}", out.stderr);
    assert!(!sock.exists(), "the API socket is removed at exit");
}

#[test]
fn a_failed_instance_start_can_be_retried_and_keeps_the_console() {
    let (mut vm, sock) = api_vmm("api-retry", &[]);
    let junk = tmp_path("api-retry-not-a-kernel");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    let boot = |k: &Path| format!(r#"{{"kernel_image_path": "{}"}}"#, k.display());
    assert_eq!(
        curl(&sock, "PUT", "/boot-source", Some(&boot(&junk))).0,
        204
    );
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_fault(
        curl(&sock, "PUT", "/actions", Some(start)),
        "neither an ELF vmlinux nor a bzImage",
    );
    assert_eq!(state(&sock), "Not started");
    assert_eq!(
        curl(&sock, "PUT", "/boot-source", Some(&boot(&guest("counter")))).0,
        204
    );
    assert_eq!(curl(&sock, "PUT", "/actions", Some(start)).0, 204);
    assert!(
        vm.wait_for("VMM-GUEST: count 0000000000000001", TIMEOUT),
        "no console after a retried start"
    );
    vm.signal(libc::SIGTERM);
    vm.finish(TIMEOUT);
}

#[test]
fn a_config_file_that_fails_to_boot_leaves_no_socket_behind() {
    let cfg = tmp_path("api-fail-config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "drives": [{{"drive_id": "d", "path_on_host": "/nonexistent/disk.img", "is_root_device": false}}]}}"#,
            guest("counter").display()
        ),
    )
    .unwrap();
    let sock = tmp_path("api-fail-config.sock");
    let mut cmd = vmm();
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg);
    let out = run(cmd, TIMEOUT);
    assert_eq!(out.code, Some(FC_GENERIC), "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/disk.img"),
        "{}",
        out.stderr
    );
    assert!(!sock.exists(), "the socket is removed on a failed boot");
}

#[test]
fn socket_paths_up_to_107_bytes_work_and_longer_ones_are_refused() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("long-socket-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.to_str().unwrap().len() + 1;
    assert!(base < 100, "scratch directory path too long for this test");
    let name = "s".repeat(107 - base);
    let sock = dir.join(&name);
    let _ = std::fs::remove_file(&sock);
    assert_eq!(sock.to_str().unwrap().len(), 107);
    let mut cmd = vmm();
    cmd.arg("--api-sock").arg(&sock);
    let vm = Running::start(cmd);
    wait_for_socket(&sock, &vm);
    assert_eq!(state(&sock), "Not started");
    drop(vm);
    let too_long = dir.join("s".repeat(108 - base));
    assert_refused(
        &["--api-sock", too_long.to_str().unwrap()],
        "at most 107 bytes",
        FC_GENERIC,
    );
}

#[test]
fn patch_drive_refuses_a_fifo_without_blocking_and_swaps_a_bigger_image() {
    let small = tmp_path("api-patch-small.img");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    let (mut vm, sock) = api_vmm(
        "api-patch",
        &[
            "--kernel",
            guest("counter").to_str().unwrap(),
            "--disk",
            &format!("path={},id=data", small.display()),
        ],
    );
    assert!(vm.wait_for("VMM-GUEST: count 0000000000000001", TIMEOUT));
    let fifo = tmp_path("api-patch.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let patch = |p: &Path| {
        format!(
            r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
            p.display()
        )
    };
    assert_fault(
        curl(&sock, "PATCH", "/drives/data", Some(&patch(&fifo))),
        "not a regular file or block device",
    );
    assert_fault(
        curl(
            &sock,
            "PATCH",
            "/drives/nope",
            Some(r#"{"drive_id": "nope", "path_on_host": "/x"}"#),
        ),
        "no drive 'nope'",
    );
    let big = tmp_path("api-patch-big.img");
    std::fs::write(&big, vec![0u8; 8192]).unwrap();
    assert_eq!(
        curl(&sock, "PATCH", "/drives/data", Some(&patch(&big))),
        (204, String::new())
    );
    // The same image again only rereads its size (it is locked by this VMM).
    assert_eq!(
        curl(&sock, "PATCH", "/drives/data", Some(&patch(&big))),
        (204, String::new())
    );
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(
        json(&cfg)["drives"][0]["path_on_host"],
        big.to_str().unwrap()
    );
    assert_eq!(state(&sock), "Running");
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.finish(TIMEOUT).code, Some(128 + libc::SIGTERM));
}

#[test]
fn a_stop_right_after_start_never_hangs_on_vcpus_waiting_for_sipi() {
    // The application processors of the counter guest are never started: they
    // sit in KVM_RUN waiting for SIPI, and only a kick gets them out.
    for i in 0..10 {
        let mut cmd = vmm();
        cmd.args([
            "--kernel",
            guest("counter").to_str().unwrap(),
            "--cpus",
            "4",
        ]);
        let vm = Running::start(cmd);
        std::thread::sleep(Duration::from_millis(i * 3));
        vm.signal(libc::SIGTERM);
        // Exits in time (finish() fails the test otherwise): in an orderly way
        // (143), or killed by the signal if it came before main() blocked it.
        let out = vm.finish(TIMEOUT);
        assert!(
            out.code == Some(128 + libc::SIGTERM) || out.signal == Some(libc::SIGTERM),
            "run {i}: {out:?}"
        );
    }
}

/// PUT /vsock as Firecracker takes it: the socket is bound by the request
/// (a second PUT replaces it, a failed one leaves no device), a host program
/// is accepted on it, GET /vm/config shows the device, and the socket goes
/// when the VMM exits, started or not.
#[test]
fn put_vsock_binds_its_socket_at_once_and_removes_it_at_exit() {
    use std::os::unix::fs::FileTypeExt;
    let is_socket =
        |p: &std::path::Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
    let (vm, sock) = api_vmm("api-vsock", &[]);
    let uds = tmp_path("api-vsock-v.sock");
    let first = tmp_path("api-vsock-first.sock");
    let put = |path: &std::path::Path| {
        curl(
            &sock,
            "PUT",
            "/vsock",
            Some(&format!(
                r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
                path.display()
            )),
        )
    };
    assert_eq!(put(&first), (204, String::new()));
    assert!(is_socket(&first), "bound by the PUT");
    assert_eq!(put(&first), (204, String::new()), "the same path again");
    assert!(is_socket(&first));
    assert_fault(
        put(std::path::Path::new("/nonexistent-dir/v.sock")),
        "/nonexistent-dir/v.sock",
    );
    assert!(!first.exists(), "a new PUT removes the earlier socket");
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    assert!(
        json(&cfg)["vsock"].is_null(),
        "a failed PUT leaves no device: {cfg}"
    );
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 2, "uds_path": "/tmp/x.sock"}"#),
        ),
        "guest_cid 2 is reserved",
    );
    assert_fault(put(&sock), "exists");
    let body = format!(
        r#"{{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "{}"}}"#,
        uds.display()
    );
    assert_eq!(
        curl(&sock, "PUT", "/vsock", Some(&body)),
        (204, String::new())
    );
    assert!(is_socket(&uds), "bound by the PUT");
    let boot = format!(
        r#"{{"kernel_image_path": "{}"}}"#,
        guest("counter").display()
    );
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(curl(&sock, "PUT", "/actions", Some(start)).0, 204);
    assert!(uds.exists());
    let mut host = std::os::unix::net::UnixStream::connect(&uds).expect("the VMM listens");
    std::io::Write::write_all(&mut host, b"CONNECT 52\n").unwrap();
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    let v = &json(&cfg)["vsock"];
    assert_eq!(v["guest_cid"], 3, "{cfg}");
    assert_eq!(v["uds_path"], uds.display().to_string(), "{cfg}");
    vm.signal(libc::SIGTERM);
    vm.finish(TIMEOUT);
    assert!(!uds.exists(), "the socket goes with the VMM");

    // A VMM that ends before InstanceStart removes its socket too.
    let (vm, sock) = api_vmm("api-vsock-unstarted", &[]);
    let uds = tmp_path("api-vsock-unstarted-v.sock");
    let body = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display());
    assert_eq!(curl(&sock, "PUT", "/vsock", Some(&body)).0, 204);
    assert!(is_socket(&uds));
    vm.signal(libc::SIGTERM);
    vm.finish(TIMEOUT);
    assert!(!uds.exists(), "the socket goes with the VMM");
}

/// PUT /serial as Firecracker takes it: the console goes to the file (not
/// stdout), at most at the bucket's rate; what is over it is dropped and
/// counted in `uart.rate_limiter_dropped_bytes`; a path that cannot be
/// opened is refused at once.
#[test]
fn serial_output_goes_to_its_file_at_its_rate() {
    let out = tmp_path("api-serial.out");
    let metrics = tmp_path("api-serial.metrics");
    for p in [&out, &metrics] {
        let _ = std::fs::remove_file(p);
    }
    let (vm, sock) = api_vmm("api-serial", &[]);
    assert_fault(
        curl(
            &sock,
            "PUT",
            "/serial",
            Some(r#"{"serial_out_path": "/nonexistent/dir/console"}"#),
        ),
        "Cannot open serial_out_path '/nonexistent/dir/console'",
    );
    // 200 bytes a second: about 6 of the counter guest's 34-byte lines.
    let serial = format!(
        r#"{{"serial_out_path": "{}", "rate_limiter": {{"size": 200, "refill_time": 1000}}}}"#,
        out.display()
    );
    let calls = [
        ("/serial", serial),
        (
            "/metrics",
            format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
        ),
        (
            "/boot-source",
            format!(
                r#"{{"kernel_image_path": "{}"}}"#,
                guest("counter").display()
            ),
        ),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ];
    let started = std::time::Instant::now();
    for (path, body) in &calls {
        assert_eq!(curl(&sock, "PUT", path, Some(body)).0, 204, "PUT {path}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(curl(&sock, "PUT", "/actions", Some(flush)).0, 204);
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    vm.signal(libc::SIGTERM);
    let elapsed = started.elapsed().as_secs_f64();
    let outcome = vm.finish(TIMEOUT);
    let text = std::fs::read_to_string(&out).unwrap();
    let dropped = metric_sum(&metrics, "uart", "rate_limiter_dropped_bytes");
    eprintln!(
        "serial: {} bytes in the file after {elapsed:.2} s, {dropped} dropped",
        text.len()
    );
    eprintln!("asserting: the guest's lines in the file, none on stdout, at most 200 + 200/s bytes, dropped bytes counted, GET /vm/config shows serial");
    assert!(
        text.starts_with("VMM-GUEST: count 0000000000000001"),
        "{text}"
    );
    assert!(
        !outcome.stdout.contains("VMM-GUEST: count"),
        "{}",
        outcome.stdout
    );
    assert!(
        (text.len() as f64) <= 200.0 + 200.0 * elapsed + 1.0,
        "{} bytes in {elapsed:.2} s",
        text.len()
    );
    assert!(dropped > 0, "nothing was dropped");
    assert!(
        json(&cfg).get("serial").is_none(),
        "Firecracker's FullVmConfiguration has no serial section: {cfg}"
    );
}

/// Answers compared with Firecracker 1.16's to the same requests: GET /mmds
/// before any PUT is an empty object, and GET /balloon shows the hinting
/// and reporting flags (false) beside the size.
#[test]
fn mmds_and_balloon_reads_answer_as_firecracker_does() {
    let (vm, sock) = api_vmm("api-fc-answers", &[]);
    assert_eq!(curl(&sock, "GET", "/mmds", None), (200, "{}".to_string()));
    let balloon = r#"{"amount_mib": 16, "deflate_on_oom": true}"#;
    assert_eq!(curl(&sock, "PUT", "/balloon", Some(balloon)).0, 204);
    let (code, body) = curl(&sock, "GET", "/balloon", None);
    assert_eq!(code, 200);
    assert_eq!(
        json(&body),
        serde_json::json!({"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 0,
            "free_page_hinting": false, "free_page_reporting": false})
    );
    vm.signal(libc::SIGTERM);
    vm.finish(TIMEOUT);
}
