//! The logger behind the `log` facade. By default one line per record on
//! stderr (`vmm: warn: ...`). Configured with a log path (`--log-path`,
//! `PUT /logger`), it writes Firecracker's line shape to that file or named
//! pipe: `TIME [INSTANCE:THREAD(:LEVEL)(:FILE:LINE)] message`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LoggerConfig;
use crate::metrics::METRICS;

/// Errors configuring the logger.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A level name that is not one of Firecracker's.
    #[error("Log level '{0}' is not valid; give Error, Warning, Info, Debug, Trace or Off.")]
    Level(String),
    /// The log path cannot be opened.
    #[error("Cannot open the log path '{path}': {err}; give a writable file or named pipe.")]
    Open { path: String, err: String },
}

struct State {
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    instance_id: String,
    module: Option<String>,
}

static STATE: Mutex<State> = Mutex::new(State {
    file: None,
    show_level: false,
    show_origin: false,
    instance_id: String::new(),
    module: None,
});

struct VmmLogger;

impl Log for VmmLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = &state.module {
            if !record
                .module_path()
                .is_some_and(|p| p.starts_with(m.as_str()))
            {
                return;
            }
        }
        let origin = match (state.show_origin, record.file(), record.line()) {
            (true, Some(f), Some(l)) => format!(":{f}:{l}"),
            _ => String::new(),
        };
        let level = record.level().as_str();
        if state.file.is_none() {
            // With the console in raw mode, "\n" does not return the carriage.
            let origin = origin.trim_start_matches(':');
            let origin = if origin.is_empty() {
                String::new()
            } else {
                format!("{origin}: ")
            };
            eprint!(
                "vmm: {}: {origin}{}\r\n",
                level.to_lowercase(),
                record.args()
            );
            return;
        }
        let thread = std::thread::current();
        let line = format!(
            "{} [{}:{}{}{}] {}\n",
            utc_timestamp(),
            state.instance_id,
            thread.name().unwrap_or("unnamed"),
            if state.show_level {
                format!(":{level}")
            } else {
                String::new()
            },
            origin,
            record.args()
        );
        if let Some(f) = state.file.as_mut() {
            if write_line(f, line.as_bytes()).is_err() {
                METRICS.logger.missed_log_count.inc();
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: VmmLogger = VmmLogger;

/// Installs the logger at `level`, on stderr; a second call only changes the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Sets the instance ID written in each line of a log file.
pub fn set_instance_id(id: &str) {
    STATE.lock().unwrap_or_else(|e| e.into_inner()).instance_id = id.to_string();
    let _ = INSTANCE_ID.set(id.to_string());
}

/// The instance ID as first set, for writers that cannot take a lock (the
/// signal handlers).
pub(crate) static INSTANCE_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Whether log lines go to a file (`--log-path` or PUT /logger).
pub fn has_file() -> bool {
    STATE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .file
        .is_some()
}

/// Writes `msg` to the log file only (when there is one), whatever the
/// level: start-up failures and the exit line, which stderr shows its own way.
pub fn to_file(level: log::Level, msg: std::fmt::Arguments) {
    if has_file() {
        LOGGER.log(
            &Record::builder()
                .args(msg)
                .level(level)
                .target("vmm")
                .build(),
        );
    }
}

/// Parses a level: Firecracker's names (Error, Warning, Info, Debug, Trace,
/// Off) or the `log` crate's (warn), in any case.
pub fn parse_level(s: &str) -> Result<LevelFilter, Error> {
    match s.to_ascii_lowercase().as_str() {
        "warning" => Ok(LevelFilter::Warn),
        other => other.parse().map_err(|_| Error::Level(s.to_string())),
    }
}

/// Applies a logger configuration: level, destination, line shape.
pub fn configure(config: &LoggerConfig) -> Result<(), Error> {
    let level = config.level.as_deref().map(parse_level).transpose()?;
    let file = config.log_path.as_deref().map(open_log).transpose()?;
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = file {
        // The seccomp fault handler writes there too (before the old file,
        // if any, is closed).
        crate::seccomp::set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&f));
        state.file = Some(f);
    }
    state.show_level = config.show_level.unwrap_or(state.show_level);
    state.show_origin = config.show_log_origin.unwrap_or(state.show_origin);
    if config.module.is_some() {
        state.module = config.module.clone();
    }
    drop(state);
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}

/// Opens a log or metrics destination for appending: a file (created if
/// missing) or a named pipe, opened read-write and non-blocking so that opening
/// a pipe nobody reads yet does not block, and a full pipe drops lines instead
/// of stopping the VMM.
pub fn open_sink(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Writes one whole line to a log or metrics sink opened by [`open_sink`]. A
/// line nothing of which fits now (a full pipe) is dropped whole; once part
/// of it is written, the rest is waited for (at most 200 ms), so a reader
/// never sees half a line followed by the next one.
pub fn write_line(file: &mut File, line: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    let mut done = 0;
    while done < line.len() {
        match file.write(&line[done..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if done == 0 || std::time::Instant::now() >= deadline {
                    return Err(e);
                }
                let mut pfd = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll reads and writes one pollfd, which `pfd` is.
                unsafe { libc::poll(&mut pfd, 1, 10) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn open_log(path: &Path) -> Result<File, Error> {
    open_sink(path).map_err(|e| Error::Open {
        path: path.display().to_string(),
        err: e.to_string(),
    })
}

/// Now in UTC as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`.
fn utc_timestamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// The calendar date of a day count since 1970-01-01 (proleptic Gregorian).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_in_firecracker_and_log_spelling() {
        assert_eq!(parse_level("Warning"), Ok(LevelFilter::Warn));
        assert_eq!(parse_level("warn"), Ok(LevelFilter::Warn));
        assert_eq!(parse_level("DEBUG"), Ok(LevelFilter::Debug));
        assert_eq!(parse_level("Off"), Ok(LevelFilter::Off));
        assert!(parse_level("loud")
            .unwrap_err()
            .to_string()
            .contains("'loud'"));
    }

    #[test]
    fn dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_789), (2026, 12, 2));
    }
}
