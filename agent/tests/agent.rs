//! The real `vmm-agent` binary, listening on a Unix socket in a temporary
//! directory, driven by `AgentClient`.

use std::fs;
use std::io::{self, Cursor, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmm_agent::protocol::{read_frame, write_frame, FrameType};
use vmm_agent::{AgentClient, Error, ExecRequest, ExitStatus, Reply};

/// A running agent and its directory, both removed on drop.
struct Agent {
    process: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&std::ffi::OsStr]) -> Agent {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let process = Command::new(env!("CARGO_BIN_EXE_vmm-agent"))
            .arg("--listen-unix")
            .arg(&socket)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Agent {
            process,
            dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&agent.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent did not start listening"
            );
            thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn client(&self) -> AgentClient<UnixStream, UnixStream> {
        AgentClient::connect_unix(&self.socket).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `request` with `stdin`; returns its status, stdout and stderr.
    fn exec(&self, request: &ExecRequest, stdin: Vec<u8>) -> (ExitStatus, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = self
            .client()
            .exec(request, Cursor::new(stdin), &mut out, &mut err)
            .unwrap();
        (status, out, err)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// Deterministic bytes that are not a repeating short pattern.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn exec_streams_stdout_stderr_and_exit_code() {
    let agent = Agent::start();
    let (status, out, err) = agent.exec(&sh("echo out; echo err >&2; exit 7"), vec![]);
    assert_eq!(status, ExitStatus::Code(7));
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
}

#[test]
fn four_mib_through_cat_come_back_byte_exact() {
    let agent = Agent::start();
    let data = pseudo_random(4 << 20);
    let (status, out, err) = agent.exec(&ExecRequest::new(["cat"]).with_stdin(true), data.clone());
    assert_eq!(status, ExitStatus::Code(0));
    assert!(err.is_empty());
    assert!(out == data, "stdout differs: {} bytes back", out.len());
}

#[test]
fn a_command_that_does_not_read_its_stdin_still_ends() {
    let agent = Agent::start();
    let request = ExecRequest::new(["true"]).with_stdin(true);
    let (status, _, _) = agent.exec(&request, pseudo_random(4 << 20));
    assert_eq!(status, ExitStatus::Code(0));
}

#[test]
fn large_output_arrives_whole() {
    let agent = Agent::start();
    let (status, out, err) = agent.exec(&sh("head -c 16777216 /dev/zero; echo done >&2"), vec![]);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(out.len(), 16 << 20);
    assert!(out.iter().all(|&b| b == 0));
    assert_eq!(err, b"done\n");
}

#[test]
fn missing_command_gives_127_and_the_shells_message() {
    let agent = Agent::start();
    let (status, out, err) = agent.exec(&ExecRequest::new(["no-such-command-here"]), vec![]);
    assert_eq!(status, ExitStatus::Code(127));
    assert!(out.is_empty());
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "vmm-agent: no-such-command-here: not found\n"
    );
}

#[test]
fn command_that_is_not_executable_gives_126() {
    let agent = Agent::start();
    let script = agent.path("script");
    fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    let program = script.to_str().unwrap();
    let (status, _, err) = agent.exec(&ExecRequest::new([program]), vec![]);
    assert_eq!(status, ExitStatus::Code(126));
    assert_eq!(
        String::from_utf8(err).unwrap(),
        format!("vmm-agent: {program}: Permission denied\n")
    );
}

#[test]
fn env_and_cwd_reach_the_command() {
    let agent = Agent::start();
    let dir = agent.dir.to_str().unwrap().to_owned();
    let request = sh("echo \"$GREETING\"; pwd")
        .env("GREETING", "hello")
        .cwd(&dir);
    let (status, out, _) = agent.exec(&request, vec![]);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8(out).unwrap(), format!("hello\n{dir}\n"));
}

