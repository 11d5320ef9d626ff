//! Metrics in Firecracker 1.16's shape: one JSON object per line, written to
//! the metrics path (`--metrics-path` or PUT /metrics) when the instance
//! starts, then every 60 s, on `FlushMetrics` and at exit.
//!
//! The line has exactly the groups and fields of Firecracker 1.16 (x86_64),
//! in its order, and nothing else, because Firecracker's integration suite
//! validates it strictly (tests/common/fc_metrics_schema.rs has the schema
//! as data, and the tests hold the line to it). Fields for things this VMM
//! does not have (memory hotplug, MSI-X, latency aggregates it does not
//! measure, ...) are there and zero. Counters report what happened since the
//! previous line (as Firecracker's do); stored values report their current
//! value. Per-device groups (`block_<drive_id>`, `net_<iface_id>`,
//! `pmem_<id>`) come from each device's own counters, just before their
//! aggregate (`block`, `net`, `pmem`),
//! which is their sum; the vsock, entropy and balloon devices are reported in
//! one group each, as Firecracker reports them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::device_manager::{DeviceManager, VirtioKind};

/// How often a line is written once the instance started (Firecracker's
/// `WRITE_METRICS_PERIOD_MS`).
pub const PERIOD: Duration = Duration::from_secs(60);

/// Errors of the metrics system.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics path cannot be opened.
    #[error("Cannot open the metrics path '{path}': {err}; give a writable file or named pipe.")]
    Open { path: String, err: std::io::Error },
    /// Metrics were configured twice (Firecracker's message, which clients
    /// match).
    #[error("Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.")]
    AlreadyConfigured(String),
    /// A flush without a metrics path.
    #[error("Metrics are not configured; configure a metrics path first (PUT /metrics or --metrics-path).")]
    NotConfigured,
    /// The line cannot be written.
    #[error("Cannot write metrics: {0}.")]
    Write(std::io::Error),
}

/// The counters whose increases a line reports, with the totals it reported
/// them from: they count as reported once the line is written.
type Seen<'a> = Vec<(&'a Counter, u64)>;

/// A count of events; each line reports the increase since the previous one
/// (Firecracker's `SharedIncMetric`).
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
    fn delta<'a>(&'a self, seen: &mut Seen<'a>) -> u64 {
        let now = self.total();
        seen.push((self, now));
        now.wrapping_sub(self.flushed.load(Ordering::Relaxed))
    }
    fn node<'a>(&'a self, seen: &mut Seen<'a>) -> Node {
        Node::Num(self.delta(seen))
    }
    /// The increase since the last written line, left unreported.
    fn raw(&self, w: &mut RawLine) {
        w.num(
            self.total()
                .wrapping_sub(self.flushed.load(Ordering::Relaxed)),
        );
    }
}

/// A value reported as it is (Firecracker's `SharedStoreMetric`).
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
    fn node(&self, _seen: &mut Seen<'_>) -> Node {
        Node::Num(self.get())
    }
    fn raw(&self, w: &mut RawLine) {
        w.num(self.get());
    }
}

/// A latency aggregate (Firecracker's `LatencyAggregateMetrics`): the
/// smallest and the largest latency recorded (stored values, 0 before the
/// first) and the sum of the latencies since the previous line, in
/// microseconds.
#[derive(Default)]
pub struct Latency {
    min_us: Store,
    max_us: Store,
    sum_us: Counter,
}

impl Latency {
    /// Nothing recorded.
    pub const fn new() -> Self {
        Latency {
            min_us: Store::new(),
            max_us: Store::new(),
            sum_us: Counter::new(),
        }
    }
    /// Records one latency of `us` microseconds.
    pub fn record(&self, us: u64) {
        self.sum_us.add(us);
        let _ = self
            .min_us
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                (m == 0 || us < m).then_some(us)
            });
        self.max_us.0.fetch_max(us, Ordering::Relaxed);
    }
    fn node<'a>(&'a self, seen: &mut Seen<'a>) -> Node {
        latency_node(
            self.min_us.get(),
            self.max_us.get(),
            self.sum_us.delta(seen),
        )
    }
    fn raw(&self, w: &mut RawLine) {
        w.open();
        w.key("min_us");
        self.min_us.raw(w);
        w.key("max_us");
        self.max_us.raw(w);
        w.key("sum_us");
        self.sum_us.raw(w);
        w.close();
    }
}

fn latency_node(min_us: u64, max_us: u64, sum_us: u64) -> Node {
    Node::Obj(vec![
        ("min_us".into(), Node::Num(min_us)),
        ("max_us".into(), Node::Num(max_us)),
        ("sum_us".into(), Node::Num(sum_us)),
    ])
}

/// A value of the line: a number, or an object whose keys keep their order
/// (Firecracker's order).
#[derive(Debug, PartialEq)]
enum Node {
    Num(u64),
    Obj(Vec<(Cow<'static, str>, Node)>),
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Num(n) => s.serialize_u64(*n),
            Node::Obj(fields) => {
                let mut m = s.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    m.serialize_entry(k.as_ref(), v)?;
                }
                m.end()
            }
        }
    }
}

