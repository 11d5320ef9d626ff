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
fn every_run_is_a_new_vm_generation_with_its_own_random_bytes() {
    warm();
    // Each run restores the template: the VM generation ID changes, the
    // guest's vmgenid driver reseeds its RNG, and two runs do not share
    // random bytes.
    let script = "dmesg | grep -c 'crng reseeded due to virtual machine fork'; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '";
    let runs: Vec<String> = (0..2)
        .map(|_| {
            let out = run_with(&["--", "sh", "-c", script], b"");
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        })
        .collect();
    eprintln!("asserting: each run reseeded once at its restore and read its own bytes: {runs:?}");
    for r in &runs {
        assert!(r.starts_with("1\n") && r.len() == 2 + 33, "{r:?}");
    }
    assert_ne!(runs[0], runs[1]);
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

/// The test's own root file system for `--rootfs`: busybox and an /app
/// with a marker and a script, made once with `mkfs.ext4 -d` and kept in the
/// cache (its identity is part of the run's snapshot key).
fn app_rootfs() -> std::path::PathBuf {
    let cache = std::path::PathBuf::from(std::env::var_os("VMM_CACHE_DIR").unwrap_or_else(|| {
        std::path::Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/vmm")
            .into()
    }));
    let image = cache.join("test-run-rootfs-v2.ext4");
    if image.exists() {
        return image;
    }
    let dir = common::tmp_path("app-rootfs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(dir.join("app/marker"), "from-the-users-rootfs\n").unwrap();
    std::fs::write(
        dir.join("app/test"),
        "#!/bin/sh\necho app-test-ran\nexit 3\n",
    )
    .unwrap();
    let st = Command::new("chmod")
        .arg("755")
        .arg(dir.join("app/test"))
        .status()
        .unwrap();
    assert!(st.success());
    let tmp = image.with_extension("tmp");
    std::fs::create_dir_all(&cache).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&dir)
        .arg(&tmp)
        .arg("16M")
        .stdout(Stdio::null())
        .status()
        .expect("mkfs.ext4 (e2fsprogs) runs");
    assert!(st.success());
    std::fs::rename(&tmp, &image).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    image
}

fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `--rootfs`, `--disk` and `--net` together (one cached guest): commands
/// run in the user's image, whose file never changes and whose writes vanish;
/// the data disk is read fresh on every run and keeps what a run writes; the
/// guest reaches the host side of the TAP.
#[test]
fn a_users_rootfs_a_data_disk_and_a_tap() {
    let rootfs = app_rootfs();
    let before = sha256(&rootfs);
    let data = rootfs.with_file_name("test-run-data.img");
    let ns = common::golden::Netns::new("run");
    ns.add_tap("vmmrun0", Some("172.16.0.1/24"));
    let run = |marker: &str, script: &str| {
        let mut bytes = vec![0u8; 1 << 20];
        bytes[..marker.len()].copy_from_slice(marker.as_bytes());
        std::fs::write(&data, &bytes).unwrap();
        common::golden::agent_binary();
        let out = ns
            .command(env!("CARGO_BIN_EXE_vmm"))
            .arg("run")
            .arg("--rootfs")
            .arg(&rootfs)
            .arg("--disk")
            .arg(format!("path={}", data.display()))
            .args(["--net", "tap=vmmrun0", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            out.status.code(),
        )
    };
    // The user's files, the data disk's first bytes, a write to the data
    // disk and one to the root.
    let (out, code) = run(
        "marker-one",
        "cat /app/marker; /app/test; echo status $?; head -c 10 /dev/vdb; echo; \
         printf written-by-the-guest | dd of=/dev/vdb bs=4096 seek=1 conv=fsync 2>/dev/null; \
         echo new > /root-file && cat /root-file",
    );
    assert_eq!(
        (out.as_str(), code),
        (
            "from-the-users-rootfs\napp-test-ran\nstatus 3\nmarker-one\nnew\n",
            Some(0)
        )
    );
    let bytes = std::fs::read(&data).unwrap();
    assert_eq!(&bytes[4096..4096 + 20], b"written-by-the-guest");
    // A new run: the root file is gone, the disk's new contents are seen
    // (no block the snapshot's guest cached), the host answers pings.
    let (out, code) = run(
        "marker-two",
        "cat /root-file; head -c 10 /dev/vdb; echo; ping -c 3 -W 5 172.16.0.1 | grep -o '3 packets received'",
    );
    assert_eq!(
        (out.as_str(), code),
        ("marker-two\n3 packets received\n", Some(0))
    );
    eprintln!("asserting: the root image was never written");
    assert_eq!(sha256(&rootfs), before);
}

#[test]
fn a_missing_image_is_one_line_and_status_2() {
    for flag in ["--rootfs", "--disk"] {
        let out = run_with(&[flag, "/nonexistent/x.img", "--", "true"], b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("{flag} '/nonexistent/x.img'")),
            "{err}"
        );
    }
    let out = run_with(&["--net", "tap=tap0,ip=1.2.3", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(2));
}