#[test]
fn missing_working_directory_is_an_error() {
    let agent = Agent::start();
    let request = ExecRequest::new(["true"]).cwd("/no/such/dir");
    let result = agent
        .client()
        .exec(&request, io::empty(), io::sink(), io::sink());
    match result {
        Err(Error::Agent(message)) => assert!(message.contains("/no/such/dir"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn signal_kills_the_command_and_is_reported() {
    let agent = Agent::start();
    let execution = agent
        .client()
        .start(&ExecRequest::new(["sleep", "60"]))
        .unwrap();
    let signaller = execution.signaller();
    let started = Instant::now();
    signaller.signal(15).unwrap();
    let status = execution.wait(io::empty(), io::sink(), io::sink()).unwrap();
    assert_eq!(status, ExitStatus::Signal(15));
    assert_eq!(status.shell_code(), 143);
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Collects stdout and sends SIGUSR1 once the command says "ready".
struct SignalWhenReady {
    out: Vec<u8>,
    signaller: Option<vmm_agent::Signaller>,
}

impl Write for SignalWhenReady {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        if self.out.ends_with(b"ready\n") {
            if let Some(signaller) = self.signaller.take() {
                signaller.signal(10).unwrap(); // SIGUSR1 on x86 Linux
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn signal_reaches_a_command_whose_stdin_is_open() {
    let agent = Agent::start();
    let request = sh("trap 'echo got USR1; exit 3' USR1; echo ready; while :; do sleep 0.05; done")
        .with_stdin(true);
    let execution = agent.client().start(&request).unwrap();
    let mut out = SignalWhenReady {
        out: Vec::new(),
        signaller: Some(execution.signaller()),
    };
    // A stdin that never ends while the command runs.
    let (reader, writer) = UnixStream::pair().unwrap();
    let status = execution.wait(reader, &mut out, io::sink()).unwrap();
    drop(writer);
    assert_eq!(status, ExitStatus::Code(3));
    assert_eq!(out.out, b"ready\ngot USR1\n");
}

#[test]
fn put_file_then_get_file_round_trips() {
    let agent = Agent::start();
    let data = pseudo_random(300_000);
    let path = agent.path("file");
    let path_str = path.to_str().unwrap();
    let written = agent
        .client()
        .put_file(path_str, 0o600, data.as_slice())
        .unwrap();
    assert_eq!(written, data.len() as u64);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    let mut back = Vec::new();
    let read = agent.client().get_file(path_str, &mut back).unwrap();
    assert_eq!(read, data.len() as u64);
    assert!(back == data);
}

/// `--chroot DIR`: file paths and commands are those of DIR. Needs root
/// (chroot) and a static busybox to run inside DIR.
#[test]
fn chroot_serves_inside_the_directory() {
    let busybox = Path::new("/bin/busybox");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !busybox.is_file() {
        eprintln!("skipped: needs root and busybox-static");
        return;
    }
    let root = std::env::temp_dir().join(format!("vmm-agent-chroot-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy(busybox, root.join("bin/busybox")).unwrap();
    fs::write(root.join("marker"), b"inside\n").unwrap();
    // A command without stdin gets the root's /dev/null.
    fs::create_dir_all(root.join("dev")).unwrap();
    let null = std::ffi::CString::new(root.join("dev/null").into_os_string().into_encoded_bytes())
        .unwrap();
    // SAFETY: mknod with a valid NUL-terminated path; no memory is shared.
    assert_eq!(
        unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) },
        0
    );
    let agent = Agent::start_with(&["--chroot".as_ref(), root.as_os_str()]);
    let written = agent
        .client()
        .put_file("/put-here", 0o644, &b"abc"[..])
        .unwrap();
    assert_eq!(written, 3);
    assert_eq!(fs::read(root.join("put-here")).unwrap(), b"abc");
    let req = ExecRequest::new([
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox cat /marker; /bin/busybox pwd; /bin/busybox ls /",
    ]);
    let (status, out, err) = agent.exec(&req, Vec::new());
    let _ = fs::remove_dir_all(&root);
    assert_eq!(
        status,
        ExitStatus::Code(0),
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "inside\n/\nbin\ndev\nmarker\nput-here\n"
    );
}

#[test]
fn empty_file_round_trips() {
    let agent = Agent::start();
    let path = agent.path("empty");
    let path_str = path.to_str().unwrap();
    agent
        .client()
        .put_file(path_str, 0o755, io::empty())
        .unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let mut back = Vec::new();
    assert_eq!(agent.client().get_file(path_str, &mut back).unwrap(), 0);
}

#[test]
fn file_errors_are_reported() {
    let agent = Agent::start();
    let missing = agent.path("missing");
    match agent
        .client()
        .get_file(missing.to_str().unwrap(), io::sink())
    {
        Err(Error::Agent(message)) => assert!(message.contains("No such file"), "{message}"),
        other => panic!("{other:?}"),
    }
    match agent
        .client()
        .get_file(agent.dir.to_str().unwrap(), io::sink())
    {
        Err(Error::Agent(message)) => assert!(message.contains("directory"), "{message}"),
        other => panic!("{other:?}"),
    }
    let bad = agent.path("no-dir/file");
    let data = pseudo_random(200_000);
    match agent
        .client()
        .put_file(bad.to_str().unwrap(), 0o644, data.as_slice())
    {
        Err(Error::Agent(message)) => assert!(message.contains("No such file"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ten_concurrent_execs() {
    let agent = Agent::start();
    let started = Instant::now();
    thread::scope(|scope| {
        let runs: Vec<_> = (0..10)
            .map(|i| {
                let agent = &agent;
                scope
                    .spawn(move || agent.exec(&sh(&format!("sleep 1; echo {i}; exit {i}")), vec![]))
            })
            .collect();
        for (i, run) in runs.into_iter().enumerate() {
            let (status, out, _) = run.join().unwrap();
            assert_eq!(status, ExitStatus::Code(i as i32));
            assert_eq!(out, format!("{i}\n").into_bytes());
        }
    });
    // Served at once, not one after the other.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

/// Sends raw bytes as a request and returns the agent's answer frames.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> Vec<Reply> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut replies = Vec::new();
    while let Ok(Some(frame)) = read_frame(&mut stream) {
        replies.push(Reply::decode(frame).unwrap());
    }
    replies
}

#[test]
fn malformed_requests_get_an_error_and_the_agent_goes_on() {
    let agent = Agent::start();
    let mut exec_then_data = Vec::new();
    write_frame(
        &mut exec_then_data,
        FrameType::Exec,
        br#"{"argv":["cat"],"stdin":true}"#,
    )
    .unwrap();
    write_frame(&mut exec_then_data, FrameType::Data, b"x").unwrap();
    let mut stdin_without_stdin = Vec::new();
    write_frame(
        &mut stdin_without_stdin,
        FrameType::Exec,
        br#"{"argv":["sleep","60"]}"#,
    )
    .unwrap();
    write_frame(&mut stdin_without_stdin, FrameType::Stdin, b"x").unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown type", vec![0, 0, 0, 0, 0x42]),
        ("too long", vec![0xff, 0xff, 0xff, 0xff, 0x01]),
        ("bad JSON", {
            let mut v = Vec::new();
            write_frame(&mut v, FrameType::Exec, b"{\"argv\":").unwrap();
            v
        }),
        ("empty argv", {
            let mut v = Vec::new();
            write_frame(&mut v, FrameType::Exec, br#"{"argv":[]}"#).unwrap();
            v
        }),
        ("reply type", {
            let mut v = Vec::new();
            write_frame(&mut v, FrameType::Exit, br#"{"code":0}"#).unwrap();
            v
        }),
        ("stdin first", {
            let mut v = Vec::new();
            write_frame(&mut v, FrameType::Stdin, b"x").unwrap();
            v
        }),
        ("data during exec", exec_then_data),
        ("stdin without stdin", stdin_without_stdin),
    ];
    for (name, bytes) in cases {
        let replies = raw_exchange(&agent.socket, &bytes);
        assert!(
            matches!(replies.last(), Some(Reply::Error(_))),
            "{name}: {replies:?}"
        );
    }
    // A truncated frame or a silent close harm nothing.
    raw_exchange(&agent.socket, &[9, 0, 0, 0, 0x01, b'{']);
    raw_exchange(&agent.socket, &[]);
    let (status, out, _) = agent.exec(&sh("echo still here"), vec![]);
    assert_eq!(
        (status, out.as_slice()),
        (ExitStatus::Code(0), &b"still here\n"[..])
    );
}

#[test]
fn closing_the_connection_kills_the_command() {
    let agent = Agent::start();
    let request = ExecRequest::new(["sleep", "60"]);
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    vmm_agent::Request::Exec(request)
        .write_to(&mut stream)
        .unwrap();
    let frame = read_frame(&mut stream).unwrap().unwrap();
    let Reply::Started(pid) = Reply::decode(frame).unwrap() else {
        panic!("no STARTED");
    };
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    // The agent reaps it, so its /proc entry disappears.
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the command outlived its connection"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
