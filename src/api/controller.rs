//! The VMM thread's side of the API: applies each [`ApiRequest`] to the
//! [`Vmm`] with Firecracker's rules (which calls are pre-boot only, which
//! runtime only), its answers (204, 200 + JSON, 400 + `fault_message`) and its
//! metrics.

use std::os::unix::fs::FileTypeExt;
use std::time::Instant;

use devices::virtio::balloon::Balloon;
use devices::virtio::block::{open_image, Block, Error as BlockError};
use devices::virtio::pmem::Pmem;
use serde_json::json;

use super::http::Response;
use super::request::{
    ActionType, ApiRequest, PartialDrive, PartialPmem, SnapshotType, VmStateChange,
};
use crate::config::VmConfig;
use crate::device_manager::VirtioKind;
use crate::metrics::{MetricsSink, METRICS};
use crate::runtime::EventLoop;
use crate::snapshot::{self, BALLOON_ID};
use crate::vmm::{RestoreOptions, Vmm};

/// The API level this VMM implements, reported as Firecracker's version.
pub const FIRECRACKER_API_VERSION: &str = "1.16.1";

/// What the VMM thread keeps for the API between requests.
pub struct Controller {
    /// The instance ID (`--id`).
    pub instance_id: String,
    /// Where metrics go, once configured.
    pub metrics: Option<MetricsSink>,
}

fn ok_json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response::json(200, body),
        Err(e) => Response::fault(500, &format!("Cannot encode the answer: {e}.")),
    }
}

fn bad(message: impl std::fmt::Display) -> Response {
    Response::fault(400, &message.to_string())
}

/// Counts a request (before it is served, so that a FlushMetrics line counts
/// itself), and later whether it failed, under Firecracker's metric names.
fn count(req: &ApiRequest, failed: bool) {
    let m = &METRICS;
    // GET requests have a count and no failure counter.
    let get = |c: &crate::metrics::Counter| {
        if !failed {
            c.inc()
        }
    };
    let (count, fails) = match req {
        ApiRequest::GetInstanceInfo => return get(&m.get_api_requests.instance_info_count),
        ApiRequest::GetVersion => return get(&m.get_api_requests.vmm_version_count),
        ApiRequest::GetMachineConfig => return get(&m.get_api_requests.machine_cfg_count),
        ApiRequest::GetMmds => return get(&m.get_api_requests.mmds_count),
        // Firecracker keeps no request counters for the entropy device.
        ApiRequest::PutEntropy(_) | ApiRequest::PutSerial(_) => return,
        ApiRequest::PutBalloon(_)
        | ApiRequest::PatchBalloon(_)
        | ApiRequest::GetBalloon
        | ApiRequest::GetBalloonStats
        | ApiRequest::PatchBalloonStats(_) => return,
        ApiRequest::GetVmConfig => return,
        // Firecracker keeps no counters for unplugs.
        ApiRequest::DeleteDrive(_)
        | ApiRequest::DeleteNetworkInterface(_)
        | ApiRequest::DeletePmem(_) => return,
        ApiRequest::PutPmem(_) => (
            &m.put_api_requests.pmem_count,
            &m.put_api_requests.pmem_fails,
        ),
        ApiRequest::PatchPmem(_) => (
            &m.patch_api_requests.pmem_count,
            &m.patch_api_requests.pmem_fails,
        ),
        // Firecracker reports snapshots through latencies_us only.
        ApiRequest::CreateSnapshot(_) | ApiRequest::LoadSnapshot(_) => return,
        ApiRequest::PutMachineConfig(_) => (
            &m.put_api_requests.machine_cfg_count,
            &m.put_api_requests.machine_cfg_fails,
        ),
        ApiRequest::PatchMachineConfig(_) => (
            &m.patch_api_requests.machine_cfg_count,
            &m.patch_api_requests.machine_cfg_fails,
        ),
        ApiRequest::PutBootSource(_) => (
            &m.put_api_requests.boot_source_count,
            &m.put_api_requests.boot_source_fails,
        ),
        ApiRequest::PutDrive(_) => (
            &m.put_api_requests.drive_count,
            &m.put_api_requests.drive_fails,
        ),
        ApiRequest::PatchDrive(_) => (
            &m.patch_api_requests.drive_count,
            &m.patch_api_requests.drive_fails,
        ),
        ApiRequest::PutNetworkInterface(_) => (
            &m.put_api_requests.network_count,
            &m.put_api_requests.network_fails,
        ),
        ApiRequest::PatchNetworkInterface(_) => (
            &m.patch_api_requests.network_count,
            &m.patch_api_requests.network_fails,
        ),
        ApiRequest::PutLogger(_) => (
            &m.put_api_requests.logger_count,
            &m.put_api_requests.logger_fails,
        ),
        ApiRequest::PutMetrics(_) => (
            &m.put_api_requests.metrics_count,
            &m.put_api_requests.metrics_fails,
        ),
        ApiRequest::PutVsock(_) => (
            &m.put_api_requests.vsock_count,
            &m.put_api_requests.vsock_fails,
        ),
        ApiRequest::PutMmds(_) | ApiRequest::PutMmdsConfig(_) => (
            &m.put_api_requests.mmds_count,
            &m.put_api_requests.mmds_fails,
        ),
        ApiRequest::PatchMmds(_) => (
            &m.patch_api_requests.mmds_count,
            &m.patch_api_requests.mmds_fails,
        ),
        ApiRequest::Action(_) | ApiRequest::PatchVm(_) => (
            &m.put_api_requests.actions_count,
            &m.put_api_requests.actions_fails,
        ),
    };
    if failed {
        fails.inc();
    } else {
        count.inc();
    }
}

