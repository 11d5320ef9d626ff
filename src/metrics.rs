//! Metrics in Firecracker's shape: one JSON object per line, written to the
//! metrics path every 60 s and on `FlushMetrics`, with Firecracker's group and
//! key names for what this VMM has. Counters report what happened since the
//! previous line (as Firecracker's do); stored values report their current
//! value. Every group is present even when all its values are zero.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::device_manager::{DeviceManager, VirtioKind};

/// Errors of the metrics system.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics path cannot be opened.
    #[error("Cannot open the metrics path '{path}': {err}; give a writable file or named pipe.")]
    Open { path: String, err: std::io::Error },
    /// Metrics were configured twice.
    #[error("Reinitialization of metrics is not allowed; metrics are already written to '{0}'.")]
    AlreadyConfigured(String),
    /// A flush without a metrics path.
    #[error("Metrics are not configured; configure a metrics path first (PUT /metrics or --metrics-path).")]
    NotConfigured,
    /// The line cannot be written.
    #[error("Cannot write metrics: {0}.")]
    Write(std::io::Error),
}

/// A count of events; each flush reports the increase since the previous one.
#[derive(Default)]
pub struct Counter {
    total: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Counter {
            total: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }
    /// Takes the running total kept elsewhere (a device's own counter).
    pub fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
    /// Everything counted so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    /// The increase since the last written line; `seen` records the total it
    /// was computed from, to be marked as written once the line is out.
    fn delta<'a>(&'a self, seen: &mut Vec<(&'a Counter, u64)>) -> u64 {
        let now = self.total();
        seen.push((self, now));
        now.wrapping_sub(self.flushed.load(Ordering::Relaxed))
    }
}

/// A value reported as it is.
#[derive(Default)]
pub struct Store(AtomicU64);

