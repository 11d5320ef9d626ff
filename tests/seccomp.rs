//! Seccomp with the real binary: every thread of a running VMM is filtered
//! (unless --no-seccomp); a call outside a role's list, here forced by a
//! filter file that takes KVM_RUN away from the vCPUs, kills the VMM with
//! SIGSYS after it said which thread made which call and wrote a metrics
//! line counting the fault.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{guest, tmp_path, vmm, Running};

/// Each thread's name and its `Seccomp:` mode.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((name.trim().to_string(), mode));
    }
    out.sort();
    out
}

/// The counting guest, running, with its API socket.
fn counting_vm(tag: &str, extra: &[&str]) -> Running {
    let sock = tmp_path(&format!("seccomp-{tag}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("counter"))
        .arg("--api-sock")
        .arg(&sock)
        .args(extra)
        .stdin(std::process::Stdio::null());
    let mut vm = Running::start(cmd);
    assert!(
        vm.wait_for("VMM-GUEST: count ", Duration::from_secs(20)),
        "the guest did not count"
    );
    vm
}

/// Waits until every thread shows `mode`, or 5 s; returns the last view.
fn wait_modes(pid: u32, mode: &str) -> Vec<(String, String)> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let modes = seccomp_modes(pid);
        if modes.iter().all(|(_, m)| m == mode) || Instant::now() > until {
            return modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    let vm = counting_vm("on", &[]);
    let modes = wait_modes(vm.child.id(), "2");
    eprintln!("threads: {modes:?}");
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    // The main thread, the API server, the vCPU (and, on some hosts, KVM's
    // own kernel worker in the process, which also shows the filter).
    for want in ["vmm", "fc_api", "fc_vcpu 0"] {
        assert!(names.contains(&want), "no {want} thread: {names:?}");
    }
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not in seccomp filter mode");
    }
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered() {
    let vm = counting_vm("off", &["--no-seccomp"]);
    // Give the main thread the time it would take to install its filter.
    std::thread::sleep(Duration::from_millis(200));
    let modes = seccomp_modes(vm.child.id());
    assert!(modes.len() >= 3, "{modes:?}");
    for (name, mode) in &modes {
        assert_eq!(mode, "0", "thread {name} is filtered: {modes:?}");
    }
}

/// The default filters with KVM_RUN taken from the vCPU role (the fault
/// handler itself needs `write`, so that one stays).
fn filter_without_kvm_run(path: &Path) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/seccomp/x86_64.json"),
    )
    .unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rules = json["vcpu"]["filter"].as_array_mut().unwrap();
    let before = rules.len();
    rules.retain(|r| r["comment"] != "KVM_RUN");
    assert_eq!(rules.len(), before - 1);
    std::fs::write(path, json.to_string()).unwrap();
}

#[test]
fn a_call_outside_the_list_kills_the_vmm_with_sigsys_and_is_recorded() {
    let filter = tmp_path("seccomp-no-kvm-run.json");
    filter_without_kvm_run(&filter);
    let metrics = tmp_path("seccomp-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("hello"))
        .arg("--seccomp-filter")
        .arg(&filter)
        .arg("--metrics-path")
        .arg(&metrics);
    let out = common::run(cmd, Duration::from_secs(20));
    eprintln!("{out:#?}");
    assert_eq!(out.signal, Some(libc::SIGSYS), "{out:#?}");
    assert!(
        out.stderr.contains(
            "vmm: the vcpu thread made system call 16, which its seccomp filter does not allow; killing the VMM (SIGSYS)"
        ),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("hello from the test guest"));
    let lines = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(lines.lines().last().expect("a metrics line")).unwrap();
    assert_eq!(last["seccomp"]["num_faults"], 1, "{lines}");
}

#[test]
fn a_bad_filter_file_is_one_line_and_status_2() {
    let bad = tmp_path("seccomp-bad.json");
    std::fs::write(&bad, r#"{"vmm": {"mismatch_action": "trap", "match_action": "allow", "filter": [{"syscall": "no_such_call"}]}}"#).unwrap();
    for args in [
        vec!["--seccomp-filter", bad.to_str().unwrap()],
        vec!["--seccomp-filter", "/nonexistent/filter.json"],
        vec!["--no-seccomp", "--seccomp-filter", bad.to_str().unwrap()],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .arg("--kernel")
            .arg(guest("hello"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("seccomp"), "{args:?}: {err}");
    }
}