impl Controller {
    /// Serves one request.
    pub fn handle(&mut self, vmm: &mut Vmm, el: &mut EventLoop, req: ApiRequest) -> Response {
        count(&req, false);
        let resp = self.dispatch(vmm, el, &req);
        if resp.status >= 400 {
            count(&req, true);
        }
        resp
    }

    fn dispatch(&mut self, vmm: &mut Vmm, el: &mut EventLoop, req: &ApiRequest) -> Response {
        let started = vmm.state() != crate::vmm::VmState::NotStarted;
        if started && req.is_pre_boot_only() {
            return bad("The requested operation is not supported after starting the microVM.");
        }
        if !started && req.is_runtime_only() {
            return bad("The requested operation is not supported before starting the microVM.");
        }
        match req {
            ApiRequest::GetInstanceInfo => ok_json(&json!({
                "id": self.instance_id,
                "state": vmm.state().as_str(),
                "vmm_version": env!("CARGO_PKG_VERSION"),
                "app_name": "vmm",
            })),
            ApiRequest::GetVersion => ok_json(&json!({
                "firecracker_version": FIRECRACKER_API_VERSION,
            })),
            ApiRequest::PutPmem(p) if started => hotplug(vmm, el, |c| {
                if c.pmem.iter().any(|o| o.id == p.id) {
                    return Err(format!(
                        "Device ID in use: pmem device '{}' is attached; give a new id.",
                        p.id
                    ));
                }
                if p.root_device {
                    return Err("A root pmem device cannot be hotplugged; attach it with root_device false.".into());
                }
                c.pmem.push(p.clone());
                Ok(())
            }),
            ApiRequest::PutPmem(p) => configure_checked(vmm, true, |c| c.upsert_pmem(p.clone())),
            ApiRequest::PatchPmem(p) => patch_pmem(vmm, p),
            ApiRequest::DeletePmem(id) => unplug(vmm, el, VirtioKind::Pmem, id),
            ApiRequest::GetVmConfig => ok_json(&full_vm_config(vmm.config())),
            ApiRequest::GetMachineConfig => ok_json(&vmm.config().machine_config),
            ApiRequest::PutMachineConfig(m) => configure(vmm, |c| c.machine_config = m.clone()),
            ApiRequest::PatchMachineConfig(u) => configure(vmm, |c| {
                c.machine_config = c.machine_config.updated(u.clone());
            }),
            ApiRequest::PutBootSource(b) => {
                for (what, path) in std::iter::once(("kernel image", &b.kernel_image_path))
                    .chain(b.initrd_path.iter().map(|p| ("initrd", p)))
                {
                    match std::fs::metadata(path) {
                        Err(e) => {
                            let file = if what == "initrd" { "initrd" } else { "kernel" };
                            return bad(format!(
                                "Boot source error: The {file} file cannot be opened: {e}; give an existing file ('{}').",
                                path.display()
                            ));
                        }
                        Ok(m) if !m.is_file() => {
                            return bad(format!(
                                "The {what} '{}' is not a regular file; give the path of a file.",
                                path.display()
                            ))
                        }
                        Ok(_) => {}
                    }
                }
                configure(vmm, |c| c.boot_source = Some(b.clone()))
            }
            ApiRequest::DeleteDrive(id) => unplug(vmm, el, VirtioKind::Block, id),
            ApiRequest::DeleteNetworkInterface(id) => unplug(vmm, el, VirtioKind::Net, id),
            ApiRequest::PutDrive(d) if started => hotplug(vmm, el, |c| {
                if c.drives.iter().any(|o| o.drive_id == d.drive_id) {
                    return Err(format!(
                        "Device ID in use: drive '{}' is attached; give a new drive_id.",
                        d.drive_id
                    ));
                }
                if d.is_root_device {
                    return Err("A root block device cannot be hotplugged; attach it with is_root_device false.".into());
                }
                c.drives.push(d.clone());
                Ok(())
            }),
            ApiRequest::PutNetworkInterface(n) if started => hotplug(vmm, el, |c| {
                if c.network_interfaces
                    .iter()
                    .any(|o| o.iface_id == n.iface_id)
                {
                    return Err(format!(
                        "Device ID in use: interface '{}' is attached; give a new iface_id.",
                        n.iface_id
                    ));
                }
                c.network_interfaces.push(n.clone());
                Ok(())
            }),
            ApiRequest::PutDrive(d) => {
                if let Some((_, p)) = vmm.config().root_pmem().filter(|_| d.is_root_device) {
                    return bad(crate::config::Error::DriveRootBesidePmem {
                        drive: d.drive_id.clone(),
                        pmem: p.id.clone(),
                    });
                }
                match std::fs::metadata(&d.path_on_host) {
                    Err(e) => {
                        return bad(format!(
                            "Cannot open the drive image '{}': {e}; give an existing file.",
                            d.path_on_host.display()
                        ))
                    }
                    Ok(m) if !m.is_file() && !m.file_type().is_block_device() => {
                        return bad(BlockError::NotAFile(d.path_on_host.clone()))
                    }
                    Ok(_) => {}
                }
                configure(vmm, |c| c.upsert_drive(d.clone()))
            }
            ApiRequest::PutNetworkInterface(n) => {
                // Attached once to check it (as Firecracker does at this call);
                // the device attaches it again at InstanceStart.
                let opened = devices::virtio::tap::Tap::open(&n.host_dev_name);
                let tap_taken = vmm
                    .config()
                    .network_interfaces
                    .iter()
                    .any(|o| o.iface_id != n.iface_id && o.host_dev_name == n.host_dev_name);
                // Firecracker drops an interface's old device before it
                // makes the new one: when that fails, the ID is gone.
                if opened.is_err() || tap_taken {
                    let _ = configure(vmm, |c| {
                        c.network_interfaces.retain(|o| o.iface_id != n.iface_id)
                    });
                }
                match opened {
                    Err(e) => bad(format!("Could not create the network device: {e}")),
                    // A TAP another interface has is refused by the check
                    // (config::Error::TapInUse).
                    Ok(_) => configure(vmm, |c| c.upsert_interface(n.clone())),
                }
            }
            ApiRequest::PutVsock(v) => {
                // Bound now, as Firecracker does; a path that exists already
                // is refused (except the socket an earlier PUT bound, which
                // is replaced).
                let ours = vmm.config().vsock.as_ref().map(|c| c.uds_path.as_path())
                    == Some(v.uds_path.as_path());
                if v.uds_path.exists() && !ours {
                    return bad(format!(
                        "vsock uds_path '{}' exists; give a path that does not exist yet (the VMM creates the socket).",
                        v.uds_path.display()
                    ));
                }
                let r = configure(vmm, |c| c.vsock = Some(v.clone()));
                if r.status != 204 {
                    return r;
                }
                match vmm.bind_vsock() {
                    Ok(()) => r,
                    Err(e) => bad(e),
                }
            }
            ApiRequest::PutLogger(l) => match crate::logger::configure(l) {
                Ok(()) => configure_as(vmm, false, |c| c.logger = Some(l.clone())),
                Err(e) => bad(e),
            },
            ApiRequest::PutMetrics(m) => {
                if let Some(sink) = &self.metrics {
                    return bad(crate::metrics::Error::AlreadyConfigured(
                        sink.path().to_string(),
                    ));
                }
                match MetricsSink::open(&m.metrics_path) {
                    Ok(sink) => {
                        self.metrics = Some(sink);
                        configure_as(vmm, false, |c| c.metrics = Some(m.clone()))
                    }
                    Err(e) => bad(e),
                }
            }
            ApiRequest::Action(ActionType::InstanceStart) => {
                if vmm.config().boot_source.is_none() {
                    return bad("Cannot start microvm without kernel configuration.");
                }
                match vmm.start(el) {
                    Ok(()) => {
                        crate::metrics::instance_started(self.metrics.as_mut(), vmm.devices());
                        Response::no_content()
                    }
                    Err(e) => bad(e),
                }
            }
            ApiRequest::Action(ActionType::FlushMetrics) => self.flush_metrics(vmm),
            ApiRequest::Action(ActionType::SendCtrlAltDel) => match vmm.send_ctrl_alt_del() {
                Ok(()) => Response::no_content(),
                Err(e) => bad(e),
            },
            ApiRequest::PatchVm(change) => {
                let t = Instant::now();
                let (result, latency) = match change {
                    VmStateChange::Paused => (vmm.pause(), &METRICS.latencies_us.pause_vm),
                    VmStateChange::Resumed => (vmm.resume(), &METRICS.latencies_us.resume_vm),
                };
                latency.set(t.elapsed().as_micros() as u64);
                match result {
                    Ok(()) => Response::no_content(),
                    Err(e) => bad(e),
                }
            }
            ApiRequest::CreateSnapshot(p) => {
                let t = Instant::now();
                let kind = match p.snapshot_type {
                    Some(SnapshotType::Diff) => snapshot::Kind::Diff,
                    _ => snapshot::Kind::Full,
                };
                let result = vmm.create_snapshot(&p.snapshot_path, &p.mem_file_path, kind);
                let us = t.elapsed().as_micros() as u64;
                if kind == snapshot::Kind::Diff {
                    METRICS.latencies_us.diff_create_snapshot.set(us);
                    METRICS.latencies_us.vmm_diff_create_snapshot.set(us);
                } else {
                    METRICS.latencies_us.full_create_snapshot.set(us);
                    METRICS.latencies_us.vmm_full_create_snapshot.set(us);
                }
                match result {
                    Ok(()) => Response::no_content(),
                    Err(e) => bad(e),
                }
            }
            ApiRequest::LoadSnapshot(l) => {
                let t = Instant::now();
                let options = RestoreOptions {
                    resume: l.resume,
                    network_overrides: l
                        .network_overrides
                        .iter()
                        .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
                        .collect(),
                    vsock_override: l.vsock_override.clone(),
                    clock_realtime: l.clock_realtime,
                    track_dirty_pages: l.track_dirty_pages,
                    huge_pages: l.huge_pages,
                };
                let loadable = vmm.snapshot_loadable();
                let result = vmm.load_snapshot(&l.snapshot_path, &l.mem, &options, el);
                let us = t.elapsed().as_micros() as u64;
                METRICS.latencies_us.load_snapshot.set(us);
                METRICS.latencies_us.vmm_load_snapshot.set(us);
                match result {
                    Ok(()) => {
                        crate::metrics::instance_started(self.metrics.as_mut(), vmm.devices());
                        Response::no_content()
                    }
                    Err(e) if loadable => {
                        // As Firecracker: a load that was tried and failed
                        // ends the process (after this answer).
                        let msg =
                            format!("Load snapshot error: Failed to restore from snapshot: {e}");
                        log::error!("{msg}");
                        vmm.exit_signal().raise(Err(msg.clone()));
                        bad(msg)
                    }
                    Err(e) => bad(e),
                }
            }
            ApiRequest::GetMmds => {
                let m = vmm.mmds().lock().unwrap_or_else(|e| e.into_inner());
                match (m.initialized(), started) {
                    (true, _) => ok_json(m.data()),
                    // Before any PUT: an empty store before the start (as
                    // Firecracker answers), an error after it.
                    (false, false) => ok_json(&json!({})),
                    (false, true) => bad(devices::mmds::Error::NotInitialized),
                }
            }
            ApiRequest::PutMmds(v) => {
                let mut m = vmm.mmds().lock().unwrap_or_else(|e| e.into_inner());
                match m.put(v.clone()) {
                    Ok(()) => Response::no_content(),
                    Err(e) => mmds_fault(e),
                }
            }
            ApiRequest::PatchMmds(v) => {
                let mut m = vmm.mmds().lock().unwrap_or_else(|e| e.into_inner());
                match m.patch(v) {
                    Ok(()) => Response::no_content(),
                    Err(e) => mmds_fault(e),
                }
            }
            ApiRequest::PutSerial(s) => {
                // The file is opened now, so a bad path fails this request.
                if let Some(path) = &s.serial_out_path {
                    if let Err(e) = crate::serial::open(path) {
                        return bad(e);
                    }
                }
                // Not a boot resource: a snapshot can still be loaded.
                configure_as(vmm, false, |cfg| cfg.serial = Some(s.clone()))
            }
            ApiRequest::PutBalloon(b) => configure(vmm, |cfg| cfg.balloon = Some(b.clone())),
            ApiRequest::GetBalloon => match &vmm.config().balloon {
                Some(b) => ok_json(b),
                None => bad(NO_BALLOON),
            },
            ApiRequest::PatchBalloon(u) => patch_balloon(vmm, u.amount_mib),
            ApiRequest::GetBalloonStats => balloon_stats(vmm),
            ApiRequest::PatchBalloonStats(u) => {
                let secs = u.stats_polling_interval_s;
                match with_device(vmm, VirtioKind::Balloon, BALLOON_ID, |b: &mut Balloon| {
                    b.set_stats_interval(secs)
                }) {
                    Err(resp) => resp,
                    Ok(Err(why)) => bad(why),
                    Ok(Ok(())) => {
                        vmm.config_runtime_update(|c| {
                            if let Some(b) = c.balloon.as_mut() {
                                b.stats_polling_interval_s = secs;
                            }
                        });
                        Response::no_content()
                    }
                }
            }
            ApiRequest::PutEntropy(e) => configure(vmm, |cfg| cfg.entropy = Some(e.clone())),
            ApiRequest::PutMmdsConfig(c) => configure(vmm, |cfg| cfg.mmds_config = Some(c.clone())),
            ApiRequest::PatchDrive(p) => patch_drive(vmm, p),
            ApiRequest::PatchNetworkInterface(p) => {
                let Some(iface) = vmm
                    .config()
                    .network_interfaces
                    .iter()
                    .find(|n| n.iface_id == p.iface_id)
                    .cloned()
                else {
                    return bad(format!(
                        "There is no network interface '{}'; give the iface_id of a configured one.",
                        p.iface_id
                    ));
                };
                let (rx, tx) = (&p.rx_rate_limiter, &p.tx_rate_limiter);
                let updated = with_device(
                    vmm,
                    VirtioKind::Net,
                    &p.iface_id,
                    |net: &mut devices::virtio::net::Net<devices::virtio::tap::Tap>| {
                        net.update_rate_limiters(
                            rx.as_ref().map(|l| l.buckets()),
                            tx.as_ref().map(|l| l.buckets()),
                        )
                    },
                );
                if let Err(e) = updated {
                    return e;
                }
                let mut iface = iface;
                if let Some(l) = rx {
                    iface.rx_rate_limiter = l.patch(iface.rx_rate_limiter.as_ref());
                }
                if let Some(l) = tx {
                    iface.tx_rate_limiter = l.patch(iface.tx_rate_limiter.as_ref());
                }
                vmm.config_runtime_update(|c| c.upsert_interface(iface));
                Response::no_content()
            }
        }
    }

