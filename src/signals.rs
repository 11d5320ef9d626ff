//! Fatal host signals handled as Firecracker handles them: SIGBUS, SIGSEGV,
//! SIGXFSZ, SIGXCPU and SIGILL are logged ("Shutting down VM after
//! intercepting signal N, code C."), counted in the `signals` metrics group
//! (a metrics line is written at once) and end the process with Firecracker's
//! exit code for that signal; SIGPIPE is logged ("Received signal 13") and
//! counted, and the VMM goes on. SIGHUP is an orderly stop (runtime.rs) with
//! the same line and exit code; SIGSYS is seccomp's (src/seccomp).
//!
//! The handlers only do async-signal-safe work: atomics, a stack buffer,
//! write(2) and _exit(2).

use std::sync::atomic::Ordering;

use crate::metrics::METRICS;
use crate::seccomp::{raw_write, Line, LOG_FD, METRICS_FD};

/// Firecracker's exit code for the VMM stopped by `signal` (FcExitCode).
pub fn exit_code(signal: i32) -> Option<i32> {
    Some(match signal {
        libc::SIGBUS => 149,
        libc::SIGSEGV => 150,
        libc::SIGXFSZ => 151,
        libc::SIGXCPU => 154,
        libc::SIGHUP => 156,
        libc::SIGILL => 157,
        _ => return None,
    })
}

/// Installs the handlers (process-wide), before any thread starts.
pub fn install() -> std::io::Result<()> {
    for signal in [
        libc::SIGBUS,
        libc::SIGSEGV,
        libc::SIGXFSZ,
        libc::SIGXCPU,
        libc::SIGILL,
        libc::SIGPIPE,
    ] {
        // SAFETY: an all-zero sigaction is valid; the fields set below make
        // it an SA_SIGINFO handler with an empty mask.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = handler as *const () as usize;
        // On the thread's own stack, not the small alternate one Rust sets up:
        // the handler renders a whole metrics line.
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `act` is a valid sigaction whose handler has the signature
        // SA_SIGINFO expects; the old action is not asked for.
        if unsafe { libc::sigaction(signal, &act, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn handler(signal: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    let m = &METRICS.signals;
    if signal == libc::SIGPIPE {
        m.sigpipe.inc();
        let mut line = log_prefix();
        line.push(b"Received signal 13\n");
        write_log(&line);
        return;
    }
    match signal {
        libc::SIGBUS => m.sigbus.set(1),
        libc::SIGSEGV => m.sigsegv.set(1),
        libc::SIGXFSZ => m.sigxfsz.set(1),
        libc::SIGXCPU => m.sigxcpu.set(1),
        libc::SIGILL => m.sigill.set(1),
        _ => {}
    }
    log_intercepted(signal, code);
    write_metrics();
    // SAFETY: _exit ends the process at once, without running anything that
    // is not async-signal-safe.
    unsafe { libc::_exit(exit_code(signal).unwrap_or(1)) }
}

/// Logs Firecracker's line for a signal that stops the VMM.
pub(crate) fn log_intercepted(signal: i32, code: i32) {
    let mut line = log_prefix();
    line.push(b"Shutting down VM after intercepting signal ");
    line.push_num(signal as u64);
    line.push(b", code ");
    if code < 0 {
        line.push(b"-");
    }
    line.push_num(code.unsigned_abs() as u64);
    line.push(b".\n");
    write_log(&line);
}

/// A whole metrics line (Firecracker's schema) with the signal's count, so
/// the file shows why the VMM ended.
fn write_metrics() {
    let fd = METRICS_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        crate::metrics::write_last_line(fd);
    }
}

/// To the log file, or to stderr without one.
fn write_log(line: &Line) {
    let fd = LOG_FD.load(Ordering::Relaxed);
    raw_write(if fd >= 0 { fd } else { 2 }, line.bytes());
}

/// "YYYY-MM-DDTHH:MM:SS.NNNNNNNNN [ID:main] ", as the logger writes it.
fn log_prefix() -> Line {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    let secs = ts.tv_sec.max(0) as u64;
    let (y, mo, d) = crate::logger::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut line = Line::new();
    push_padded(&mut line, y.max(0) as u64, 4);
    line.push(b"-");
    push_padded(&mut line, mo.into(), 2);
    line.push(b"-");
    push_padded(&mut line, d.into(), 2);
    line.push(b"T");
    push_padded(&mut line, rem / 3600, 2);
    line.push(b":");
    push_padded(&mut line, rem % 3600 / 60, 2);
    line.push(b":");
    push_padded(&mut line, rem % 60, 2);
    line.push(b".");
    push_padded(&mut line, ts.tv_nsec.max(0) as u64, 9);
    line.push(b" [");
    if let Some(id) = crate::logger::INSTANCE_ID.get() {
        line.push(id.as_bytes());
    }
    line.push(b":main] ");
    line
}

/// `v` in decimal, zero-padded on the left to `width` digits.
fn push_padded(line: &mut Line, v: u64, width: u32) {
    let digits = v.checked_ilog10().map_or(1, |d| d + 1);
    for _ in digits..width {
        line.push(b"0");
    }
    line.push_num(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_firecracker_s() {
        assert_eq!(exit_code(libc::SIGBUS), Some(149));
        assert_eq!(exit_code(libc::SIGSEGV), Some(150));
        assert_eq!(exit_code(libc::SIGXFSZ), Some(151));
        assert_eq!(exit_code(libc::SIGXCPU), Some(154));
        assert_eq!(exit_code(libc::SIGHUP), Some(156));
        assert_eq!(exit_code(libc::SIGILL), Some(157));
        assert_eq!(exit_code(libc::SIGTERM), None);
    }

    #[test]
    fn numbers_are_padded_to_their_width() {
        // Seen in CI: a nanosecond count below 10^8 came out with 8 digits.
        for (v, width, want) in [
            (84_359_958u64, 9, "084359958"),
            (5, 2, "05"),
            (0, 9, "000000000"),
            (59, 2, "59"),
            (2026, 4, "2026"),
            (123_456_789, 9, "123456789"),
            (7, 1, "7"),
        ] {
            let mut line = Line::new();
            push_padded(&mut line, v, width);
            assert_eq!(std::str::from_utf8(line.bytes()).unwrap(), want);
        }
    }

    #[test]
    fn the_prefix_is_the_logger_s_shape() {
        let line = log_prefix();
        let text = std::str::from_utf8(line.bytes()).unwrap();
        let (ts, rest) = text.split_once(' ').unwrap();
        assert_eq!(ts.len(), "2026-12-07T08:45:14.532421225".len(), "{ts}");
        assert_eq!(&ts[4..5], "-");
        assert_eq!(&ts[10..11], "T");
        assert!(rest.starts_with('[') && rest.ends_with(":main] "), "{rest}");
    }
}