/// A group of the process's metrics: its object in a line, and the same
/// written without allocating (for [`write_last_line`]).
trait Group: Sync {
    fn node<'a>(&'a self, seen: &mut Seen<'a>) -> Node;
    fn raw(&self, w: &mut RawLine);
}

/// Declares a metrics group: a struct of counters, stores and latency
/// aggregates, in Firecracker's field order, and how it becomes an object.
macro_rules! group {
    ($name:ident { $($key:ident: $kind:ident),* $(,)? }) => {
        /// A metrics group (Firecracker's fields, in its order).
        #[derive(Default)]
        #[allow(missing_docs)]
        pub struct $name { $(pub $key: $kind,)* }
        impl $name {
            const fn new() -> Self { $name { $($key: $kind::new(),)* } }
        }
        impl Group for $name {
            fn node<'a>(&'a self, seen: &mut Seen<'a>) -> Node {
                Node::Obj(vec![$((Cow::Borrowed(stringify!($key)), self.$key.node(seen)),)*])
            }
            fn raw(&self, w: &mut RawLine) {
                w.open();
                $(w.key(stringify!($key)); self.$key.raw(w);)*
                w.close();
            }
        }
    };
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
    hotplug_memory_count: Counter,
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
    pmem_count: Counter,
    pmem_fails: Counter,
    serial_count: Counter,
    serial_fails: Counter,
    hotplug_memory_count: Counter,
    hotplug_memory_fails: Counter,
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
    hotplug_memory_count: Counter,
    hotplug_memory_fails: Counter,
    pmem_count: Counter,
    pmem_fails: Counter,
});
group!(DeprecatedApiMetrics {
    deprecated_http_api_calls: Counter,
});
group!(LoggerSystemMetrics {
    missed_metrics_count: Counter,
    metrics_fails: Counter,
    missed_log_count: Counter,
    rate_limited_log_count: Counter,
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
    rx_invalid_token: Counter,
    rx_no_token: Counter,
    rx_count: Counter,
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
    kvmclock_ctrl_fails: Counter,
    exit_io_in_agg: Latency,
    exit_io_out_agg: Latency,
    exit_mmio_read_agg: Latency,
    exit_mmio_write_agg: Latency,
});
group!(VmmMetrics { panic_count: Store });
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
group!(InterruptMetrics {
    triggers: Counter,
    config_updates: Counter,
});

/// The process's metrics (the groups that are not per device).
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
    pub interrupts: InterruptMetrics,
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
    interrupts: InterruptMetrics::new(),
};