    /// Writes a metrics line now.
    pub fn flush_metrics(&mut self, vmm: &Vmm) -> Response {
        match &mut self.metrics {
            Some(sink) => match sink.flush(vmm.devices()) {
                Ok(()) => Response::no_content(),
                Err(e) => bad(e),
            },
            None => bad(crate::metrics::Error::NotConfigured),
        }
    }
}

/// Applies a pre-boot change to the configuration; the whole configuration
/// must still be valid, or nothing changes. A successful change of a boot
/// resource rules out loading a snapshot afterwards.
/// GET /vm/config as Firecracker answers it: every section of its
/// FullVmConfiguration, null (or an empty list) when not configured, and
/// nothing else (the serial console is not part of it).
fn full_vm_config(config: &VmConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(config).unwrap_or_else(|_| json!({}));
    if let Some(map) = v.as_object_mut() {
        map.remove("serial");
        for key in [
            "balloon",
            "boot-source",
            "cpu-config",
            "logger",
            "machine-config",
            "metrics",
            "mmds-config",
            "vsock",
            "entropy",
            "memory-hotplug",
        ] {
            map.entry(key).or_insert(serde_json::Value::Null);
        }
        for key in ["drives", "network-interfaces", "pmem"] {
            map.entry(key).or_insert_with(|| json!([]));
        }
        // Optional fields Firecracker writes as null.
        let nulls: [(&str, &[&str]); 2] = [
            ("drives", &["partuuid", "rate_limiter", "socket"]),
            (
                "network-interfaces",
                &["guest_mac", "rx_rate_limiter", "tx_rate_limiter"],
            ),
        ];
        for (list, fields) in nulls {
            if let Some(items) = map.get_mut(list).and_then(|l| l.as_array_mut()) {
                for item in items.iter_mut().filter_map(|i| i.as_object_mut()) {
                    for f in fields {
                        item.entry(*f).or_insert(serde_json::Value::Null);
                    }
                }
            }
        }
    }
    v
}

