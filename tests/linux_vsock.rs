//! vsock with the project's Linux and the guest agent, on clones of the
//! suite's golden guest (tests/common/golden.rs), each with its own vsock
//! socket (`vsock_override`): host programs reach the agent with
//! Firecracker's `CONNECT` line, commands run and stream both ways, and a
//! port nobody listens on is refused.

mod common;

use std::time::{Duration, Instant};

use common::golden::{self, vsock_path, Netns, AGENT_PORT};
use common::{host, Host};
use vmm::run::vsock_connect;
use vmm_agent::{AgentClient, ExecRequest};

/// Runs `argv` in the guest through the agent with `stdin`; returns
/// (stdout, stderr, shell-style exit code).
fn run(uds: &std::path::Path, argv: &[&str], stdin: Vec<u8>) -> (Vec<u8>, Vec<u8>, i32) {
    let s = vsock_connect(uds, AGENT_PORT).expect("the agent accepts");
    let client = AgentClient::from_unix(s).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let req = ExecRequest::new(argv.iter().copied()).with_stdin(!stdin.is_empty());
    let status = client
        .exec(&req, std::io::Cursor::new(stdin), &mut out, &mut err)
        .expect("the command runs");
    (out, err, status.shell_code())
}

#[test]
fn commands_run_in_a_restored_guest_through_vsock_and_the_agent() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("vsock");
    ns.add_tap("vmmtap0", None);
    let (mut vm, _sock) = golden::restore(&ns, "vmmtap0", &g, "vsock-exec");
    let uds = vsock_path("vsock-exec");

    let (out, err, code) = run(
        &uds,
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        vec![],
    );
    eprintln!("asserting: stdout, stderr and exit status 7 through the agent");
    assert_eq!(
        (out.as_slice(), err.as_slice(), code),
        (&b"out\n"[..], &b"err\n"[..], 7)
    );
    let (_, err, code) = run(&uds, &["no-such-command"], vec![]);
    assert_eq!(code, 127, "{}", String::from_utf8_lossy(&err));

    // Bytes both ways through cat, byte-exact. PVM moves the guest's side
    // of vsock slowly (Firecracker 1.16 echoes about 0.17 MiB/s here): the
    // size is smaller there, and the rate is printed.
    let size = match host {
        Host::Pvm => 256 << 10,
        Host::Hardware => 4 << 20,
    };
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    let (back, err, code) = run(&uds, &["cat"], data.clone());
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "asserting: {} KiB through cat and back byte-exact ({:.2} s, {:.2} MiB/s each way)",
        size >> 10,
        secs,
        size as f64 / secs / (1 << 20) as f64
    );
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(
        back == data,
        "{} bytes came back, not the {size} sent",
        back.len()
    );

    // A port nobody listens on: the guest resets, the host socket closes.
    eprintln!("asserting: CONNECT to a port nobody listens on is closed");
    let refused = vsock_connect(&uds, 4444).map(|_| ());
    assert_eq!(refused, Err("port 4444: nobody listens".to_string()));

    // Several connections at once.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                run(
                    &uds,
                    &["sh", "-c", &format!("echo conn-$(({i} * 3))")],
                    vec![],
                )
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (out, _, code) = t.join().unwrap();
        assert_eq!(
            (String::from_utf8(out).unwrap(), code),
            (format!("conn-{}\n", i * 3), 0)
        );
    }

    // Guest-initiated streams: the guest's `vmm-agent connect` reaches a host
    // listener at <uds>_5000, which echoes; the data goes host -> agent ->
    // guest stream -> host listener -> back, byte-exact, on several
    // connections at once.
    let (conns, each) = match host {
        Host::Pvm => (8, 32 << 10),
        Host::Hardware => (32, 4 << 20),
    };
    let host_port = std::path::PathBuf::from(format!("{}_5000", uds.display()));
    let _ = std::fs::remove_file(&host_port); // left by an earlier run
    let listener = std::os::unix::net::UnixListener::bind(&host_port).unwrap();
    let echo = std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = listener.accept().unwrap();
            got.push(std::thread::spawn(move || {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut s, &mut buf).unwrap();
                std::io::Write::write_all(&mut s, &buf).unwrap();
                buf.len()
            }));
        }
        got.into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    });
    let t = Instant::now();
    let clients: Vec<_> = (0..conns)
        .map(|i| {
            let uds = uds.clone();
            let data: Vec<u8> = (0..each as u32)
                .map(|b| (b.wrapping_mul(31) ^ i) as u8)
                .collect();
            std::thread::spawn(move || {
                let (back, err, code) = run(
                    &uds,
                    &["vmm-agent", "connect", "--port", "5000"],
                    data.clone(),
                );
                (
                    back == data,
                    code,
                    String::from_utf8_lossy(&err).into_owned(),
                )
            })
        })
        .collect();
    for c in clients {
        let (same, code, err) = c.join().unwrap();
        assert!(same && code == 0, "exit {code}: {err}");
    }
    let echoed = echo.join().unwrap();
    eprintln!(
        "asserting: {conns} guest-initiated streams of {} KiB each way, byte-exact ({:.1} s)",
        each >> 10,
        t.elapsed().as_secs_f64()
    );
    assert!(echoed.iter().all(|&n| n == each), "{echoed:?}");
    let _ = std::fs::remove_file(&host_port);
    // Nobody listens on the host port: the guest's connect is reset.
    let (_, err, code) = run(&uds, &["vmm-agent", "connect", "--port", "5999"], vec![]);
    let err = String::from_utf8_lossy(&err);
    assert!(code == 1 && err.contains("cannot connect"), "{code}: {err}");

    vm.type_on_console("poweroff -f\n");
    let outcome = vm.finish(Duration::from_secs(120));
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    assert!(!uds.exists(), "the clone's vsock socket goes with it");
}