/// A field of a device group, as Firecracker names it.
#[derive(Clone, Copy)]
enum Key {
    /// A counter: the device reports its running total under this name.
    N(&'static str),
    /// A latency aggregate: the device reports `<name>.min_us`,
    /// `<name>.max_us` (current values) and `<name>.sum_us` (running total).
    Agg(&'static str),
}
use Key::{Agg, N};

/// Firecracker's block metrics, each `block_<drive_id>` and `block`.
const BLOCK_KEYS: &[Key] = &[
    N("activate_fails"),
    N("cfg_fails"),
    N("no_avail_buffer"),
    N("event_fails"),
    N("execute_fails"),
    N("invalid_reqs_count"),
    N("flush_count"),
    N("queue_event_count"),
    N("rate_limiter_event_count"),
    N("update_count"),
    N("update_fails"),
    N("read_bytes"),
    N("write_bytes"),
    N("read_count"),
    N("write_count"),
    Agg("read_agg"),
    Agg("write_agg"),
    N("rate_limiter_throttled_events"),
    N("io_engine_throttled_events"),
    N("remaining_reqs_count"),
];
/// Firecracker's network metrics, each `net_<iface_id>` and `net`.
const NET_KEYS: &[Key] = &[
    N("activate_fails"),
    N("cfg_fails"),
    N("mac_address_updates"),
    N("no_rx_avail_buffer"),
    N("no_tx_avail_buffer"),
    N("event_fails"),
    N("rx_queue_event_count"),
    N("rx_event_rate_limiter_count"),
    N("rx_rate_limiter_throttled"),
    N("rx_tap_event_count"),
    N("rx_bytes_count"),
    N("rx_packets_count"),
    N("rx_fails"),
    N("rx_count"),
    N("tap_read_fails"),
    N("tap_write_fails"),
    Agg("tap_write_agg"),
    N("tx_bytes_count"),
    N("tx_malformed_frames"),
    N("tx_fails"),
    N("tx_count"),
    N("tx_packets_count"),
    N("tx_queue_event_count"),
    N("tx_rate_limiter_event_count"),
    N("tx_rate_limiter_throttled"),
    N("tx_spoofed_mac_count"),
    N("tx_remaining_reqs_count"),
];
/// Firecracker's vsock metrics (one group: a VM has at most one vsock).
const VSOCK_KEYS: &[Key] = &[
    N("activate_fails"),
    N("cfg_fails"),
    N("rx_queue_event_fails"),
    N("tx_queue_event_fails"),
    N("ev_queue_event_fails"),
    N("muxer_event_fails"),
    N("conn_event_fails"),
    N("rx_queue_event_count"),
    N("tx_queue_event_count"),
    N("rx_bytes_count"),
    N("tx_bytes_count"),
    N("rx_packets_count"),
    N("tx_packets_count"),
    N("conns_added"),
    N("conns_killed"),
    N("conns_removed"),
    N("killq_resync"),
    N("tx_flush_fails"),
    N("tx_write_fails"),
    N("rx_read_fails"),
];
/// Firecracker's balloon metrics (one group).
const BALLOON_KEYS: &[Key] = &[
    N("activate_fails"),
    N("inflate_count"),
    N("stats_updates_count"),
    N("stats_update_fails"),
    N("deflate_count"),
    N("event_fails"),
    N("free_page_report_count"),
    N("free_page_report_freed"),
    N("free_page_report_fails"),
    N("free_page_hint_count"),
    N("free_page_hint_freed"),
    N("free_page_hint_fails"),
];
/// Firecracker's entropy metrics (one group: a VM has at most one).
const ENTROPY_KEYS: &[Key] = &[
    N("activate_fails"),
    N("entropy_event_fails"),
    N("entropy_event_count"),
    N("entropy_bytes"),
    N("host_rng_fails"),
    N("entropy_rate_limiter_throttled"),
    N("rate_limiter_event_count"),
];
/// Firecracker's pmem metrics (`pmem_<id>` per device, then their sum).
const PMEM_KEYS: &[Key] = &[
    N("activate_fails"),
    N("cfg_fails"),
    N("event_fails"),
    N("queue_event_count"),
    N("rate_limiter_throttled_events"),
    N("rate_limiter_event_count"),
];
/// Firecracker's memory hotplug metrics (this VMM has no virtio-mem: all
/// zero).
const MEMORY_HOTPLUG_KEYS: &[Key] = &[
    N("activate_fails"),
    N("queue_event_fails"),
    N("queue_event_count"),
    Agg("plug_agg"),
    N("plug_count"),
    N("plug_bytes"),
    N("plug_fails"),
    Agg("unplug_agg"),
    N("unplug_count"),
    N("unplug_bytes"),
    N("unplug_fails"),
    N("unplug_discard_fails"),
    Agg("unplug_all_agg"),
    N("unplug_all_count"),
    N("unplug_all_fails"),
    Agg("state_agg"),
    N("state_count"),
    N("state_fails"),
];

/// One device's running totals under Firecracker's names, read from the
/// device when a line is made.
pub struct DeviceTotals {
    /// What the device is.
    pub kind: VirtioKind,
    /// Its ID in the configuration (`drive_id`, `iface_id`).
    pub id: String,
    /// Its totals (`VirtioDevice::metrics`).
    pub totals: Vec<(&'static str, u64)>,
}

impl DeviceTotals {
    /// The totals of every virtio device of `devices`.
    pub fn of(devices: Option<&DeviceManager>) -> Vec<DeviceTotals> {
        devices
            .iter()
            .flat_map(|d| &d.virtio)
            .map(|entry| DeviceTotals {
                kind: entry.kind,
                id: entry.id.clone(),
                totals: entry
                    .transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .core()
                    .with_device(|d| d.metrics()),
            })
            .collect()
    }

    fn get(&self, key: &str) -> u64 {
        self.totals
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(0, |(_, v)| *v)
    }
}

/// One part of a line, in Firecracker's order.
enum Part {
    /// `utc_timestamp_ms`.
    Timestamp,
    /// A group of the process's metrics.
    Global(&'static str, &'static dyn Group),
    /// The groups of the devices of `kind` (None: a kind this VMM does not
    /// have, all zero): `<group>_<id>` for each when `per_device`, then
    /// `<group>`, their sum.
    Devices {
        kind: Option<VirtioKind>,
        group: &'static str,
        keys: &'static [Key],
        per_device: bool,
    },
}

/// A line's parts in Firecracker 1.16's order.
fn layout(m: &'static Metrics) -> [Part; 23] {
    let devices = |kind, group, keys, per_device| Part::Devices {
        kind,
        group,
        keys,
        per_device,
    };
    [
        Part::Timestamp,
        Part::Global("api_server", &m.api_server),
        devices(Some(VirtioKind::Balloon), "balloon", BALLOON_KEYS, false),
        devices(Some(VirtioKind::Block), "block", BLOCK_KEYS, true),
        Part::Global("deprecated_api", &m.deprecated_api),
        Part::Global("get_api_requests", &m.get_api_requests),
        Part::Global("i8042", &m.i8042),
        Part::Global("uart", &m.uart),
        Part::Global("latencies_us", &m.latencies_us),
        Part::Global("logger", &m.logger),
        Part::Global("mmds", &m.mmds),
        devices(Some(VirtioKind::Net), "net", NET_KEYS, true),
        Part::Global("patch_api_requests", &m.patch_api_requests),
        Part::Global("put_api_requests", &m.put_api_requests),
        Part::Global("seccomp", &m.seccomp),
        Part::Global("vcpu", &m.vcpu),
        Part::Global("vmm", &m.vmm),
        Part::Global("signals", &m.signals),
        devices(Some(VirtioKind::Vsock), "vsock", VSOCK_KEYS, false),
        devices(Some(VirtioKind::Entropy), "entropy", ENTROPY_KEYS, false),
        devices(Some(VirtioKind::Pmem), "pmem", PMEM_KEYS, true),
        Part::Global("interrupts", &m.interrupts),
        devices(None, "memory_hotplug", MEMORY_HOTPLUG_KEYS, false),
    ]
}

/// Wall-clock milliseconds since the epoch (no allocation).
fn utc_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Brings the counters whose totals are kept elsewhere (the metadata
/// store's, the interrupt count) up to date.
fn take_totals_kept_elsewhere() {
    let m = &METRICS;
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
    m.interrupts
        .triggers
        .set_total(devices::virtio::interrupt_triggers());
}

/// A line written without allocating or locking, into a fixed buffer.
struct RawLine {
    buf: &'static mut [u8],
    len: usize,
    /// A value came last: the next key needs a comma.
    comma: bool,
    /// Something did not fit: the line is not written.
    overflow: bool,
}

impl RawLine {
    fn push(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflow = true,
        }
    }
    fn open(&mut self) {
        self.push(b"{");
        self.comma = false;
    }
    fn close(&mut self) {
        self.push(b"}");
        self.comma = true;
    }
    /// A key already in JSON (quoted and escaped).
    fn json_key(&mut self, quoted: &str) {
        if self.comma {
            self.push(b",");
        }
        self.push(quoted.as_bytes());
        self.push(b":");
        self.comma = false;
    }
    /// A key of Firecracker's (plain ASCII, nothing to escape).
    fn key(&mut self, key: &str) {
        if self.comma {
            self.push(b",");
        }
        self.push(b"\"");
        self.push(key.as_bytes());
        self.push(b"\":");
        self.comma = false;
    }
    fn num(&mut self, v: u64) {
        let mut digits = [0u8; 20];
        self.push(crate::seccomp::decimal(v, &mut digits));
        self.comma = true;
    }
    /// Zeros for `keys` (latency aggregates included).
    fn zeros(&mut self, keys: &[Key]) {
        self.open();
        for key in keys {
            match *key {
                N(k) => {
                    self.key(k);
                    self.num(0);
                }
                Agg(k) => {
                    self.key(k);
                    self.open();
                    for sub in ["min_us", "max_us", "sum_us"] {
                        self.key(sub);
                        self.num(0);
                    }
                    self.close();
                }
            }
        }
        self.close();
    }
}

/// The per-device groups' names of the started instance (`block_<id>`,
/// `net_<id>`), quoted and escaped for JSON, for [`write_last_line`].
static DEVICE_GROUPS: std::sync::OnceLock<Vec<(VirtioKind, String)>> = std::sync::OnceLock::new();

/// The buffer of [`write_last_line`], and whether it is in use.
struct LastLineBuffer {
    busy: std::sync::atomic::AtomicBool,
    buf: std::cell::UnsafeCell<[u8; LAST_LINE_CAP]>,
}

/// Room for the last line: the groups of Firecracker 1.16 take about 6 KB,
/// each drive or interface under 1 KB more.
const LAST_LINE_CAP: usize = 128 * 1024;

// SAFETY: `buf` is only reached through `busy`: whoever sets it from false to
// true has the buffer alone until it sets it back.
unsafe impl Sync for LastLineBuffer {}

static LAST_LINE: LastLineBuffer = LastLineBuffer {
    busy: std::sync::atomic::AtomicBool::new(false),
    buf: std::cell::UnsafeCell::new([0; LAST_LINE_CAP]),
};

/// Renders a whole line of Firecracker 1.16's schema without allocating or
/// locking, and hands it to `out`: the process's counters as they are (what
/// they gained since the last line, not marked as reported), the devices'
/// groups at 0 (their counters are behind locks) and the metadata store's
/// as of the last line. False if another call has the buffer, or the line
/// does not fit.
fn render_last_line(out: impl FnOnce(&[u8])) -> bool {
    if LAST_LINE.busy.swap(true, Ordering::Acquire) {
        return false;
    }
    // SAFETY: `busy` was false and is now ours: nothing else uses the buffer
    // until it is released below.
    let buf: &'static mut [u8] = unsafe { &mut *LAST_LINE.buf.get() };
    let mut w = RawLine {
        buf,
        len: 0,
        comma: false,
        overflow: false,
    };
    METRICS
        .interrupts
        .triggers
        .set_total(devices::virtio::interrupt_triggers());
    let names = DEVICE_GROUPS.get().map_or(&[][..], Vec::as_slice);
    w.open();
    for part in layout(&METRICS) {
        match part {
            Part::Timestamp => {
                w.key("utc_timestamp_ms");
                w.num(utc_ms());
            }
            Part::Global(name, group) => {
                w.key(name);
                group.raw(&mut w);
            }
            Part::Devices {
                kind,
                group,
                keys,
                per_device,
            } => {
                if per_device {
                    for (_, name) in names.iter().filter(|(k, _)| Some(*k) == kind) {
                        w.json_key(name);
                        w.zeros(keys);
                    }
                }
                w.key(group);
                w.zeros(keys);
            }
        }
    }
    w.close();
    w.push(b"\n");
    let written = !w.overflow;
    if written {
        out(&w.buf[..w.len]);
    }
    LAST_LINE.busy.store(false, Ordering::Release);
    written
}

/// Writes a last metrics line to `fd` from a signal handler (a fatal signal,
/// a seccomp fault): a whole line of Firecracker 1.16's schema, as
/// Firecracker writes one there, where the regular line cannot be made (it
/// allocates and takes locks). Async-signal-safe: atomics, a static buffer,
/// clock_gettime and write(2) only. The devices' groups are 0.
pub fn write_last_line(fd: std::os::fd::RawFd) -> bool {
    render_last_line(|line| {
        let mut rest = line;
        while !rest.is_empty() {
            // SAFETY: `rest` is a valid slice for its length; write(2) only
            // reads it.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                break;
            }
            rest = &rest[n as usize..];
        }
    })
}

/// Where metrics go, the device totals already reported, and when the next
/// periodic line is due.
pub struct MetricsSink {
    path: String,
    file: File,
    /// (group, field) of a device counter → the total last reported.
    flushed: HashMap<(String, String), u64>,
    /// None until the instance started: no periodic line before.
    next_due: Option<Instant>,
}

impl Drop for MetricsSink {
    fn drop(&mut self) {
        // The descriptor closes: the fault handler must not write to
        // whatever reuses its number.
        crate::seccomp::forget_metrics_fd(std::os::fd::AsRawFd::as_raw_fd(&self.file));
    }
}

/// A line being made: its fields, the global counters it reports and the
/// device totals it reports (both marked as reported once it is written).
struct LineParts<'a> {
    fields: Vec<(Cow<'static, str>, Node)>,
    seen: Seen<'a>,
    device_totals: Vec<((String, String), u64)>,
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
            next_due: None,
        })
    }

    /// The path metrics go to.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The instance started (InstanceStart, a snapshot load, a boot from a
    /// configuration file): writes the first line now and arms the periodic
    /// ones, every [`PERIOD`] from now, as Firecracker does.
    pub fn start(&mut self, devices: Option<&DeviceManager>) -> Result<(), Error> {
        self.next_due = Some(Instant::now() + PERIOD);
        let devices = DeviceTotals::of(devices);
        remember_device_groups(&devices);
        self.write_line(&devices)
    }

    /// When the next periodic line is due (None before the instance started).
    pub fn next_due(&self) -> Option<Instant> {
        self.next_due
    }

    /// Writes the periodic line if it is due (never before [`start`]).
    /// True if a line was due.
    ///
    /// [`start`]: MetricsSink::start
    pub fn flush_if_due(&mut self, devices: Option<&DeviceManager>) -> Result<bool, Error> {
        match self.next_due {
            Some(due) if Instant::now() >= due => {
                self.next_due = Some(Instant::now() + PERIOD);
                self.flush(devices).map(|()| true)
            }
            _ => Ok(false),
        }
    }

    /// Writes one line: every group, counters since the previous line. A
    /// line that cannot be written is dropped whole, and its increases are
    /// reported in the next line instead.
    pub fn flush(&mut self, devices: Option<&DeviceManager>) -> Result<(), Error> {
        let devices = DeviceTotals::of(devices);
        self.write_line(&devices)
    }

    fn write_line(&mut self, devices: &[DeviceTotals]) -> Result<(), Error> {
        let parts = self.line(devices);
        let mut text = serde_json::to_string(&Node::Obj(parts.fields))
            .map_err(|e| Error::Write(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        text.push('\n');
        crate::logger::write_line(&mut self.file, text.as_bytes()).map_err(|e| {
            METRICS.logger.missed_metrics_count.inc();
            METRICS.logger.metrics_fails.inc();
            Error::Write(e)
        })?;
        for (counter, total) in parts.seen {
            counter.flushed.store(total, Ordering::Relaxed);
        }
        self.flushed.extend(parts.device_totals);
        Ok(())
    }

    /// The line's groups, in Firecracker's order.
    fn line(&self, devices: &[DeviceTotals]) -> LineParts<'static> {
        let mut p = LineParts {
            fields: Vec::new(),
            seen: Vec::new(),
            device_totals: Vec::new(),
        };
        take_totals_kept_elsewhere();
        for part in layout(&METRICS) {
            match part {
                Part::Timestamp => p
                    .fields
                    .push(("utc_timestamp_ms".into(), Node::Num(utc_ms()))),
                Part::Global(name, group) => {
                    let node = group.node(&mut p.seen);
                    p.fields.push((name.into(), node));
                }
                Part::Devices {
                    kind,
                    group,
                    keys,
                    per_device,
                } => self.devices(&mut p, devices, kind, group, keys, per_device),
            }
        }
        p
    }

    /// The increase of a device's running total since the line before (a
    /// total that went back, a device that started over, counts from 0).
    fn device_delta(&self, p: &mut LineParts<'_>, group: &str, key: String, total: u64) -> u64 {
        let id = (group.to_string(), key);
        let last = self.flushed.get(&id).copied().unwrap_or(0);
        p.device_totals.push((id, total));
        total.checked_sub(last).unwrap_or(total)
    }

    /// The groups of the devices of `kind` (None: a kind this VMM does not
    /// have): `<group>_<id>` for each device when `per_device`, then
    /// `<group>`, their sum (for a latency aggregate, the sum of `sum_us`,
    /// `min_us` and `max_us` 0, as Firecracker aggregates them).
    fn devices(
        &self,
        p: &mut LineParts<'_>,
        devices: &[DeviceTotals],
        kind: Option<VirtioKind>,
        group: &'static str,
        keys: &'static [Key],
        per_device: bool,
    ) {
        let mut sum = vec![0u64; keys.len()];
        for dev in devices.iter().filter(|d| Some(d.kind) == kind) {
            let name = format!("{group}_{}", dev.id);
            let mut obj = Vec::with_capacity(keys.len());
            for (i, key) in keys.iter().enumerate() {
                let node = match *key {
                    N(k) => {
                        let d = self.device_delta(p, &name, k.to_string(), dev.get(k));
                        sum[i] = sum[i].wrapping_add(d);
                        (Cow::Borrowed(k), Node::Num(d))
                    }
                    Agg(k) => {
                        let total = dev.get(&format!("{k}.sum_us"));
                        let d = self.device_delta(p, &name, format!("{k}.sum_us"), total);
                        sum[i] = sum[i].wrapping_add(d);
                        let min = dev.get(&format!("{k}.min_us"));
                        let max = dev.get(&format!("{k}.max_us"));
                        (Cow::Borrowed(k), latency_node(min, max, d))
                    }
                };
                obj.push(node);
            }
            if per_device {
                p.fields.push((name.into(), Node::Obj(obj)));
            }
        }
        let aggregate = keys
            .iter()
            .zip(sum)
            .map(|(key, v)| match *key {
                N(k) => (Cow::Borrowed(k), Node::Num(v)),
                Agg(k) => (Cow::Borrowed(k), latency_node(0, 0, v)),
            })
            .collect();
        p.fields.push((group.into(), Node::Obj(aggregate)));
    }
}