/// A refused metadata store change: 413 when it does not fit, as Firecracker
/// answers.
fn mmds_fault(e: devices::mmds::Error) -> Response {
    match e {
        devices::mmds::Error::TooLarge { .. } => Response::fault(413, &e.to_string()),
        e => bad(e),
    }
}

fn configure(vmm: &mut Vmm, change: impl FnOnce(&mut VmConfig)) -> Response {
    configure_as(vmm, true, change)
}

/// As [`configure`] for the logger and metrics, which do not count as boot
/// resources.
fn configure_as(
    vmm: &mut Vmm,
    boot_resource: bool,
    change: impl FnOnce(&mut VmConfig),
) -> Response {
    configure_checked(vmm, boot_resource, |c| {
        change(c);
        Ok(())
    })
}

/// As [`configure_as`] for a change that can itself be refused.
fn configure_checked(
    vmm: &mut Vmm,
    boot_resource: bool,
    change: impl FnOnce(&mut VmConfig) -> Result<(), crate::config::Error>,
) -> Response {
    let config = match vmm.config_mut() {
        Ok(c) => c,
        Err(e) => return bad(e),
    };
    let mut next = config.clone();
    match change(&mut next).and_then(|()| next.validate()) {
        Ok(()) => {
            *config = next;
            if boot_resource {
                vmm.mark_boot_configured();
            }
            Response::no_content()
        }
        Err(e) => bad(e),
    }
}

