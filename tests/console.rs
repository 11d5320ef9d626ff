//! The interactive console: raw mode on a terminal, the Ctrl-A x escape, and the
//! terminal restored on exit. Runs the real binary on a pseudo-terminal.

mod common;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, host};

fn openpty() -> (std::fs::File, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the given integers; the name,
    // termios and winsize arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both descriptors were just created and are owned here.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    use std::os::fd::AsRawFd;
    // SAFETY: zeroed termios is valid storage for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open terminal descriptor.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

#[test]
fn ctrl_a_x_quits_with_status_0_and_restores_the_terminal() {
    host();
    let (mut master, slave) = openpty();
    let before = termios(&slave);
    assert_ne!(
        before.c_lflag & libc::ICANON,
        0,
        "a fresh pty starts in canonical mode"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--kernel")
        .arg(guest("halt"))
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Wait for the guest's line on the terminal, then check raw mode is on.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("VMM-GUEST: halted") {
        assert!(
            Instant::now() < deadline,
            "no guest output: {:?}",
            String::from_utf8_lossy(&seen)
        );
        let n = master.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    let during = termios(&slave);
    assert_eq!(
        during.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw mode while the guest runs"
    );

    master.write_all(b"\x01x").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "Ctrl-A x did not stop the VMM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let after = termios(&slave);
    assert_eq!(
        (after.c_lflag, after.c_iflag, after.c_oflag, after.c_cflag),
        (
            before.c_lflag,
            before.c_iflag,
            before.c_oflag,
            before.c_cflag
        ),
        "terminal settings restored"
    );
}

#[test]
fn guest_crash_also_restores_the_terminal() {
    host();
    let (_master, slave) = openpty();
    let before = termios(&slave);
    let status = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--kernel")
        .arg(guest("triple_fault"))
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    let after = termios(&slave);
    assert_eq!(
        (after.c_lflag, after.c_iflag),
        (before.c_lflag, before.c_iflag)
    );
}