/// Keeps the per-device groups' names for [`write_last_line`] (the first
/// instance with drives or interfaces: one per process).
fn remember_device_groups(devices: &[DeviceTotals]) {
    if !devices
        .iter()
        .any(|d| matches!(d.kind, VirtioKind::Block | VirtioKind::Net))
    {
        return;
    }
    let _ = DEVICE_GROUPS.get_or_init(|| {
        devices
            .iter()
            .filter_map(|d| {
                let group = match d.kind {
                    VirtioKind::Block => "block",
                    VirtioKind::Net => "net",
                    _ => return None,
                };
                let name = serde_json::to_string(&format!("{group}_{}", d.id)).ok()?;
                Some((d.kind, name))
            })
            .collect()
    });
}

/// The instance started: `sink` (if metrics are configured) writes its
/// first line and arms its periodic ones (see [`MetricsSink::start`]). A
/// line that cannot be written is logged; its counts go in the next one.
pub fn instance_started(sink: Option<&mut MetricsSink>, devices: Option<&DeviceManager>) {
    if let Some(sink) = sink {
        if let Err(e) = sink.start(devices) {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
#[path = "../tests/common/fc_metrics_schema.rs"]
mod fc_metrics_schema;

#[cfg(test)]
mod tests {
    use super::fc_metrics_schema as schema;
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

    #[test]
    fn a_latency_aggregate_keeps_min_and_max_and_reports_the_sum_since_the_last_line() {
        let l = Latency::new();
        let mut seen = Vec::new();
        assert_eq!(l.node(&mut seen), latency_node(0, 0, 0));
        for us in [30, 10, 20] {
            l.record(us);
        }
        assert_eq!(l.node(&mut seen), latency_node(10, 30, 60));
        for (counter, total) in seen.drain(..) {
            counter.flushed.store(total, Ordering::Relaxed);
        }
        l.record(5);
        assert_eq!(l.node(&mut seen), latency_node(5, 30, 5));
    }

    /// Flushing consumes the global counters' increases: one test at a time.
    static FLUSHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A sink writing to a file of its own, and the lines written there.
    struct TestSink {
        sink: MetricsSink,
        path: std::path::PathBuf,
    }

    impl TestSink {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("vmm-metrics-{name}-{}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            TestSink {
                sink: MetricsSink::open(&path).unwrap(),
                path,
            }
        }
        fn lines(&self) -> Vec<String> {
            std::fs::read_to_string(&self.path)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    impl Drop for TestSink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn device(kind: VirtioKind, id: &str, totals: &[(&'static str, u64)]) -> DeviceTotals {
        DeviceTotals {
            kind,
            id: id.into(),
            totals: totals.to_vec(),
        }
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    #[test]
    fn a_line_that_cannot_be_written_loses_no_count() {
        let _one = FLUSHES.lock().unwrap_or_else(|e| e.into_inner());
        let c = &METRICS.deprecated_api.deprecated_http_api_calls;
        c.add(3);
        let mut full = MetricsSink::open(Path::new("/dev/full")).unwrap();
        assert!(full.flush(None).is_err());
        let mut t = TestSink::new("lost");
        t.sink.flush(None).unwrap();
        t.sink.flush(None).unwrap();
        let lines: Vec<_> = t
            .lines()
            .iter()
            .map(|l| schema::parse(l).unwrap())
            .collect();
        assert_eq!(
            lines[0].num("deprecated_api", "deprecated_http_api_calls"),
            Some(3)
        );
        assert_eq!(
            lines[1].num("deprecated_api", "deprecated_http_api_calls"),
            Some(0)
        );
    }

    #[test]
    fn a_line_without_devices_is_firecracker_1_16s_schema() {
        let _one = FLUSHES.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = TestSink::new("bare");
        METRICS.put_api_requests.drive_count.inc();
        t.sink.flush(None).unwrap();
        let lines = t.lines();
        assert_eq!(lines.len(), 1);
        let line = schema::parse(&lines[0]).unwrap();
        schema::validate(&line).unwrap_or_else(|e| panic!("{e}\n{}", lines[0]));
        let Some(schema::Tree::Num(ts)) = line.get("utc_timestamp_ms") else {
            panic!("no timestamp: {}", lines[0]);
        };
        assert!(now_ms().abs_diff(*ts) < 1000, "{ts}");
        assert!(line.num("put_api_requests", "drive_count") >= Some(1));
        assert_eq!(line.num("block", "read_count"), Some(0));
        for group in ["rtc", "vhost_user_block", "block_", "net_"] {
            assert!(
                !line.keys().iter().any(|k| k.starts_with(group)),
                "{group}: {}",
                lines[0]
            );
        }
    }

    #[test]
    fn a_line_with_devices_is_firecracker_1_16s_schema_and_aggregates_them() {
        let _one = FLUSHES.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = TestSink::new("devices");
        let mut devs = vec![
            device(
                VirtioKind::Block,
                "rootfs",
                &[
                    ("read_count", 10),
                    ("read_bytes", 4096),
                    ("read_agg.min_us", 3),
                    ("read_agg.max_us", 9),
                    ("read_agg.sum_us", 50),
                ],
            ),
            device(
                VirtioKind::Block,
                "scratch",
                &[("write_count", 2), ("read_count", 1)],
            ),
            device(VirtioKind::Net, "eth0", &[("tx_packets_count", 7)]),
            device(VirtioKind::Net, "eth1", &[("rx_packets_count", 4)]),
            device(VirtioKind::Vsock, "vsock", &[("conns_added", 1)]),
            device(VirtioKind::Entropy, "rng", &[("entropy_bytes", 64)]),
            device(VirtioKind::Balloon, "balloon", &[("inflate_count", 2)]),
        ];
        t.sink.write_line(&devs).unwrap();
        devs[0].totals[0].1 = 15;
        devs[0].totals[4].1 = 80;
        t.sink.write_line(&devs).unwrap();
        let lines = t.lines();
        let first = schema::parse(&lines[0]).unwrap();
        let second = schema::parse(&lines[1]).unwrap();
        for (line, text) in [(&first, &lines[0]), (&second, &lines[1])] {
            schema::validate(line).unwrap_or_else(|e| panic!("{e}\n{text}"));
            schema::check_aggregate(line, "block", 2).unwrap_or_else(|e| panic!("{e}\n{text}"));
            schema::check_aggregate(line, "net", 2).unwrap_or_else(|e| panic!("{e}\n{text}"));
        }
        // Counters since the line before; latency extremes as they are.
        assert_eq!(first.num("block_rootfs", "read_count"), Some(10));
        assert_eq!(first.num("block", "read_count"), Some(11));
        assert_eq!(second.num("block_rootfs", "read_count"), Some(5));
        assert_eq!(second.num("block", "read_count"), Some(5));
        let agg = |line: &schema::Tree, group: &str| -> Vec<Option<u64>> {
            ["min_us", "max_us", "sum_us"]
                .iter()
                .map(|k| match line.get(group)?.get("read_agg")?.get(k)? {
                    schema::Tree::Num(n) => Some(*n),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(agg(&first, "block_rootfs"), [Some(3), Some(9), Some(50)]);
        assert_eq!(agg(&first, "block"), [Some(0), Some(0), Some(50)]);
        assert_eq!(agg(&second, "block_rootfs"), [Some(3), Some(9), Some(30)]);
        // One group each for the vsock, entropy and balloon devices.
        assert_eq!(first.num("vsock", "conns_added"), Some(1));
        assert_eq!(first.num("entropy", "entropy_bytes"), Some(64));
        assert_eq!(first.num("balloon", "inflate_count"), Some(2));
        for prefix in ["vsock_", "entropy_", "balloon_"] {
            assert!(!first.keys().iter().any(|k| k.starts_with(prefix)));
        }
    }

    #[test]
    fn device_ids_are_escaped_in_group_names() {
        let _one = FLUSHES.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = TestSink::new("escape");
        let devs = [device(VirtioKind::Block, "a\"b\\c", &[("read_count", 1)])];
        t.sink.write_line(&devs).unwrap();
        let line = schema::parse(&t.lines()[0]).unwrap();
        assert_eq!(line.num("block_a\"b\\c", "read_count"), Some(1));
    }

    #[test]
    fn the_first_line_comes_at_the_start_and_the_periodic_ones_a_period_later() {
        let _one = FLUSHES.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = TestSink::new("periodic");
        // Before the start: nothing is due.
        assert!(!t.sink.flush_if_due(None).unwrap());
        assert_eq!(t.sink.next_due(), None);
        let before = Instant::now();
        instance_started(Some(&mut t.sink), None);
        assert_eq!(t.lines().len(), 1);
        let due = t.sink.next_due().unwrap();
        assert!(due >= before + PERIOD && due <= Instant::now() + PERIOD);
        assert!(!t.sink.flush_if_due(None).unwrap());
        t.sink.next_due = Some(Instant::now());
        assert!(t.sink.flush_if_due(None).unwrap());
        assert_eq!(t.lines().len(), 2);
        assert!(t.sink.next_due().unwrap() > Instant::now() + PERIOD - Duration::from_secs(5));
        // Without metrics, nothing happens.
        instance_started(None, None);
    }

    /// A line Firecracker 1.16.1 wrote at InstanceStart (one drive `data`,
    /// one interface `eth0`, vsock, entropy and balloon devices).
    const FIRECRACKER_LINE: &str =
        include_str!("../tests/common/firecracker-1.16.1-metrics-line.json");

    #[test]
    fn the_schema_accepts_firecrackers_own_line_and_nothing_else() {
        let fc = schema::parse(FIRECRACKER_LINE.trim_end()).unwrap();
        schema::validate(&fc).unwrap();
        schema::check_aggregate(&fc, "block", 1).unwrap();
        schema::check_aggregate(&fc, "net", 1).unwrap();
        // Each change of Firecracker's line is refused (by the suite's
        // checks alone: serde_json sorts the keys, which only the order
        // check minds).
        let mut v: serde_json::Value = serde_json::from_str(FIRECRACKER_LINE).unwrap();
        let mut vmm = v["vmm"].clone();
        vmm["device_events"] = 0.into();
        let mut logger = v["logger"].clone();
        logger
            .as_object_mut()
            .unwrap()
            .remove("rate_limited_log_count");
        let mut block = v["block_data"].clone();
        block["read_agg"] = serde_json::json!({"min_us": 0, "sum_us": 0});
        let broken = [
            (
                "an extra group",
                "rtc",
                serde_json::json!({"error_count": 0}),
            ),
            ("an extra field", "vmm", vmm),
            ("a missing field", "logger", logger),
            ("a short aggregate", "block_data", block),
            ("a float", "seccomp", serde_json::json!({"num_faults": 0.5})),
            (
                "a negative number",
                "seccomp",
                serde_json::json!({"num_faults": -1}),
            ),
            ("a string", "utc_timestamp_ms", serde_json::json!("now")),
            (
                "an empty device group",
                "vhost_user_block",
                serde_json::json!({}),
            ),
        ];
        let sorted = schema::parse(&v.to_string()).unwrap();
        schema::check_schema(&sorted).unwrap();
        for (what, key, value) in broken {
            let mut line = v.clone();
            line[key] = value;
            let text = line.to_string();
            let parsed = schema::parse(&text).unwrap();
            assert!(
                schema::check_schema(&parsed).is_err(),
                "{what} passed: {text}"
            );
        }
        // Firecracker's order is checked too: the same line, keys sorted.
        v["utc_timestamp_ms"] = 1.into();
        let sorted = schema::parse(&v.to_string()).unwrap();
        let e = schema::validate(&sorted).unwrap_err();
        assert!(e.contains("order"), "{e}");
    }

    #[test]
    fn the_last_line_from_a_signal_handler_is_a_whole_line_and_reports_nothing_away() {
        let _one = FLUSHES.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = TestSink::new("last");
        remember_device_groups(&[
            device(VirtioKind::Block, "rootfs", &[]),
            device(VirtioKind::Block, "odd\"id", &[]),
            device(VirtioKind::Net, "eth0", &[]),
            device(VirtioKind::Entropy, "rng", &[]),
        ]);
        t.sink.flush(None).unwrap();
        METRICS.signals.sigpipe.inc();
        METRICS.vcpu.exit_io_in_agg.record(7);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&t.path)
            .unwrap();
        assert!(write_last_line(std::os::fd::AsRawFd::as_raw_fd(&file)));
        t.sink.flush(None).unwrap();
        let lines = t.lines();
        assert_eq!(lines.len(), 3);
        let last = schema::parse(&lines[1]).unwrap();
        schema::validate(&last).unwrap_or_else(|e| panic!("{e}\n{}", lines[1]));
        schema::check_aggregate(&last, "block", 2).unwrap();
        schema::check_aggregate(&last, "net", 1).unwrap();
        assert!(last.get("block_odd\"id").is_some(), "{}", lines[1]);
        assert_eq!(last.num("signals", "sigpipe"), Some(1));
        let agg = last.get("vcpu").and_then(|v| v.get("exit_io_in_agg"));
        assert!(
            matches!(
                agg.and_then(|a| a.get("sum_us")),
                Some(schema::Tree::Num(7))
            ),
            "{}",
            lines[1]
        );
        // Not marked as reported: the next regular line has them again.
        let next = schema::parse(&lines[2]).unwrap();
        assert_eq!(next.num("signals", "sigpipe"), Some(1));
        // One call at a time: a busy buffer writes nothing.
        LAST_LINE.busy.store(true, Ordering::SeqCst);
        assert!(!render_last_line(|_| panic!("written while busy")));
        LAST_LINE.busy.store(false, Ordering::SeqCst);
    }

    #[test]
    fn reinitialization_is_refused_with_firecrackers_message() {
        // Firecracker's suite matches "Reinitialization of metrics not allowed."
        let e = Error::AlreadyConfigured("/x".into()).to_string();
        assert!(
            e.contains("Reinitialization of metrics not allowed."),
            "{e}"
        );
    }
}
