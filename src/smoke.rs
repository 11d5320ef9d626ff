//! CI smoke mode on the ordinary command: `--expect REGEX` (repeatable),
//! `--timeout S`, `--console-log FILE`, `--report FILE`. The console is
//! watched as it is written: once every pattern has appeared the VM is
//! stopped and the verdict is a pass; the guest ending first, a crash or the
//! timeout are failures, each with its own exit status, and the report says
//! which pattern was missing.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regex::bytes::Regex;

use crate::exit::{ExitSignal, VmExit};

/// Exit status when the timeout hit before every pattern appeared.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status when the guest ended before every pattern appeared.
pub const EXIT_NOT_SEEN: i32 = 4;
/// Longest console line kept for matching (longer lines are matched by their tail).
const MAX_LINE: usize = 64 * 1024;
/// Longest unfinished line matched as it grows (a prompt is short): the
/// console arrives a byte at a time, so matching a long unfinished line on
/// every byte would cost the VMM quadratic time. Longer lines are matched
/// when they end.
const MAX_PARTIAL: usize = 4096;

/// Errors in the smoke options.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pattern that does not compile.
    #[error("--expect '{pattern}' is not a valid regular expression: {err}")]
    Pattern { pattern: String, err: String },
    /// The console log cannot be created.
    #[error("Cannot create the console log '{path}': {err}.")]
    ConsoleLog { path: String, err: std::io::Error },
}

/// One pattern and when it appeared.
struct Expectation {
    text: String,
    regex: Regex,
    seen: Option<Duration>,
}

/// What the watcher has seen.
struct State {
    expectations: Vec<Expectation>,
    /// The console line being written (patterns are matched per line, and
    /// against the unfinished line, so that a prompt without a newline counts).
    line: Vec<u8>,
    first_byte: Option<Duration>,
    timed_out: bool,
}

/// The smoke test of one VM.
#[derive(Clone)]
pub struct Smoke {
    state: Arc<Mutex<State>>,
    started: Instant,
    exit: Arc<ExitSignal>,
}

