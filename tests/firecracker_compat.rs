//! What Firecracker's clients and its own integration suite read from a VMM,
//! each asserted against the real binary as Firecracker 1.16 answers: the log
//! lines they wait for, exit codes and lines for signals, the Deprecation
//! header, 413 for a metadata store over its limit, the flags that print
//! versions, a compiled seccomp filter file, a configuration file with empty
//! device lists, and a snapshot load after PUT /serial (and one that fails).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A VMM serving its API, logging at Debug to a file, writing metrics.
struct Vm {
    running: Running,
    sock: PathBuf,
    log: PathBuf,
    metrics: PathBuf,
}

fn api_vm(name: &str, extra: &[&str]) -> Vm {
    let sock = tmp_path(&format!("fcc-{name}.sock"));
    let log = tmp_path(&format!("fcc-{name}.log"));
    let metrics = tmp_path(&format!("fcc-{name}.ndjson"));
    let mut cmd = vmm();
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--log-path")
        .arg(&log)
        .args(["--level", "Debug", "--metrics-path"])
        .arg(&metrics)
        .args(extra);
    let running = Running::start(cmd);
    wait_for_socket(&sock, &running);
    Vm {
        running,
        sock,
        log,
        metrics,
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One raw HTTP exchange, for the headers curl's helper does not return.
fn raw(sock: &Path, method: &str, path: &str, body: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn start_counter(sock: &Path) {
    let boot = format!(
        r#"{{"kernel_image_path": "{}"}}"#,
        guest("counter").display()
    );
    assert_eq!(curl(sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(curl(sock, "PUT", "/actions", Some(start)).0, 204);
}

#[test]
fn start_up_request_and_error_lines_are_firecracker_s() {
    let vm = api_vm("lines", &[]);
    assert_eq!(
        curl(&vm.sock, "GET", "/version", None),
        (200, r#"{"firecracker_version":"1.16.1"}"#.to_string())
    );
    let (code, body) = curl(
        &vm.sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/k"}"#),
    );
    assert_eq!(code, 400);
    let fault = "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)";
    assert!(body.contains(fault), "{body}");
    vm.running.signal(libc::SIGTERM);
    vm.running.finish(TIMEOUT);
    let log = read(&vm.log);
    let first = log.lines().next().unwrap_or_default();
    eprintln!("asserting: the log's first line, the start-up lines, each request with its duration, the error line");
    assert!(first.contains("] Running Firecracker v1.16.1"), "{log}");
    for want in [
        "API server started.",
        r#"The API server received a Get request on "/version"."#,
        r#"The API server received a Put request on "/boot-source" with body "{\"kernel_image_path\": \"/nonexistent/k\"}"."#,
        "Total previous API call duration: ",
        &format!("Received Error. Status code: 400 Bad Request. Message: {fault}"),
    ] {
        assert!(log.contains(want), "{want:?} not in {log}");
    }
    let requests = log.matches("The API server received a").count();
    let durations = log.matches("Total previous API call duration").count();
    assert_eq!(requests, durations, "every request has its duration line");
}

#[test]
fn fatal_signals_end_the_vmm_with_firecracker_s_codes_lines_and_metrics() {
    for (sig, name, code) in [
        (libc::SIGBUS, "sigbus", 149),
        (libc::SIGSEGV, "sigsegv", 150),
        (libc::SIGXFSZ, "sigxfsz", 151),
        (libc::SIGXCPU, "sigxcpu", 154),
        (libc::SIGHUP, "sighup", 156),
        (libc::SIGILL, "sigill", 157),
    ] {
        let vm = api_vm(&format!("sig-{name}"), &[]);
        start_counter(&vm.sock);
        assert_eq!(
            read(&vm.metrics).lines().count(),
            1,
            "one line at the start"
        );
        vm.running.signal(sig);
        let out = vm.running.finish(TIMEOUT);
        eprintln!("asserting: {name} exits {code}, is logged and counted");
        assert_eq!(out.code, Some(code), "{name}: {}", out.stderr);
        let log = read(&vm.log);
        let line = format!("Shutting down VM after intercepting signal {sig}");
        assert!(log.contains(&line), "{name}: {log}");
        assert_eq!(metric_sum(&vm.metrics, "signals", name), 1, "{name}");
    }
}

#[test]
fn sigpipe_is_logged_and_counted_and_the_vmm_goes_on() {
    let vm = api_vm("sigpipe", &[]);
    start_counter(&vm.sock);
    vm.running.signal(libc::SIGPIPE);
    std::thread::sleep(Duration::from_millis(200));
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(curl(&vm.sock, "PUT", "/actions", Some(flush)).0, 204);
    assert!(read(&vm.log).contains("Received signal 13"));
    assert_eq!(metric_sum(&vm.metrics, "signals", "sigpipe"), 1);
    vm.running.signal(libc::SIGTERM);
    vm.running.finish(TIMEOUT);
}

#[test]
fn deprecated_fields_are_served_with_a_deprecation_header_and_a_warning() {
    let vm = api_vm("deprecated", &[]);
    let with = raw(
        &vm.sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"}"#,
    );
    assert!(with.starts_with("HTTP/1.1 204"), "{with}");
    assert!(with.contains("\r\nDeprecation: true\r\n"), "{with}");
    let without = raw(
        &vm.sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    assert!(!without.contains("Deprecation"), "{without}");
    // Refused, and still marked: the client learns both.
    let load = raw(
        &vm.sock,
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
    );
    assert!(load.starts_with("HTTP/1.1 400"), "{load}");
    assert!(load.contains("Deprecation: true"), "{load}");
    assert!(load.contains("exclusively is required"), "{load}");
    vm.running.signal(libc::SIGTERM);
    vm.running.finish(TIMEOUT);
    assert!(read(&vm.log).contains("PUT /machine-config: cpu_template field is deprecated."));
}

#[test]
fn a_metadata_store_over_its_limit_is_413() {
    let vm = api_vm("mmds413", &["--mmds-size-limit", "30"]);
    let (code, body) = curl(
        &vm.sock,
        "PUT",
        "/mmds",
        Some(r#"{"latest": {"meta-data": {"ami-id": "a-long-enough-value"}}}"#),
    );
    assert_eq!(code, 413, "{body}");
    assert!(
        body.contains("The MMDS patch request doesn't fit."),
        "{body}"
    );
    assert_eq!(curl(&vm.sock, "PUT", "/mmds", Some(r#"{"a": 1}"#)).0, 204);
    vm.running.signal(libc::SIGTERM);
    vm.running.finish(TIMEOUT);
}

#[test]
fn the_full_configuration_has_every_section_firecracker_has() {
    let vm = api_vm("vmconfig", &[]);
    let (code, body) = curl(&vm.sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "balloon",
            "boot-source",
            "cpu-config",
            "drives",
            "entropy",
            "logger",
            "machine-config",
            "memory-hotplug",
            "metrics",
            "mmds-config",
            "network-interfaces",
            "pmem",
            "vsock"
        ]
    );
    assert_eq!(v["pmem"], serde_json::json!([]));
    assert!(v["balloon"].is_null());
    vm.running.signal(libc::SIGTERM);
    vm.running.finish(TIMEOUT);
}

#[test]
fn a_snapshot_loads_after_put_serial_and_a_failed_load_ends_the_vmm() {
    let vm = api_vm("loadfail", &[]);
    let serial = tmp_path("fcc-loadfail.serial");
    let body = format!(r#"{{"serial_out_path": "{}"}}"#, serial.display());
    assert_eq!(curl(&vm.sock, "PUT", "/serial", Some(&body)).0, 204);
    let state = tmp_path("fcc-loadfail.state");
    let mem = tmp_path("fcc-loadfail.mem");
    std::fs::write(&state, b"").unwrap();
    std::fs::write(&mem, b"").unwrap();
    let (code, body) = load_snapshot(&vm.sock, &state, &mem, true);
    eprintln!("asserting: the load was tried (not refused for PUT /serial), failed as Firecracker words it, and ended the VMM");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("Load snapshot error: Failed to restore from snapshot"),
        "{body}"
    );
    assert!(
        body.contains("IO Error: File too short to contain CRC"),
        "{body}"
    );
    let out = vm.running.finish(TIMEOUT);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(read(&vm.log).contains("Firecracker exiting with error. exit_code=1"));
}

#[test]
fn version_flags_print_what_firecracker_s_tools_parse() {
    let out = run(
        {
            let mut c = vmm();
            c.arg("--version");
            c
        },
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0));
    assert_eq!(out.stdout.lines().next(), Some("Firecracker v1.16.1"));
    let out = run(
        {
            let mut c = vmm();
            c.arg("--snapshot-version");
            c
        },
        TIMEOUT,
    );
    assert_eq!(out.stdout.trim(), "v1.3.0");
}

#[test]
fn a_bad_compiled_filter_file_is_logged_as_firecracker_logs_it() {
    let bpf = tmp_path("fcc-bad.bpf");
    std::fs::write(&bpf, b"Invalid BPF!").unwrap();
    let log = tmp_path("fcc-bad-bpf.log");
    let sock = tmp_path("fcc-bad-bpf.sock");
    let mut c = vmm();
    c.arg("--api-sock")
        .arg(&sock)
        .arg("--log-path")
        .arg(&log)
        .arg("--seccomp-filter")
        .arg(&bpf);
    let out = run(c, TIMEOUT);
    assert_ne!(out.code, Some(0));
    let text = read(&log);
    assert!(
        text.contains("Seccomp error: Filter deserialization failed"),
        "{text}"
    );
    assert!(
        text.contains("Firecracker exiting with error. exit_code="),
        "{text}"
    );
    assert!(!sock.exists(), "nothing is left behind");
}

#[test]
fn a_configuration_file_with_empty_device_lists_boots_and_says_so() {
    let cfg = tmp_path("fcc-empty-lists.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
                "drives": [], "network-interfaces": [], "pmem": []}}"#,
            guest("counter").display()
        ),
    )
    .unwrap();
    let log = tmp_path("fcc-empty-lists.log");
    let mut c = vmm();
    c.arg("--no-api")
        .arg("--config-file")
        .arg(&cfg)
        .arg("--log-path")
        .arg(&log);
    let mut vm = Running::start(c);
    assert!(
        vm.wait_for("VMM-GUEST: count", TIMEOUT),
        "{}",
        vm.stdout_now()
    );
    vm.signal(libc::SIGTERM);
    vm.finish(TIMEOUT);
    let text = read(&log);
    assert!(
        text.contains("Successfully started microvm that was configured from one single json"),
        "{text}"
    );
}

/// Without arguments the API listens on Firecracker's default socket; run in
/// a mount namespace of its own with a fresh /run, so that no other process
/// of this host sees (or holds) the path. The request is retried until it
/// connects, for 30 s or more: on a loaded CI machine the VMM once did not
/// listen within the 5 s the test used to give it.
#[test]
fn without_arguments_the_api_listens_on_firecracker_s_default_socket() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: a mount namespace cannot be made; not asserted");
        return;
    }
    let script = format!(
        "mount -t tmpfs tmpfs /run && \
         {vmm} & pid=$!; \
         for i in $(seq 600); do \
           out=$(curl -sS --unix-socket /run/firecracker.socket http://localhost/version 2>&1) && break; \
           sleep 0.05; \
         done; \
         echo \"$out\"; kill $pid; wait $pid",
        vmm = env!("CARGO_BIN_EXE_vmm")
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("asserting: GET /version answered on /run/firecracker.socket");
    assert!(
        stdout.contains(r#"{"firecracker_version":"1.16.1"}"#),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
