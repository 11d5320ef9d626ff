//! Firecracker 1.16's metrics line, written down as data: every group and
//! field that its integration suite requires (`validate_fc_metrics` in
//! tests/host_tools/fcmetrics.py of Firecracker v1.16.1, x86_64), in the
//! order Firecracker 1.16.1 writes them, and the same checks: every group
//! and field present, nothing else, every value a non-negative integer and
//! every latency aggregate an object of exactly `min_us`, `max_us` and
//! `sum_us`; keys starting with `block_`, `net_` or `vhost_user_` are
//! per-device groups with that group's fields (and `pmem_`, which
//! Firecracker writes for each pmem device though its suite's schema does
//! not list them). On top of the suite's checks,
//! the order is Firecracker's (per-device groups just before their
//! aggregate), and `check_aggregate` is `FcDeviceMetrics`'s: an aggregate
//! group is the sum of its per-device groups.
//!
//! Shared by the unit tests of src/metrics.rs and the integration tests
//! (`#[path]`), so both hold the line to the same schema.
#![allow(dead_code)]

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

/// A field of a group.
#[derive(Clone, Copy, Debug)]
pub enum Field {
    /// A number (a counter or a stored value).
    Num(&'static str),
    /// A latency aggregate: an object of [`LATENCY_AGG`].
    Agg(&'static str),
}
use Field::{Agg, Num};

/// The fields of a latency aggregate (`LatencyAggregateMetrics`).
pub const LATENCY_AGG: &[&str] = &["min_us", "max_us", "sum_us"];

/// `block` and each `block_<drive_id>`.
pub const BLOCK: &[Field] = &[
    Num("activate_fails"),
    Num("cfg_fails"),
    Num("no_avail_buffer"),
    Num("event_fails"),
    Num("execute_fails"),
    Num("invalid_reqs_count"),
    Num("flush_count"),
    Num("queue_event_count"),
    Num("rate_limiter_event_count"),
    Num("update_count"),
    Num("update_fails"),
    Num("read_bytes"),
    Num("write_bytes"),
    Num("read_count"),
    Num("write_count"),
    Agg("read_agg"),
    Agg("write_agg"),
    Num("rate_limiter_throttled_events"),
    Num("io_engine_throttled_events"),
    Num("remaining_reqs_count"),
];

/// `net` and each `net_<iface_id>`.
pub const NET: &[Field] = &[
    Num("activate_fails"),
    Num("cfg_fails"),
    Num("mac_address_updates"),
    Num("no_rx_avail_buffer"),
    Num("no_tx_avail_buffer"),
    Num("event_fails"),
    Num("rx_queue_event_count"),
    Num("rx_event_rate_limiter_count"),
    Num("rx_rate_limiter_throttled"),
    Num("rx_tap_event_count"),
    Num("rx_bytes_count"),
    Num("rx_packets_count"),
    Num("rx_fails"),
    Num("rx_count"),
    Num("tap_read_fails"),
    Num("tap_write_fails"),
    Agg("tap_write_agg"),
    Num("tx_bytes_count"),
    Num("tx_malformed_frames"),
    Num("tx_fails"),
    Num("tx_count"),
    Num("tx_packets_count"),
    Num("tx_queue_event_count"),
    Num("tx_rate_limiter_event_count"),
    Num("tx_rate_limiter_throttled"),
    Num("tx_spoofed_mac_count"),
    Num("tx_remaining_reqs_count"),
];

/// Each `vhost_user_<...>` group (only with vhost-user devices).
pub const VHOST_USER: &[Field] = &[
    Num("activate_fails"),
    Num("cfg_fails"),
    Num("init_time_us"),
    Num("activate_time_us"),
    Num("config_change_time_us"),
];

/// `pmem` and each `pmem_<id>`.
pub const PMEM: &[Field] = &[
    Num("activate_fails"),
    Num("cfg_fails"),
    Num("event_fails"),
    Num("queue_event_count"),
    Num("rate_limiter_throttled_events"),
    Num("rate_limiter_event_count"),
];

/// Per-device groups: a key with this prefix has these fields.
pub const PER_DEVICE: &[(&str, &[Field])] = &[
    ("block_", BLOCK),
    ("net_", NET),
    ("pmem_", PMEM),
    ("vhost_user_", VHOST_USER),
];

/// The groups every line has, in Firecracker's order (after
/// `utc_timestamp_ms`; `block_*` go just before `block`, `net_*` just before
/// `net`).
pub const GROUPS: &[(&str, &[Field])] = &[
    (
        "api_server",
        &[
            Num("process_startup_time_us"),
            Num("process_startup_time_cpu_us"),
        ],
    ),
    (
        "balloon",
        &[
            Num("activate_fails"),
            Num("inflate_count"),
            Num("stats_updates_count"),
            Num("stats_update_fails"),
            Num("deflate_count"),
            Num("event_fails"),
            Num("free_page_report_count"),
            Num("free_page_report_freed"),
            Num("free_page_report_fails"),
            Num("free_page_hint_count"),
            Num("free_page_hint_freed"),
            Num("free_page_hint_fails"),
        ],
    ),
    ("block", BLOCK),
    ("deprecated_api", &[Num("deprecated_http_api_calls")]),
    (
        "get_api_requests",
        &[
            Num("instance_info_count"),
            Num("machine_cfg_count"),
            Num("mmds_count"),
            Num("vmm_version_count"),
            Num("hotplug_memory_count"),
        ],
    ),
    (
        "i8042",
        &[
            Num("error_count"),
            Num("missed_read_count"),
            Num("missed_write_count"),
            Num("read_count"),
            Num("reset_count"),
            Num("write_count"),
        ],
    ),
    (
        "uart",
        &[
            Num("error_count"),
            Num("flush_count"),
            Num("missed_read_count"),
            Num("missed_write_count"),
            Num("read_count"),
            Num("write_count"),
            Num("rate_limiter_dropped_bytes"),
        ],
    ),
    (
        "latencies_us",
        &[
            Num("full_create_snapshot"),
            Num("diff_create_snapshot"),
            Num("load_snapshot"),
            Num("pause_vm"),
            Num("resume_vm"),
            Num("vmm_full_create_snapshot"),
            Num("vmm_diff_create_snapshot"),
            Num("vmm_load_snapshot"),
            Num("vmm_pause_vm"),
            Num("vmm_resume_vm"),
        ],
    ),
    (
        "logger",
        &[
            Num("missed_metrics_count"),
            Num("metrics_fails"),
            Num("missed_log_count"),
            Num("rate_limited_log_count"),
        ],
    ),
    (
        "mmds",
        &[
            Num("rx_accepted"),
            Num("rx_accepted_err"),
            Num("rx_accepted_unusual"),
            Num("rx_bad_eth"),
            Num("rx_invalid_token"),
            Num("rx_no_token"),
            Num("rx_count"),
            Num("tx_bytes"),
            Num("tx_count"),
            Num("tx_errors"),
            Num("tx_frames"),
            Num("connections_created"),
            Num("connections_destroyed"),
        ],
    ),
    ("net", NET),
    (
        "patch_api_requests",
        &[
            Num("drive_count"),
            Num("drive_fails"),
            Num("network_count"),
            Num("network_fails"),
            Num("machine_cfg_count"),
            Num("machine_cfg_fails"),
            Num("mmds_count"),
            Num("mmds_fails"),
            Num("hotplug_memory_count"),
            Num("hotplug_memory_fails"),
            Num("pmem_count"),
            Num("pmem_fails"),
        ],
    ),
    (
        "put_api_requests",
        &[
            Num("actions_count"),
            Num("actions_fails"),
            Num("boot_source_count"),
            Num("boot_source_fails"),
            Num("drive_count"),
            Num("drive_fails"),
            Num("logger_count"),
            Num("logger_fails"),
            Num("machine_cfg_count"),
            Num("machine_cfg_fails"),
            Num("cpu_cfg_count"),
            Num("cpu_cfg_fails"),
            Num("metrics_count"),
            Num("metrics_fails"),
            Num("network_count"),
            Num("network_fails"),
            Num("mmds_count"),
            Num("mmds_fails"),
            Num("vsock_count"),
            Num("vsock_fails"),
            Num("pmem_count"),
            Num("pmem_fails"),
            Num("serial_count"),
            Num("serial_fails"),
            Num("hotplug_memory_count"),
            Num("hotplug_memory_fails"),
        ],
    ),
    ("seccomp", &[Num("num_faults")]),
    (
        "vcpu",
        &[
            Num("exit_io_in"),
            Num("exit_io_out"),
            Num("exit_mmio_read"),
            Num("exit_mmio_write"),
            Num("failures"),
            Num("kvmclock_ctrl_fails"),
            Agg("exit_io_in_agg"),
            Agg("exit_io_out_agg"),
            Agg("exit_mmio_read_agg"),
            Agg("exit_mmio_write_agg"),
        ],
    ),
    ("vmm", &[Num("panic_count")]),
    (
        "signals",
        &[
            Num("sigbus"),
            Num("sigsegv"),
            Num("sigxfsz"),
            Num("sigxcpu"),
            Num("sigpipe"),
            Num("sighup"),
            Num("sigill"),
        ],
    ),
    (
        "vsock",
        &[
            Num("activate_fails"),
            Num("cfg_fails"),
            Num("rx_queue_event_fails"),
            Num("tx_queue_event_fails"),
            Num("ev_queue_event_fails"),
            Num("muxer_event_fails"),
            Num("conn_event_fails"),
            Num("rx_queue_event_count"),
            Num("tx_queue_event_count"),
            Num("rx_bytes_count"),
            Num("tx_bytes_count"),
            Num("rx_packets_count"),
            Num("tx_packets_count"),
            Num("conns_added"),
            Num("conns_killed"),
            Num("conns_removed"),
            Num("killq_resync"),
            Num("tx_flush_fails"),
            Num("tx_write_fails"),
            Num("rx_read_fails"),
        ],
    ),
    (
        "entropy",
        &[
            Num("activate_fails"),
            Num("entropy_event_fails"),
            Num("entropy_event_count"),
            Num("entropy_bytes"),
            Num("host_rng_fails"),
            Num("entropy_rate_limiter_throttled"),
            Num("rate_limiter_event_count"),
        ],
    ),
    ("pmem", PMEM),
    ("interrupts", &[Num("triggers"), Num("config_updates")]),
    (
        "memory_hotplug",
        &[
            Num("activate_fails"),
            Num("queue_event_fails"),
            Num("queue_event_count"),
            Agg("plug_agg"),
            Num("plug_count"),
            Num("plug_bytes"),
            Num("plug_fails"),
            Agg("unplug_agg"),
            Num("unplug_count"),
            Num("unplug_bytes"),
            Num("unplug_fails"),
            Num("unplug_discard_fails"),
            Agg("unplug_all_agg"),
            Num("unplug_all_count"),
            Num("unplug_all_fails"),
            Agg("state_agg"),
            Num("state_count"),
            Num("state_fails"),
        ],
    ),
];

/// A JSON value as the line has it: keys in the order written, numbers as
/// they are (anything that is neither an object nor a non-negative integer
/// is kept as `Other`, with what it was).
#[derive(Clone, Debug, PartialEq)]
pub enum Tree {
    /// A non-negative integer.
    Num(u64),
    /// An object, keys in order.
    Obj(Vec<(String, Tree)>),
    /// Anything else (a negative or fractional number, a string, ...).
    Other(String),
}

impl Tree {
    /// The value at `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Tree> {
        match self {
            Tree::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The number at `group.key`, if there is one.
    pub fn num(&self, group: &str, key: &str) -> Option<u64> {
        match self.get(group)?.get(key)? {
            Tree::Num(n) => Some(*n),
            _ => None,
        }
    }

    /// The keys of an object, in order.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Tree::Obj(fields) => fields.iter().map(|(k, _)| k.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tree;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Tree, E> {
                Ok(Tree::Num(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Tree, E> {
                Ok(u64::try_from(v)
                    .map_or_else(|_| Tree::Other(format!("the integer {v}")), Tree::Num))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Tree, E> {
                Ok(Tree::Other(format!("the float {v}")))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Tree, E> {
                Ok(Tree::Other(format!("the boolean {v}")))
            }
            fn visit_str<E>(self, v: &str) -> Result<Tree, E> {
                Ok(Tree::Other(format!("the string {v:?}")))
            }
            fn visit_unit<E>(self) -> Result<Tree, E> {
                Ok(Tree::Other("null".into()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Tree::Other("an array".into()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Tree>()? {
                    fields.push((k, v));
                }
                Ok(Tree::Obj(fields))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses one metrics line.
pub fn parse(line: &str) -> Result<Tree, String> {
    serde_json::from_str(line).map_err(|e| format!("not a JSON line ({e}): {line}"))
}

/// The fields of the top-level key `key`, if Firecracker has it.
fn fields_of(key: &str) -> Option<&'static [Field]> {
    GROUPS
        .iter()
        .find(|(g, _)| *g == key)
        .or_else(|| PER_DEVICE.iter().find(|(p, _)| key.starts_with(p)))
        .map(|(_, f)| *f)
}

/// Checks one group against its fields: the same keys, in the same order,
/// numbers where numbers are and latency aggregates where they are.
fn check_group(name: &str, value: &Tree, fields: &[Field], ordered: bool) -> Result<(), String> {
    let Tree::Obj(got) = value else {
        return Err(format!("{name} is not an object: {value:?}"));
    };
    let want: Vec<&str> = fields
        .iter()
        .map(|f| match f {
            Num(k) | Agg(k) => *k,
        })
        .collect();
    let got_keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    let mut sorted_got = got_keys.clone();
    let mut sorted_want = want.clone();
    sorted_got.sort_unstable();
    sorted_want.sort_unstable();
    if sorted_got != sorted_want || (ordered && got_keys != want) {
        let missing: Vec<_> = want.iter().filter(|k| !got_keys.contains(k)).collect();
        let extra: Vec<_> = got_keys.iter().filter(|k| !want.contains(k)).collect();
        return Err(format!(
            "{name}: fields differ from Firecracker 1.16's (missing {missing:?}, extra {extra:?}, order {got_keys:?})"
        ));
    }
    for field in fields {
        let key = match field {
            Num(k) | Agg(k) => *k,
        };
        let v = value
            .get(key)
            .ok_or_else(|| format!("{name}.{key} missing"))?;
        match (field, v) {
            (Num(_), Tree::Num(_)) => {}
            (Agg(_), Tree::Obj(_)) => {
                let sub: Vec<Field> = LATENCY_AGG.iter().map(|k| Num(k)).collect();
                check_group(&format!("{name}.{key}"), v, &sub, ordered)?;
            }
            _ => return Err(format!("{name}.{key} has the wrong type: {v:?}")),
        }
    }
    Ok(())
}

/// Checks a line (parsed with [`parse`]) against Firecracker 1.16's schema
/// and order: [`check_schema`] and [`check_order`].
pub fn validate(line: &Tree) -> Result<(), String> {
    check_schema(line)?;
    check_order(line)
}

/// What `validate_fc_metrics` checks: every group and field present,
/// nothing else, numbers and latency aggregates where Firecracker has them.
pub fn check_schema(line: &Tree) -> Result<(), String> {
    let Tree::Obj(top) = line else {
        return Err(format!("the line is not an object: {line:?}"));
    };
    let mut want: Vec<&str> = vec!["utc_timestamp_ms"];
    want.extend(GROUPS.iter().map(|(g, _)| *g));
    let got: Vec<&str> = top.iter().map(|(k, _)| k.as_str()).collect();
    let missing: Vec<_> = want.iter().filter(|k| !got.contains(k)).collect();
    let extra: Vec<_> = got
        .iter()
        .filter(|k| fields_of(k).is_none() && **k != "utc_timestamp_ms")
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(format!(
            "groups differ from Firecracker 1.16's: missing {missing:?}, extra {extra:?}"
        ));
    }
    for (key, value) in top {
        if key == "utc_timestamp_ms" {
            if !matches!(value, Tree::Num(_)) {
                return Err(format!("utc_timestamp_ms is not a number: {value:?}"));
            }
            continue;
        }
        let fields = fields_of(key).ok_or_else(|| format!("unknown group {key}"))?;
        check_group(key, value, fields, false)?;
    }
    Ok(())
}

/// Firecracker's order: `utc_timestamp_ms`, the groups as [`GROUPS`] lists
/// them with each device's group just before its aggregate, and the fields
/// of each group as listed.
pub fn check_order(line: &Tree) -> Result<(), String> {
    let got = line.keys();
    let mut want: Vec<&str> = vec!["utc_timestamp_ms"];
    for (g, _) in GROUPS {
        let prefix = format!("{g}_");
        if PER_DEVICE.iter().any(|(p, _)| *p == prefix) {
            want.extend(got.iter().copied().filter(|k| k.starts_with(&prefix)));
        }
        want.push(*g);
    }
    want.extend(got.iter().copied().filter(|k| k.starts_with("vhost_user_")));
    if got != want {
        return Err(format!(
            "groups are not in Firecracker's order: {got:?}, want {want:?}"
        ));
    }
    for key in got {
        if let (Some(fields), Some(value)) = (fields_of(key), line.get(key)) {
            check_group(key, value, fields, true)?;
        }
    }
    Ok(())
}

/// `FcDeviceMetrics`'s check: there are `devices` groups `<group>_*`, and
/// `group` is their sum (for latency aggregates: `sum_us` summed, `min_us`
/// and `max_us` 0).
pub fn check_aggregate(line: &Tree, group: &str, devices: usize) -> Result<(), String> {
    let Tree::Obj(top) = line else {
        return Err("the line is not an object".into());
    };
    let prefix = format!("{group}_");
    let per_device: Vec<&Tree> = top
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v)
        .collect();
    if per_device.len() != devices {
        return Err(format!(
            "{} groups {prefix}*, want {devices}",
            per_device.len()
        ));
    }
    let aggregate = line.get(group).ok_or_else(|| format!("no {group} group"))?;
    let Tree::Obj(fields) = aggregate else {
        return Err(format!("{group} is not an object"));
    };
    for (key, value) in fields {
        let sum_of = |sub: Option<&str>| -> u64 {
            per_device
                .iter()
                .filter_map(|d| {
                    let v = d.get(key)?;
                    match (sub, v) {
                        (None, Tree::Num(n)) => Some(*n),
                        (Some(s), Tree::Obj(_)) => match v.get(s)? {
                            Tree::Num(n) => Some(*n),
                            _ => None,
                        },
                        _ => None,
                    }
                })
                .sum()
        };
        let want = match value {
            Tree::Num(_) => Tree::Num(sum_of(None)),
            Tree::Obj(_) => Tree::Obj(vec![
                ("min_us".into(), Tree::Num(0)),
                ("max_us".into(), Tree::Num(0)),
                ("sum_us".into(), Tree::Num(sum_of(Some("sum_us")))),
            ]),
            Tree::Other(_) => return Err(format!("{group}.{key} is not a number")),
        };
        if *value != want {
            return Err(format!(
                "{group}.{key} is {value:?}, but its devices' sum is {want:?}"
            ));
        }
    }
    Ok(())
}