impl Store {
    /// A value of zero.
    pub const fn new() -> Self {
        Store(AtomicU64::new(0))
    }
    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Declares a metrics group: a struct of counters or stores, and how it
/// becomes a JSON object.
macro_rules! group {
    ($name:ident { $($key:ident: $kind:ident),* $(,)? }) => {
        /// A metrics group (Firecracker's keys).
        #[derive(Default)]
        #[allow(missing_docs)]
        pub struct $name { $(pub $key: $kind,)* }
        impl $name {
            const fn new() -> Self { $name { $($key: $kind::new(),)* } }
            fn json<'a>(&'a self, seen: &mut Vec<(&'a Counter, u64)>) -> Value {
                let mut m = Map::new();
                $(m.insert(stringify!($key).into(), Value::from(group!(@read self.$key, $kind, seen)));)*
                Value::Object(m)
            }
        }
    };
    (@read $e:expr, Counter, $seen:ident) => { $e.delta($seen) };
    (@read $e:expr, Store, $seen:ident) => {{ let _ = &$seen; $e.get() }};
}

group!(ApiServerMetrics {
    process_startup_time_us: Store,
    process_startup_time_cpu_us: Store,
});
group!(GetRequestsMetrics {
    instance_info_count: Counter,
    machine_cfg_count: Counter,
    mmds_count: Counter,
    vmm_version_count: Counter,
});
group!(PutRequestsMetrics {
    actions_count: Counter,
    actions_fails: Counter,
    boot_source_count: Counter,
    boot_source_fails: Counter,
    drive_count: Counter,
    drive_fails: Counter,
    logger_count: Counter,
    logger_fails: Counter,
    machine_cfg_count: Counter,
    machine_cfg_fails: Counter,
    cpu_cfg_count: Counter,
    cpu_cfg_fails: Counter,
    metrics_count: Counter,
    metrics_fails: Counter,
    network_count: Counter,
    network_fails: Counter,
    mmds_count: Counter,
    mmds_fails: Counter,
    vsock_count: Counter,
    vsock_fails: Counter,
});
group!(PatchRequestsMetrics {
    drive_count: Counter,
    drive_fails: Counter,
    network_count: Counter,
    network_fails: Counter,
    machine_cfg_count: Counter,
    machine_cfg_fails: Counter,
    mmds_count: Counter,
    mmds_fails: Counter,
});
group!(DeprecatedApiMetrics {
    deprecated_http_api_calls: Counter,
    deprecated_cmd_line_api_calls: Counter,
});
group!(LoggerSystemMetrics {
    missed_metrics_count: Counter,
    metrics_fails: Counter,
    missed_log_count: Counter,
    log_fails: Counter,
});
group!(PerformanceMetrics {
    full_create_snapshot: Store,
    diff_create_snapshot: Store,
    load_snapshot: Store,
    pause_vm: Store,
    resume_vm: Store,
    vmm_full_create_snapshot: Store,
    vmm_diff_create_snapshot: Store,
    vmm_load_snapshot: Store,
    vmm_pause_vm: Store,
    vmm_resume_vm: Store,
});
group!(MmdsMetrics {
    rx_accepted: Counter,
    rx_accepted_err: Counter,
    rx_accepted_unusual: Counter,
    rx_bad_eth: Counter,
    rx_count: Counter,
    rx_invalid_token: Counter,
    rx_no_token: Counter,
    tx_bytes: Counter,
    tx_count: Counter,
    tx_errors: Counter,
    tx_frames: Counter,
    connections_created: Counter,
    connections_destroyed: Counter,
});
group!(SeccompMetrics { num_faults: Store });
group!(SignalMetrics {
    sigbus: Store,
    sigsegv: Store,
    sigxfsz: Store,
    sigxcpu: Store,
    sigpipe: Counter,
    sighup: Store,
    sigill: Store,
});
group!(VcpuMetrics {
    exit_io_in: Counter,
    exit_io_out: Counter,
    exit_mmio_read: Counter,
    exit_mmio_write: Counter,
    failures: Counter,
});
group!(VmmMetrics {
    device_events: Counter,
    panic_count: Store,
});
group!(SerialMetrics {
    error_count: Counter,
    flush_count: Counter,
    missed_read_count: Counter,
    missed_write_count: Counter,
    read_count: Counter,
    write_count: Counter,
    rate_limiter_dropped_bytes: Counter,
});
group!(I8042Metrics {
    error_count: Counter,
    missed_read_count: Counter,
    missed_write_count: Counter,
    read_count: Counter,
    reset_count: Counter,
    write_count: Counter,
});

/// The process's metrics.
#[allow(missing_docs)]
pub struct Metrics {
    pub api_server: ApiServerMetrics,
    pub get_api_requests: GetRequestsMetrics,
    pub put_api_requests: PutRequestsMetrics,
    pub patch_api_requests: PatchRequestsMetrics,
    pub deprecated_api: DeprecatedApiMetrics,
    pub logger: LoggerSystemMetrics,
    pub latencies_us: PerformanceMetrics,
    pub mmds: MmdsMetrics,
    pub seccomp: SeccompMetrics,
    pub signals: SignalMetrics,
    pub vcpu: VcpuMetrics,
    pub vmm: VmmMetrics,
    pub uart: SerialMetrics,
    pub i8042: I8042Metrics,
}

/// The metadata store whose counters the `mmds` group reports.
static MMDS_SOURCE: std::sync::OnceLock<devices::mmds::SharedMmds> = std::sync::OnceLock::new();

/// Reports `store`'s counters in the `mmds` group (the first store given:
/// one VM per process).
pub fn report_mmds(store: &devices::mmds::SharedMmds) {
    let _ = MMDS_SOURCE.set(store.clone());
}

/// The one set of metrics of this process.
pub static METRICS: Metrics = Metrics {
    api_server: ApiServerMetrics::new(),
    get_api_requests: GetRequestsMetrics::new(),
    put_api_requests: PutRequestsMetrics::new(),
    patch_api_requests: PatchRequestsMetrics::new(),
    deprecated_api: DeprecatedApiMetrics::new(),
    logger: LoggerSystemMetrics::new(),
    latencies_us: PerformanceMetrics::new(),
    mmds: MmdsMetrics::new(),
    seccomp: SeccompMetrics::new(),
    signals: SignalMetrics::new(),
    vcpu: VcpuMetrics::new(),
    vmm: VmmMetrics::new(),
    uart: SerialMetrics::new(),
    i8042: I8042Metrics::new(),
};

/// Keys of the per-device groups, as Firecracker names them; devices report
/// the ones they keep, the others are zero.
const BLOCK_KEYS: &[&str] = &[
    "activate_fails",
    "cfg_fails",
    "no_avail_buffer",
    "event_fails",
    "execute_fails",
    "invalid_reqs_count",
    "flush_count",
    "queue_event_count",
    "rate_limiter_event_count",
    "update_count",
    "update_fails",
    "read_bytes",
    "write_bytes",
    "read_count",
    "write_count",
    "rate_limiter_throttled_events",
];
const NET_KEYS: &[&str] = &[
    "activate_fails",
    "cfg_fails",
    "no_rx_avail_buffer",
    "no_tx_avail_buffer",
    "event_fails",
    "rx_queue_event_count",
    "rx_tap_event_count",
    "rx_bytes_count",
    "rx_packets_count",
    "rx_fails",
    "rx_count",
    "tap_read_fails",
    "tap_write_fails",
    "tx_bytes_count",
    "tx_malformed_frames",
    "tx_fails",
    "tx_count",
    "tx_packets_count",
    "tx_queue_event_count",
    "tx_spoofed_mac_count",
    "rx_rate_limiter_throttled",
    "tx_rate_limiter_throttled",
    "rx_event_rate_limiter_count",
    "tx_rate_limiter_event_count",
];
/// Firecracker's vsock metrics (one group: a VM has at most one vsock).
const VSOCK_KEYS: &[&str] = &[
    "activate_fails",
    "cfg_fails",
    "rx_queue_event_fails",
    "tx_queue_event_fails",
    "ev_queue_event_fails",
    "muxer_event_fails",
    "conn_event_fails",
    "rx_queue_event_count",
    "tx_queue_event_count",
    "rx_bytes_count",
    "tx_bytes_count",
    "rx_packets_count",
    "tx_packets_count",
    "conns_added",
    "conns_killed",
    "conns_removed",
    "killq_resync",
    "tx_flush_fails",
    "tx_write_fails",
    "rx_read_fails",
];
/// Device groups of Firecracker's that this VMM has no device for: present, empty.
const ABSENT_DEVICE_GROUPS: &[&str] = &["rtc", "vhost_user_block"];
/// Firecracker's balloon metrics.
const BALLOON_KEYS: &[&str] = &[
    "activate_fails",
    "inflate_count",
    "stats_updates_count",
    "stats_update_fails",
    "deflate_count",
    "event_fails",
];
/// Firecracker's entropy metrics (one group: a VM has at most one).
const ENTROPY_KEYS: &[&str] = &[
    "activate_fails",
    "entropy_event_fails",
    "entropy_event_count",
    "entropy_bytes",
    "host_rng_fails",
    "entropy_rate_limiter_throttled",
    "rate_limiter_event_count",
];

/// Where metrics go, and the device counters already reported.
pub struct MetricsSink {
    path: String,
    file: File,
    flushed: HashMap<(String, &'static str), u64>,
}

impl Drop for MetricsSink {
    fn drop(&mut self) {
        // The descriptor closes: the fault handler must not write to
        // whatever reuses its number.
        crate::seccomp::forget_metrics_fd(std::os::fd::AsRawFd::as_raw_fd(&self.file));
    }
}

impl MetricsSink {
    /// Opens `path` (a file, created if missing, or a named pipe) for appending.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = crate::logger::open_sink(path).map_err(|err| Error::Open {
            path: path.display().to_string(),
            err,
        })?;
        // The seccomp fault handler's last metrics line goes there too.
        crate::seccomp::set_metrics_fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        Ok(MetricsSink {
            path: path.display().to_string(),
            file,
            flushed: HashMap::new(),
        })
    }

    /// The path metrics go to.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Writes one line: every group, counters since the previous line. A
    /// line that cannot be written is dropped whole, and its increases are
    /// reported in the next line instead.
    pub fn flush(&mut self, devices: Option<&DeviceManager>) -> Result<(), Error> {
        let mut seen = Vec::new();
        let mut device_totals = Vec::new();
        let line = self.line(devices, &mut seen, &mut device_totals);
        let mut text = line.to_string();
        text.push('\n');
        crate::logger::write_line(&mut self.file, text.as_bytes()).map_err(|e| {
            METRICS.logger.missed_metrics_count.inc();
            METRICS.logger.metrics_fails.inc();
            Error::Write(e)
        })?;
        for (counter, total) in seen {
            counter.flushed.store(total, Ordering::Relaxed);
        }
        self.flushed.extend(device_totals);
        Ok(())
    }

    fn line(
        &self,
        devices: Option<&DeviceManager>,
        seen: &mut Vec<(&'static Counter, u64)>,
        device_totals: &mut Vec<((String, &'static str), u64)>,
    ) -> Value {
        let m: &'static Metrics = &METRICS;
        let mut o = Map::new();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        o.insert("utc_timestamp_ms".into(), now_ms.into());
        o.insert("api_server".into(), m.api_server.json(seen));
        o.insert("get_api_requests".into(), m.get_api_requests.json(seen));
        o.insert("put_api_requests".into(), m.put_api_requests.json(seen));
        o.insert("patch_api_requests".into(), m.patch_api_requests.json(seen));
        o.insert("deprecated_api".into(), m.deprecated_api.json(seen));
        o.insert("logger".into(), m.logger.json(seen));
        o.insert("latencies_us".into(), m.latencies_us.json(seen));
        if let Some(store) = MMDS_SOURCE.get() {
            let c = store.lock().unwrap_or_else(|e| e.into_inner()).counters;
            let g = &m.mmds;
            for (counter, total) in [
                (&g.rx_accepted, c.rx_accepted),
                (&g.rx_accepted_err, c.rx_accepted_err),
                (&g.rx_accepted_unusual, c.rx_accepted_unusual),
                (&g.rx_count, c.rx_count),
                (&g.rx_invalid_token, c.rx_invalid_token),
                (&g.rx_no_token, c.rx_no_token),
                (&g.tx_bytes, c.tx_bytes),
                (&g.tx_count, c.tx_count),
                (&g.tx_errors, c.tx_errors),
                (&g.tx_frames, c.tx_frames),
                (&g.connections_created, c.connections_created),
                (&g.connections_destroyed, c.connections_destroyed),
            ] {
                counter.set_total(total);
            }
        }
        o.insert("mmds".into(), m.mmds.json(seen));
        o.insert("seccomp".into(), m.seccomp.json(seen));
        o.insert("signals".into(), m.signals.json(seen));
        o.insert("vcpu".into(), m.vcpu.json(seen));
        o.insert("vmm".into(), m.vmm.json(seen));
        o.insert("uart".into(), m.uart.json(seen));
        o.insert("i8042".into(), m.i8042.json(seen));
        for g in ABSENT_DEVICE_GROUPS {
            o.insert((*g).into(), Value::Object(Map::new()));
        }
        // Per device (`block_<drive_id>`, ...) and summed; vsock only summed,
        // as Firecracker reports it.
        for (kind, group, keys, per_device) in [
            (VirtioKind::Block, "block", BLOCK_KEYS, true),
            (VirtioKind::Net, "net", NET_KEYS, true),
            (VirtioKind::Vsock, "vsock", VSOCK_KEYS, false),
            (VirtioKind::Entropy, "entropy", ENTROPY_KEYS, false),
            (VirtioKind::Balloon, "balloon", BALLOON_KEYS, false),
        ] {
            let mut sum: Vec<u64> = vec![0; keys.len()];
            for entry in devices.iter().flat_map(|d| &d.virtio) {
                if entry.kind != kind {
                    continue;
                }
                let totals = entry
                    .transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .with_device(|d| d.metrics());
                let name = format!("{group}_{}", entry.id);
                let mut obj = Map::new();
                for (i, key) in keys.iter().enumerate() {
                    let total = totals.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v);
                    let last = self
                        .flushed
                        .get(&(name.clone(), *key))
                        .copied()
                        .unwrap_or(0);
                    device_totals.push(((name.clone(), *key), total));
                    let delta = total.wrapping_sub(last);
                    sum[i] += delta;
                    obj.insert((*key).into(), delta.into());
                }
                if per_device {
                    o.insert(name, Value::Object(obj));
                }
            }
            let agg: Map<String, Value> = keys
                .iter()
                .zip(sum)
                .map(|(k, v)| ((*k).to_string(), Value::from(v)))
                .collect();
            o.insert(group.into(), Value::Object(agg));
        }
        Value::Object(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_report_the_increase_since_the_last_written_line() {
        let c = Counter::new();
        c.add(5);
        let mut seen = Vec::new();
        assert_eq!(c.delta(&mut seen), 5);
        // Not written yet: still 5.
        assert_eq!(c.delta(&mut seen), 5);
        for (counter, total) in seen.drain(..) {
            counter.flushed.store(total, Ordering::Relaxed);
        }
        assert_eq!(c.delta(&mut seen), 0);
        c.inc();
        assert_eq!((c.delta(&mut seen), c.total()), (1, 6));
    }

    /// Flushing consumes the global counters' increases: one test at a time.
    static FLUSHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_line_that_cannot_be_written_loses_no_count() {
        let _one = FLUSHES.lock().unwrap_or_else(|e| e.into_inner());
        let c = &METRICS.deprecated_api.deprecated_cmd_line_api_calls;
        c.add(3);
        let mut full = MetricsSink::open(Path::new("/dev/full")).unwrap();
        assert!(full.flush(None).is_err());
        let path = std::env::temp_dir().join(format!("vmm-metrics-lost-{}", std::process::id()));
        let mut sink = MetricsSink::open(&path).unwrap();
        sink.flush(None).unwrap();
        sink.flush(None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0]["deprecated_api"]["deprecated_cmd_line_api_calls"],
            3
        );
        assert_eq!(
            lines[1]["deprecated_api"]["deprecated_cmd_line_api_calls"],
            0
        );
    }

    #[test]
    fn a_line_has_every_group_even_without_devices() {
        let _one = FLUSHES.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("vmm-metrics-{}", std::process::id()));
        let mut sink = MetricsSink::open(&dir).unwrap();
        METRICS.put_api_requests.drive_count.inc();
        sink.flush(None).unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let v: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for g in [
            "api_server",
            "block",
            "net",
            "vcpu",
            "vmm",
            "uart",
            "i8042",
            "signals",
            "latencies_us",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "balloon",
            "vsock",
        ] {
            assert!(v.get(g).is_some_and(Value::is_object), "{g} missing: {v}");
        }
        assert!(v["put_api_requests"]["drive_count"].as_u64().unwrap() >= 1);
        assert_eq!(v["block"]["read_count"], 0);
    }
}