/// A new image (or rate limiter) for a drive of a running VM: the device
/// serves the new file and the guest is told its capacity changed.
const NO_BALLOON: &str = "No balloon device is configured; PUT /balloon before the start.";

/// Firecracker's names of the virtio balloon statistics, by tag.
const BALLOON_STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// A new target size for the running balloon; the driver is told through a
/// configuration change.
fn patch_balloon(vmm: &mut Vmm, amount_mib: u32) -> Response {
    let Some(mut cfg) = vmm.config().balloon.clone() else {
        return bad(NO_BALLOON);
    };
    if let Err(e) =
        crate::config::check_balloon_size(amount_mib, vmm.config().machine_config.mem_size_mib)
    {
        return bad(e);
    }
    let Some(entry) = vmm
        .devices()
        .and_then(|d| d.find(VirtioKind::Balloon, BALLOON_ID))
    else {
        return bad(NO_BALLOON);
    };
    let mut t = entry.transport.lock().unwrap_or_else(|e| e.into_inner());
    let set = t.core().with_device(|d| {
        d.as_any_mut()
            .downcast_mut::<Balloon>()
            .map(|b| b.set_target_pages(amount_mib.saturating_mul(crate::builder::MIB_PAGES)))
    });
    if set.is_none() {
        return bad(NO_BALLOON);
    }
    t.core_mut().config_changed();
    drop(t);
    cfg.amount_mib = amount_mib;
    vmm.config_runtime_update(|c| c.balloon = Some(cfg));
    Response::no_content()
}