impl Smoke {
    /// Watches for `patterns` (all must appear) from `started` on; stops the
    /// VM through `exit` once they have.
    pub fn new(
        patterns: &[String],
        started: Instant,
        exit: Arc<ExitSignal>,
    ) -> Result<Self, Error> {
        let expectations = patterns
            .iter()
            .map(|p| {
                Regex::new(p)
                    .map(|regex| Expectation {
                        text: p.clone(),
                        regex,
                        seen: None,
                    })
                    .map_err(|e| Error::Pattern {
                        pattern: p.clone(),
                        err: e
                            .to_string()
                            .lines()
                            .last()
                            .unwrap_or("")
                            .trim()
                            .to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Smoke {
            state: Arc::new(Mutex::new(State {
                expectations,
                line: Vec::new(),
                first_byte: None,
                timed_out: false,
            })),
            started,
            exit,
        })
    }

    /// The console writer: `inner` (stdout) and, if given, a log file, with
    /// the output watched on the way.
    pub fn console(
        &self,
        inner: Box<dyn Write + Send>,
        log: Option<&PathBuf>,
    ) -> Result<Box<dyn Write + Send>, Error> {
        let log = match log {
            Some(p) => Some(File::create(p).map_err(|err| Error::ConsoleLog {
                path: p.display().to_string(),
                err,
            })?),
            None => None,
        };
        Ok(Box::new(Watcher {
            smoke: self.clone(),
            inner,
            log,
        }))
    }

    /// Ends the run at `after` from the start unless it ended before.
    pub fn arm_timeout(&self, after: Duration) {
        let me = self.clone();
        std::thread::spawn(move || {
            // A timer thread: the VMM role's calls are more than it needs.
            if let Err(e) = crate::seccomp::apply(crate::seccomp::Role::Vmm) {
                me.exit.raise(Err(e.to_string()));
                return;
            }
            std::thread::sleep(after.saturating_sub(me.started.elapsed()));
            me.lock().timed_out = true;
            me.exit.raise(Ok(VmExit::Stopped));
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn feed(&self, bytes: &[u8]) {
        let now = self.started.elapsed();
        let mut s = self.lock();
        if s.first_byte.is_none() && !bytes.is_empty() {
            s.first_byte = Some(now);
        }
        let mut all_now = false;
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            if s.expectations.iter().all(|e| e.seen.is_some()) {
                break;
            }
            s.line.extend_from_slice(chunk);
            if s.line.len() > MAX_LINE {
                let cut = s.line.len() - MAX_LINE;
                s.line.drain(..cut);
            }
            let complete = chunk.ends_with(b"\n");
            if complete || s.line.len() <= MAX_PARTIAL {
                let State {
                    expectations, line, ..
                } = &mut *s;
                let mut text = line.as_slice();
                while let Some((b'\n' | b'\r', rest)) = text.split_last() {
                    text = rest;
                }
                let mut newly = false;
                for e in expectations.iter_mut().filter(|e| e.seen.is_none()) {
                    if e.regex.is_match(text) {
                        e.seen = Some(now);
                        newly = true;
                    }
                }
                all_now = newly && expectations.iter().all(|e| e.seen.is_some());
            }
            if complete {
                s.line.clear();
            }
        }
        drop(s);
        if all_now {
            log::info!("smoke: every pattern appeared; stopping the VM");
            self.exit.raise(Ok(VmExit::Stopped));
        }
    }

    /// The verdict and exit status for how the VM ended (`status` is what
    /// it would be without smoke mode), and the report.
    pub fn finish(
        &self,
        ended: &Result<VmExit, String>,
        status: i32,
        report: Option<&PathBuf>,
    ) -> i32 {
        let s = self.lock();
        let none = s.expectations.is_empty();
        let all = !none && s.expectations.iter().all(|e| e.seen.is_some());
        let (verdict, code) = match ended {
            Ok(VmExit::Crash(_)) => ("crash", status),
            Err(_) => ("vmm-error", status),
            Ok(_) if all => ("pass", 0),
            Ok(_) if s.timed_out => ("timeout", EXIT_TIMEOUT),
            Ok(VmExit::Signal(_)) => ("stopped", status),
            // No pattern asked for: the guest's own end is the verdict.
            Ok(_) if none => ("guest-ended", status),
            Ok(_) => ("pattern-missing", EXIT_NOT_SEEN),
        };
        for e in s.expectations.iter().filter(|e| e.seen.is_none()) {
            eprintln!("vmm: smoke: '{}' did not appear ({verdict})", e.text);
        }
        if let Some(path) = report {
            let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
            let first_run =
                crate::vstate::vcpu::FIRST_KVM_RUN_US.load(std::sync::atomic::Ordering::Relaxed);
            let json = serde_json::json!({
                "verdict": verdict,
                "patterns": s.expectations.iter().map(|e| serde_json::json!({
                    "pattern": e.text,
                    "matched": e.seen.is_some(),
                    "matched_ms": ms(e.seen),
                })).collect::<Vec<_>>(),
                "vmm_start_to_first_kvm_run_ms": (first_run > 0).then(|| first_run as f64 / 1000.0),
                "first_console_byte_ms": ms(s.first_byte),
                "guest_exit": match ended {
                    Ok(e) => e.to_json(),
                    Err(e) => serde_json::json!({"kind": "vmm_error", "message": e}),
                },
                "exit_status": code,
            });
            if let Err(e) = std::fs::write(path, format!("{json:#}\n")) {
                eprintln!(
                    "vmm: smoke: cannot write the report '{}': {e}",
                    path.display()
                );
            }
        }
        code
    }
}

/// The console writer of smoke mode.
struct Watcher {
    smoke: Smoke,
    inner: Box<dyn Write + Send>,
    log: Option<File>,
}

impl Write for Watcher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(f) = &mut self.log {
            let _ = f.write_all(&buf[..n]);
        }
        self.smoke.feed(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_per_line_and_across_writes_and_all_stop_the_vm() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let smoke = Smoke::new(
            &["^login:".into(), r"booted in \d+ ms".into()],
            Instant::now(),
            exit.clone(),
        )
        .unwrap();
        let mut out = smoke.console(Box::new(std::io::sink()), None).unwrap();
        out.write_all(b"kernel: booted in 1").unwrap();
        assert!(!exit.is_raised());
        out.write_all(b"23 ms\nnot login: here\n").unwrap();
        assert!(!exit.is_raised(), "'^login:' needs the line start");
        out.write_all(b"login:").unwrap();
        assert!(exit.is_raised(), "a prompt without a newline counts");
        let code = smoke.finish(&Ok(VmExit::Stopped), 0, None);
        assert_eq!(code, 0);
    }

    #[test]
    fn a_long_unfinished_line_is_matched_when_it_ends() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let smoke = Smoke::new(&["x{5000}END".into()], Instant::now(), exit.clone()).unwrap();
        let mut out = smoke.console(Box::new(std::io::sink()), None).unwrap();
        // A byte at a time, as the UART writes.
        for _ in 0..5000 {
            out.write_all(b"x").unwrap();
        }
        out.write_all(b"END").unwrap();
        assert!(
            !exit.is_raised(),
            "past MAX_PARTIAL, matched at the line's end"
        );
        out.write_all(b"\n").unwrap();
        assert!(exit.is_raised());
    }

    #[test]
    fn a_missing_pattern_is_a_failure_with_its_own_status() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let smoke = Smoke::new(&["never".into()], Instant::now(), exit).unwrap();
        let mut out = smoke.console(Box::new(std::io::sink()), None).unwrap();
        out.write_all(b"something else\n").unwrap();
        assert_eq!(smoke.finish(&Ok(VmExit::PowerOff), 0, None), EXIT_NOT_SEEN);
        smoke.lock().timed_out = true;
        assert_eq!(smoke.finish(&Ok(VmExit::Stopped), 0, None), EXIT_TIMEOUT);
        assert!(Smoke::new(
            &["(".into()],
            Instant::now(),
            Arc::new(ExitSignal::new().unwrap())
        )
        .err()
        .is_some_and(|e| e.to_string().contains("--expect '('")));
    }
}
