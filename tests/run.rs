//! `vmm run -- CMD` with the real binary: the default guest is booted once
//! (and saved in the cache), every run is a clone of it that runs CMD
//! through the guest agent and exits with its status.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{host, Host};

/// `vmm run ARGS`, with the agent built next to the vmm binary.
fn vmm_run(args: &[&str]) -> Command {
    static AGENT: OnceLock<()> = OnceLock::new();
    AGENT.get_or_init(|| {
        common::golden::agent_binary();
    });
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.arg("run").args(args);
    c
}

/// Runs to completion with `stdin`.
fn run_with(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = vmm_run(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm runs");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// The template is booted once, before any timing.
fn warm() {
    static WARM: OnceLock<()> = OnceLock::new();
    WARM.get_or_init(|| {
        let out = run_with(&["--", "true"], b"");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

#[test]
fn stdout_stderr_and_the_exit_status_come_back() {
    warm();
    let out = run_with(&["--", "sh", "-c", "echo out; echo err >&2; exit 7"], b"");
    eprintln!("asserting: stdout 'out', stderr 'err', exit status 7");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"));
    assert_eq!(out.status.code(), Some(7));
    let out = run_with(&["--", "no-such-command"], b"");
    assert_eq!(
        out.status.code(),
        Some(127),
        "the shell's status for a missing command"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-command: not found"));
    let out = run_with(
        &[
            "--env",
            "GREETING=hi there",
            "--workdir",
            "/proc",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\" $(pwd)",
        ],
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi there /proc\n");
}

#[test]
fn stdin_goes_through_the_command_and_back_byte_exact() {
    warm();
    // PVM moves the guest's side of vsock at ~0.15 MiB/s: smaller there.
    let size = match host() {
        Host::Pvm => 64 << 10,
        Host::Hardware => 4 << 20,
    };
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect();
    let out = run_with(&["--", "cat"], &data);
    eprintln!("asserting: {} KiB through cat, byte-exact", size >> 10);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == data,
        "{} bytes back of {size}",
        out.stdout.len()
    );
    let out = run_with(&["--", "wc", "-c"], &data);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        size.to_string()
    );
}

#[test]
fn a_timeout_kills_the_vm_exits_124_and_leaves_no_process() {
    warm();
    let t = Instant::now();
    let child = vmm_run(&["--timeout", "5", "--", "sleep", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let took = t.elapsed();
    eprintln!("asserting: exit 124 in {took:?} (< 10 s), no VMM of that run left");
    assert_eq!(
        out.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    std::thread::sleep(Duration::from_millis(200));
    let left = Command::new("pgrep")
        .args(["-f", &format!("vmm-run-{pid}-")])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn nothing_a_run_writes_survives_it() {
    warm();
    let out = run_with(
        &["--", "sh", "-c", "echo kept > /marker && cat /marker"],
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
    let out = run_with(&["--", "cat", "/marker"], b"");
    eprintln!("asserting: a second run does not see the first one's file");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
}

#[test]
fn ten_runs_at_once() {
    warm();
    let runs: Vec<_> = (0..10)
        .map(|i| {
            std::thread::spawn(move || {
                run_with(&["--", "sh", "-c", &format!("echo run-$(({i} * 11))")], b"")
            })
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let out = r.join().unwrap();
        assert_eq!(
            (
                String::from_utf8_lossy(&out.stdout).to_string(),
                out.status.code()
            ),
            (format!("run-{}\n", i * 11), Some(0)),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The embedding API, as another program uses it.
#[test]
fn the_library_starts_a_sandbox_and_runs_commands_in_it() {
    warm();
    use vmm::run::{Sandbox, SandboxConfig};
    let config = SandboxConfig {
        vmm: Some(env!("CARGO_BIN_EXE_vmm").into()),
        ..SandboxConfig::default()
    };
    let mut sb = Sandbox::start(&config).expect("a sandbox");
    let (out, _, status) = sb
        .output(&["sh", "-c", "echo $((6 * 7)) > /answer; cat /answer"])
        .unwrap();
    eprintln!(
        "asserting: a command's output, then a second command of the same sandbox sees its file"
    );
    assert_eq!(
        (
            String::from_utf8_lossy(&out).to_string(),
            status.shell_code()
        ),
        ("42\n".into(), 0)
    );
    let (out, _, _) = sb.output(&["cat", "/answer"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "42\n");
    drop(sb);
    let mut other = Sandbox::start(&config).expect("a second sandbox");
    let (_, _, status) = other.output(&["cat", "/answer"]).unwrap();
    assert_eq!(status.shell_code(), 1, "another sandbox starts clean");
}