/// Adds the device `add` puts in the configuration to the running VM (a
/// 400 naming why not: no PCI, an ID in use, a device that cannot open).
fn hotplug(
    vmm: &mut Vmm,
    el: &mut EventLoop,
    add: impl FnOnce(&mut VmConfig) -> Result<(), String>,
) -> Response {
    match vmm.hotplug(el, add) {
        Ok(()) => Response::no_content(),
        Err(e) => bad(e),
    }
}

/// Removes a device the guest released from the running VM.
fn unplug(vmm: &mut Vmm, el: &mut EventLoop, kind: VirtioKind, id: &str) -> Response {
    match vmm.unplug(el, kind, id) {
        Ok(()) => Response::no_content(),
        Err(e) => bad(e),
    }
}

/// The balloon's sizes and the guest's latest statistics, under
/// Firecracker's names (in bytes where virtio counts pages of memory).
fn balloon_stats(vmm: &Vmm) -> Response {
    let read = with_device(vmm, VirtioKind::Balloon, BALLOON_ID, |b: &mut Balloon| {
        (b.target_pages(), b.actual_pages(), b.stats().cloned())
    });
    let (target, actual, stats) = match read {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(stats) = stats else {
        return bad("Balloon statistics are not enabled; set stats_polling_interval_s in PUT /balloon before the start.");
    };
    let pages = crate::builder::MIB_PAGES;
    let mut out = serde_json::Map::new();
    out.insert("target_pages".into(), target.into());
    out.insert("actual_pages".into(), actual.into());
    out.insert("target_mib".into(), (target / pages).into());
    out.insert("actual_mib".into(), (actual / pages).into());
    for (tag, value) in stats {
        if let Some(name) = BALLOON_STAT_NAMES.get(usize::from(tag)) {
            out.insert((*name).into(), value.into());
        }
    }
    ok_json(&out)
}

/// Runs `f` on the started device `id` of `kind`, under its locks; a 400
/// if there is no such device.
fn with_device<T: 'static, R>(
    vmm: &Vmm,
    kind: VirtioKind,
    id: &str,
    f: impl FnOnce(&mut T) -> R,
) -> Result<R, Response> {
    let entry = vmm
        .devices()
        .and_then(|d| d.find(kind, id))
        .ok_or_else(|| bad(format!("Device '{id}' has no device model.")))?;
    let t = entry.transport.lock().unwrap_or_else(|e| e.into_inner());
    t.core()
        .with_device(|d| d.as_any_mut().downcast_mut::<T>().map(f))
        .ok_or_else(|| bad(format!("Device '{id}' is not of the kind asked for.")))
}

