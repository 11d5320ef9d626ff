//! Where the guest's serial console goes: Firecracker's `serial` object
//! (`PUT /serial`, or `serial` in a configuration file) sends it to a file
//! or named pipe instead of stdout, and may cap its rate with a token
//! bucket of bytes; output past the rate is dropped and counted in the
//! `uart.rate_limiter_dropped_bytes` metric, so a guest that floods its
//! console cannot fill the host's disk or hold the VMM up.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use devices::rate_limiter::RateLimiter;

use crate::config::SerialConfig;
use crate::metrics::METRICS;

/// Errors of the serial output.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The output file cannot be opened.
    #[error("Cannot open serial_out_path '{path}': {err}; give a writable file or named pipe.")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
}

/// Opens `path` for appending (creating a missing file).
pub fn open(path: &Path) -> Result<std::fs::File, Error> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|err| Error::Open {
            path: path.to_path_buf(),
            err,
        })
}

/// Makes `out` the console output `cfg` asks for: its file instead, and its
/// rate limit around either; `out` is unchanged if the file cannot be opened.
pub fn apply(cfg: &SerialConfig, out: &mut Box<dyn Write + Send>) -> Result<(), Error> {
    if let Some(path) = &cfg.serial_out_path {
        *out = Box::new(open(path)?);
    }
    if let Some(bucket) = &cfg.rate_limiter {
        let inner = std::mem::replace(out, Box::new(std::io::sink()));
        *out = Box::new(Limited {
            out: inner,
            limiter: RateLimiter::new(Some(bucket.device()), None, Instant::now()),
        });
    }
    Ok(())
}

/// Output under a byte budget: what the budget cannot pay is dropped.
struct Limited {
    out: Box<dyn Write + Send>,
    limiter: RateLimiter,
}

impl Write for Limited {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.limiter.consume(0, buf.len() as u64) {
            self.out.write_all(buf)?;
        } else {
            METRICS
                .uart
                .rate_limiter_dropped_bytes
                .add(buf.len() as u64);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenBucket;

    #[test]
    fn output_past_the_rate_is_dropped_and_counted() {
        let dir = std::env::temp_dir().join(format!("vmm-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        let _ = std::fs::remove_file(&path);
        let cfg = SerialConfig {
            serial_out_path: Some(path.clone()),
            rate_limiter: Some(TokenBucket {
                size: 100,
                one_time_burst: None,
                refill_time: 60_000,
            }),
        };
        let before = METRICS.uart.rate_limiter_dropped_bytes.total();
        let mut out: Box<dyn Write + Send> = Box::new(std::io::sink());
        apply(&cfg, &mut out).unwrap();
        for _ in 0..300 {
            assert_eq!(out.write(b"x").unwrap(), 1);
        }
        out.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 100);
        assert!(METRICS.uart.rate_limiter_dropped_bytes.total() - before >= 200);
        let bad = SerialConfig {
            serial_out_path: Some(dir.join("no/such/dir")),
            rate_limiter: None,
        };
        let err = apply(&bad, &mut out).err().unwrap();
        assert!(err.to_string().contains("no/such/dir"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