/// A new rate limiter for a running pmem device (none given: unchanged).
fn patch_pmem(vmm: &mut Vmm, p: &PartialPmem) -> Response {
    let Some(mut cfg) = vmm.config().pmem.iter().find(|c| c.id == p.id).cloned() else {
        return bad(format!(
            "Device not found: no pmem device '{}' is attached.",
            p.id
        ));
    };
    let Some(limiter) = &p.rate_limiter else {
        return Response::no_content();
    };
    let (bandwidth, ops) = limiter.buckets();
    if let Err(resp) = with_device(vmm, VirtioKind::Pmem, &p.id, |d: &mut Pmem| {
        d.update_rate_limiter(bandwidth, ops)
    }) {
        return resp;
    }
    cfg.rate_limiter = limiter.patch(cfg.rate_limiter.as_ref());
    vmm.config_runtime_update(|c| {
        if let Some(slot) = c.pmem.iter_mut().find(|c| c.id == cfg.id) {
            *slot = cfg;
        }
    });
    Response::no_content()
}

fn patch_drive(vmm: &mut Vmm, p: &PartialDrive) -> Response {
    let Some(drive) = vmm
        .config()
        .drives
        .iter()
        .find(|d| d.drive_id == p.drive_id)
        .cloned()
    else {
        return bad(format!(
            "There is no drive '{}'; give the drive_id of a configured drive.",
            p.drive_id
        ));
    };
    let mut drive = drive;
    if let Some(path) = &p.path_on_host {
        let Some(entry) = vmm
            .devices()
            .and_then(|d| d.find(VirtioKind::Block, &p.drive_id))
        else {
            return bad(format!("Drive '{}' has no device.", p.drive_id));
        };
        // The new image is opened (never blocking) before any lock is taken;
        // only the swap happens under the device lock.
        let opened = open_image(path, drive.is_read_only);
        let mut t = entry.transport.lock().unwrap_or_else(|e| e.into_inner());
        let replaced = t.core().with_device(|d| {
            let block = d.as_any_mut().downcast_mut::<Block>()?;
            Some(match opened {
                Ok((file, capacity)) => {
                    block.swap_image(path, file, capacity);
                    Ok(())
                }
                // The image already served: its (new) size is read again.
                Err(BlockError::InUse(_)) => match block.refresh_if_same(path) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(BlockError::InUse(path.clone())),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            })
        });
        match replaced {
            None => {
                return bad(format!(
                    "Drive '{}' is not a virtio-blk device.",
                    p.drive_id
                ))
            }
            Some(Err(e)) => return bad(e),
            Some(Ok(())) => t.core_mut().config_changed(),
        }
        drive.path_on_host = path.clone();
    }
    if let Some(l) = &p.rate_limiter {
        let (bandwidth, ops) = l.buckets();
        let updated = with_device(vmm, VirtioKind::Block, &p.drive_id, |b: &mut Block| {
            b.update_rate_limiter(bandwidth, ops)
        });
        if let Err(e) = updated {
            return e;
        }
        drive.rate_limiter = l.patch(drive.rate_limiter.as_ref());
    }
    vmm.config_runtime_update(|c| c.upsert_drive(drive));
    Response::no_content()
}
