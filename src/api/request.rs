//! Firecracker's API requests: method and path routed, JSON bodies parsed
//! (unknown fields refused) and checked, on the API thread. What comes out is
//! a typed [`ApiRequest`] for the VMM thread, or the 400 to answer at once.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::http::{Method, Request, Response};
use crate::config::{
    self, BalloonConfig, BootSource, Drive, EntropyConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, MmdsConfig, NetworkInterface, PmemConfig, RateLimiter,
    SerialConfig, VsockConfig,
};
use crate::snapshot::MemorySource;

/// `PATCH /drives/{id}`: a new image for a running VM.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive.
    pub drive_id: String,
    /// Its new image.
    #[serde(default)]
    pub path_on_host: Option<std::path::PathBuf>,
    /// A new rate limiter (stored; not enforced yet).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{id}`: new rate limiters for a running VM.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface.
    pub iface_id: String,
    /// New receive rate limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit rate limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Writes a metrics line now.
    FlushMetrics,
    /// Boots the configured VM.
    InstanceStart,
    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    SendCtrlAltDel,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionInfo {
    action_type: ActionType,
}

/// `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmStateChange {
    /// Pause the VM.
    Paused,
    /// Resume it.
    Resumed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmInfo {
    state: VmStateChange,
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// Only pages dirtied since the last snapshot (refused: not yet).
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where the state goes.
    pub snapshot_path: PathBuf,
    /// Where guest memory goes.
    pub mem_file_path: PathBuf,
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
}

/// `backend_type` of a snapshot load's memory backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MemoryBackendType {
    /// A memory file, mapped privately.
    File,
    /// A userfaultfd handler process (refused: not yet).
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file (or the handler's socket).
    pub backend_path: PathBuf,
}

/// One entry of `network_overrides`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its TAP on this host.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file (Firecracker's deprecated form of `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// The memory backend.
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Resume the VM once loaded (default: stay paused).
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// Dirty-page tracking on the restored VM, for Diff snapshots of it.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// TAPs of this host for the snapshot's interfaces.
    #[serde(default)]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// A new socket path for the snapshot's vsock device.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the kvmclock by the wall-clock time since the snapshot.
    #[serde(default)]
    pub clock_realtime: Option<bool>,
    /// What backs the restored guest memory ("Snapshot": as when taken).
    #[serde(default)]
    pub huge_pages: Option<LoadHugePages>,
}

/// `huge_pages` of a snapshot load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum LoadHugePages {
    /// As the snapshot's machine configuration says.
    Snapshot,
    /// Base pages.
    None,
    /// Transparent huge pages.
    Transparent,
    /// 2 MiB hugetlbfs pages (a Uffd backend only).
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `vsock_override` of a snapshot load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new Unix socket path of the vsock device.
    pub uds_path: PathBuf,
}

/// A snapshot load, checked: the memory file and whether to resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotLoad {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory: a file, or a page fault handler's socket.
    pub mem: MemorySource,
    /// Resume once loaded.
    pub resume: bool,
    /// TAP overrides.
    pub network_overrides: Vec<NetworkOverride>,
    /// The vsock socket's new path.
    pub vsock_override: Option<PathBuf>,
    /// Advance the kvmclock by the wall-clock time since the snapshot.
    pub clock_realtime: bool,
    /// Track dirty pages (`track_dirty_pages` or its deprecated alias
    /// `enable_diff_snapshots`).
    pub track_dirty_pages: bool,
    /// What backs guest memory; `None` for the snapshot's setting.
    pub huge_pages: Option<crate::config::HugePages>,
}

/// A well-formed request for the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `DELETE /drives/{id}`: unplugs a drive from a running PCI VM.
    DeleteDrive(String),
    /// `DELETE /network-interfaces/{id}`: unplugs an interface from a
    /// running PCI VM.
    DeleteNetworkInterface(String),
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /vsock`.
    PutVsock(VsockConfig),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmStateChange),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoad),
    /// `GET /mmds`.
    GetMmds,
    /// `PUT /mmds`: the whole store.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: a JSON merge patch.
    PatchMmds(serde_json::Value),
    /// `PUT /mmds/config`.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /entropy`.
    PutEntropy(EntropyConfig),
    /// `PUT /balloon`.
    PutBalloon(BalloonConfig),
    /// `PUT /serial`.
    PutSerial(SerialConfig),
    /// `PATCH /balloon`: a new target size.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon`.
    GetBalloon,
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PUT /pmem/{id}`: a virtio-pmem device before the start, or hotplugged
    /// into a running PCI VM.
    PutPmem(PmemConfig),
    /// `PATCH /pmem/{id}`: a running pmem device's rate limiter.
    PatchPmem(PartialPmem),
    /// `DELETE /pmem/{id}`: unplugs a pmem device from a running PCI VM.
    DeletePmem(String),
}

/// `PATCH /pmem/{id}` (Firecracker's `PartialPmem`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialPmem {
    /// The device.
    pub id: String,
    /// Its new rate limiter (none: unchanged).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target size, in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// The new polling interval, in seconds.
    pub stats_polling_interval_s: u16,
}

impl ApiRequest {
    /// Whether this request may only be made before the VM starts.
    pub fn is_pre_boot_only(&self) -> bool {
        matches!(
            self,
            ApiRequest::PutMachineConfig(_)
                | ApiRequest::PatchMachineConfig(_)
                | ApiRequest::PutBootSource(_)
                | ApiRequest::PutLogger(_)
                | ApiRequest::PutMetrics(_)
                | ApiRequest::PutVsock(_)
                | ApiRequest::PutMmdsConfig(_)
                | ApiRequest::PutEntropy(_)
                | ApiRequest::PutBalloon(_)
                | ApiRequest::PutSerial(_)
                | ApiRequest::Action(ActionType::InstanceStart)
                | ApiRequest::LoadSnapshot(_)
        )
    }

    /// Whether this request may only be made once the VM runs.
    pub fn is_runtime_only(&self) -> bool {
        matches!(
            self,
            ApiRequest::PatchDrive(_)
                | ApiRequest::PatchNetworkInterface(_)
                | ApiRequest::DeleteDrive(_)
                | ApiRequest::DeleteNetworkInterface(_)
                | ApiRequest::PatchVm(_)
                | ApiRequest::Action(ActionType::SendCtrlAltDel)
                | ApiRequest::Action(ActionType::FlushMetrics)
                | ApiRequest::CreateSnapshot(_)
                | ApiRequest::PatchBalloon(_)
                | ApiRequest::GetBalloonStats
                | ApiRequest::PatchBalloonStats(_)
                | ApiRequest::PatchPmem(_)
                | ApiRequest::DeletePmem(_)
        )
    }
}

fn bad(message: impl AsRef<str>) -> Response {
    Response::fault(400, message.as_ref())
}

/// Parses a JSON body into `T`, refusing unknown fields, wrong types and
/// anything that is not JSON; the fault names what was wrong.
fn body<T: DeserializeOwned>(req: &Request) -> Result<T, Response> {
    if req.body.is_empty() {
        return Err(bad("The request needs a JSON body; none was sent."));
    }
    serde_json::from_slice(&req.body).map_err(|e| {
        bad(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

fn invalid_path(req: &Request) -> Response {
    let method = match &req.method {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Patch => "PATCH",
        Method::Delete => "DELETE",
        Method::Other(m) => m.as_str(),
    };
    let path: String = req.path.chars().take(100).collect();
    let more = if req.path.chars().count() > 100 {
        "..."
    } else {
        ""
    };
    bad(format!(
        "Invalid request method and/or path: {method} {path}{more}."
    ))
}

/// The ID in the path must be valid and match the body's.
fn check_ids(field: &'static str, path_id: &str, body_id: &str) -> Result<(), Response> {
    config::check_id(field, path_id).map_err(|e| bad(e.to_string()))?;
    if path_id != body_id {
        return Err(bad(format!(
            "The {field} from the path [{path_id}] does not match the {field} from the body [{body_id}]."
        )));
    }
    Ok(())
}

/// Features of Firecracker's API this VMM does not have yet.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("cpu-config", "CPU configuration (/cpu-config)"),
    ("hotplug", "Memory hotplug (/hotplug)"),
];

/// Checks a snapshot load: exactly one memory source, a File backend.
fn parse_load(p: SnapshotLoadParams) -> Result<SnapshotLoad, Response> {
    let mem = match (p.mem_file_path, p.mem_backend) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "too many fields: either `mem_backend` or `mem_file_path` exclusively is required.",
            ))
        }
        (None, None) => {
            return Err(bad(
                "missing field: either `mem_backend` or `mem_file_path` is required; give mem_backend with the memory file.",
            ))
        }
        (Some(path), None) => MemorySource::File(path),
        (None, Some(b)) if b.backend_type == MemoryBackendType::Uffd => {
            MemorySource::Uffd(b.backend_path)
        }
        (None, Some(b)) => MemorySource::File(b.backend_path),
    };
    use crate::config::HugePages;
    let huge_pages = match p.huge_pages {
        None | Some(LoadHugePages::Snapshot) => None,
        Some(LoadHugePages::None) => Some(HugePages::None),
        Some(LoadHugePages::Transparent) => Some(HugePages::Transparent),
        Some(LoadHugePages::Hugetlbfs2M) => Some(HugePages::Hugetlbfs2M),
    };
    Ok(SnapshotLoad {
        snapshot_path: p.snapshot_path,
        mem,
        resume: p.resume_vm.unwrap_or(false),
        network_overrides: p.network_overrides.unwrap_or_default(),
        vsock_override: p.vsock_override.map(|v| v.uds_path),
        clock_realtime: p.clock_realtime.unwrap_or(false),
        // As Firecracker: either name turns tracking on.
        track_dirty_pages: p.track_dirty_pages.unwrap_or(false)
            || p.enable_diff_snapshots.unwrap_or(false),
        huge_pages,
    })
}

/// The deprecated field a request uses, as Firecracker's warning names it
/// ("PUT /machine-config: cpu_template field is deprecated."); such requests
/// are still served, with a `Deprecation: true` header.
pub fn deprecated(req: &Request) -> Option<String> {
    let path = req.path.split('?').next().unwrap_or("");
    let (method, fields): (&str, &[&str]) = match (&req.method, path.trim_end_matches('/')) {
        (Method::Put, "/machine-config") => ("PUT", &["cpu_template"]),
        (Method::Patch, "/machine-config") => ("PATCH", &["cpu_template"]),
        (Method::Put, "/vsock") => ("PUT", &["vsock_id"]),
        (Method::Put, "/snapshot/load") => ("PUT", &["mem_file_path", "enable_diff_snapshots"]),
        _ => return None,
    };
    let body: serde_json::Value = serde_json::from_slice(&req.body).ok()?;
    let field = fields.iter().find(|f| body.get(**f).is_some())?;
    Some(format!("{method} {path}: {field} field is deprecated."))
}

/// Routes and parses one request.
pub fn parse(req: &Request) -> Result<ApiRequest, Response> {
    // A query string is not part of Firecracker's API: ignored.
    let path = req.path.split('?').next().unwrap_or("");
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    if let Some((_, name)) = UNSUPPORTED.iter().find(|(p, _)| parts.first() == Some(p)) {
        return Err(bad(format!("{name} is not supported by this VMM yet.")));
    }
    use ApiRequest::*;
    let r = match (&req.method, parts.as_slice()) {
        (Method::Get, [""]) => GetInstanceInfo,
        (Method::Get, ["version"]) => GetVersion,
        (Method::Get, ["vm", "config"]) => GetVmConfig,
        (Method::Get, ["machine-config"]) => GetMachineConfig,
        (Method::Put, ["machine-config"]) => {
            let m: MachineConfig = body(req)?;
            m.validate().map_err(|e| bad(e.to_string()))?;
            PutMachineConfig(m)
        }
        (Method::Patch, ["machine-config"]) => PatchMachineConfig(body(req)?),
        (Method::Put, ["boot-source"]) => {
            let b: BootSource = body(req)?;
            if b.kernel_image_path.as_os_str().is_empty() {
                return Err(bad("kernel_image_path is empty; give the kernel's path."));
            }
            PutBootSource(b)
        }
        (Method::Put, ["drives", id]) => {
            let d: Drive = body(req)?;
            check_ids("drive_id", id, &d.drive_id)?;
            d.validate().map_err(|e| bad(e.to_string()))?;
            PutDrive(d)
        }
        (Method::Patch, ["drives", id]) => {
            let d: PartialDrive = body(req)?;
            check_ids("drive_id", id, &d.drive_id)?;
            PatchDrive(d)
        }
        (Method::Put, ["network-interfaces", id]) => {
            let n: NetworkInterface = body(req)?;
            check_ids("iface_id", id, &n.iface_id)?;
            n.validate().map_err(|e| bad(e.to_string()))?;
            PutNetworkInterface(n)
        }
        (Method::Delete, ["drives", id]) => {
            config::check_id("drive_id", id).map_err(|e| bad(e.to_string()))?;
            DeleteDrive(id.to_string())
        }
        (Method::Delete, ["network-interfaces", id]) => {
            config::check_id("iface_id", id).map_err(|e| bad(e.to_string()))?;
            DeleteNetworkInterface(id.to_string())
        }
        (Method::Put, ["pmem", id]) => {
            let p: PmemConfig = body(req)?;
            check_ids("id", id, &p.id)?;
            p.validate().map_err(|e| bad(e.to_string()))?;
            PutPmem(p)
        }
        (Method::Patch, ["pmem", id]) => {
            let p: PartialPmem = body(req)?;
            check_ids("id", id, &p.id)?;
            PatchPmem(p)
        }
        (Method::Delete, ["pmem", id]) => {
            config::check_id("id", id).map_err(|e| bad(e.to_string()))?;
            DeletePmem(id.to_string())
        }
        (Method::Patch, ["network-interfaces", id]) => {
            let n: PartialNetworkInterface = body(req)?;
            check_ids("iface_id", id, &n.iface_id)?;
            PatchNetworkInterface(n)
        }
        (Method::Put, ["logger"]) => {
            let l: LoggerConfig = body(req)?;
            if let Some(level) = &l.level {
                crate::logger::parse_level(level).map_err(|e| bad(e.to_string()))?;
            }
            PutLogger(l)
        }
        (Method::Put, ["metrics"]) => PutMetrics(body(req)?),
        (Method::Put, ["vsock"]) => {
            let v: VsockConfig = body(req)?;
            v.validate().map_err(|e| bad(e.to_string()))?;
            PutVsock(v)
        }
        (Method::Put, ["entropy"]) => PutEntropy(body(req)?),
        (Method::Put, ["balloon"]) => PutBalloon(body(req)?),
        (Method::Put, ["serial"]) => PutSerial(body(req)?),
        (Method::Patch, ["balloon"]) => PatchBalloon(body(req)?),
        (Method::Get, ["balloon"]) => GetBalloon,
        (Method::Get, ["balloon", "statistics"]) => GetBalloonStats,
        (Method::Patch, ["balloon", "statistics"]) => PatchBalloonStats(body(req)?),
        (_, ["balloon", "hinting", ..]) => {
            return Err(bad(
                "Free page hinting is not supported by this VMM yet; inflate the balloon with PATCH /balloon instead.",
            ))
        }
        (Method::Get, ["mmds"]) => GetMmds,
        (Method::Put, ["mmds"]) => PutMmds(body(req)?),
        (Method::Patch, ["mmds"]) => PatchMmds(body(req)?),
        (Method::Put, ["mmds", "config"]) => {
            let c: MmdsConfig = body(req)?;
            c.validate().map_err(|e| bad(e.to_string()))?;
            PutMmdsConfig(c)
        }
        (Method::Put, ["actions"]) => Action(body::<ActionInfo>(req)?.action_type),
        (Method::Patch, ["vm"]) => PatchVm(body::<VmInfo>(req)?.state),
        (Method::Put, ["snapshot", "create"]) => {
            CreateSnapshot(body(req)?)
        }
        (Method::Put, ["snapshot", "load"]) => LoadSnapshot(parse_load(body(req)?)?),
        _ => return Err(invalid_path(req)),
    };
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, path: &str, body: &str) -> Request {
        Request {
            method,
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn fault(r: Result<ApiRequest, Response>) -> String {
        let resp = r.expect_err("a 400");
        assert_eq!(resp.status, 400);
        let v: serde_json::Value = serde_json::from_slice(&resp.body.unwrap()).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn every_endpoint_parses() {
        use Method::*;
        for (m, p, b, want) in [
            (Get, "/", "", ApiRequest::GetInstanceInfo),
            (Get, "/version", "", ApiRequest::GetVersion),
            (Get, "/vm/config", "", ApiRequest::GetVmConfig),
            (Get, "/machine-config", "", ApiRequest::GetMachineConfig),
            (
                Put,
                "/actions",
                r#"{"action_type": "InstanceStart"}"#,
                ApiRequest::Action(ActionType::InstanceStart),
            ),
            (
                Put,
                "/actions",
                r#"{"action_type": "SendCtrlAltDel"}"#,
                ApiRequest::Action(ActionType::SendCtrlAltDel),
            ),
            (
                Put,
                "/actions",
                r#"{"action_type": "FlushMetrics"}"#,
                ApiRequest::Action(ActionType::FlushMetrics),
            ),
            (
                Patch,
                "/vm",
                r#"{"state": "Paused"}"#,
                ApiRequest::PatchVm(VmStateChange::Paused),
            ),
            (
                Patch,
                "/vm/",
                r#"{"state": "Resumed"}"#,
                ApiRequest::PatchVm(VmStateChange::Resumed),
            ),
        ] {
            assert_eq!(parse(&req(m, p, b)).unwrap(), want, "{p} {b}");
        }
        let r = parse(&req(
            Put,
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        ))
        .unwrap();
        assert!(
            matches!(r, ApiRequest::PutMachineConfig(m) if m.vcpu_count == 2 && m.mem_size_mib == 256)
        );
        let r = parse(&req(Patch, "/machine-config", r#"{"mem_size_mib": 64}"#)).unwrap();
        assert!(matches!(r, ApiRequest::PatchMachineConfig(m) if m.mem_size_mib == Some(64)));
        let r = parse(&req(
            Put,
            "/boot-source",
            r#"{"kernel_image_path": "k", "boot_args": "console=ttyS0"}"#,
        ))
        .unwrap();
        assert!(
            matches!(r, ApiRequest::PutBootSource(b) if b.boot_args.as_deref() == Some("console=ttyS0"))
        );
        let r = parse(&req(Put, "/drives/rootfs", r#"{"drive_id": "rootfs", "path_on_host": "r.img", "is_root_device": true, "is_read_only": false}"#)).unwrap();
        assert!(matches!(r, ApiRequest::PutDrive(d) if d.is_root_device));
        let r = parse(&req(
            Patch,
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "r2.img"}"#,
        ))
        .unwrap();
        assert!(matches!(r, ApiRequest::PatchDrive(d) if d.path_on_host.is_some()));
        let r = parse(&req(
            Put,
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#,
        ))
        .unwrap();
        assert!(matches!(r, ApiRequest::PutNetworkInterface(n) if n.host_dev_name == "tap0"));
        let r = parse(&req(
            Patch,
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#,
        ))
        .unwrap();
        assert!(matches!(r, ApiRequest::PatchNetworkInterface(_)));
        let r = parse(&req(Put, "/logger", r#"{"log_path": "l.log", "level": "Warning", "show_level": true, "show_log_origin": false}"#)).unwrap();
        assert!(matches!(r, ApiRequest::PutLogger(_)));
        let r = parse(&req(Put, "/metrics", r#"{"metrics_path": "m.json"}"#)).unwrap();
        assert!(matches!(r, ApiRequest::PutMetrics(_)));
    }

    #[test]
    fn deprecated_fields_are_named_as_firecracker_names_them() {
        use Method::*;
        let d = |m: Method, p: &str, b: &str| deprecated(&req(m, p, b));
        assert_eq!(
            d(
                Put,
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"}"#
            ),
            Some("PUT /machine-config: cpu_template field is deprecated.".into())
        );
        assert_eq!(
            d(Patch, "/machine-config", r#"{"cpu_template": "None"}"#),
            Some("PATCH /machine-config: cpu_template field is deprecated.".into())
        );
        assert!(d(
            Put,
            "/vsock",
            r#"{"vsock_id": "v", "guest_cid": 3, "uds_path": "v"}"#
        )
        .is_some());
        assert!(d(
            Put,
            "/snapshot/load",
            r#"{"snapshot_path": "s", "mem_file_path": "m"}"#
        )
        .is_some());
        assert_eq!(
            d(
                Put,
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128}"#
            ),
            None
        );
        assert_eq!(d(Put, "/vsock", "{"), None);
    }

    #[test]
    fn bad_requests_get_a_fault_message_naming_the_problem() {
        use Method::*;
        for (m, p, b, want) in [
            (Put, "/machine-config", "{", "deserializing the json body"),
            (Put, "/machine-config", "", "needs a JSON body"),
            (
                Put,
                "/machine-config",
                r#"{"vcpu_count": "2", "mem_size_mib": 256}"#,
                "invalid type",
            ),
            (
                Put,
                "/machine-config",
                r#"{"vcpu_count": 2}"#,
                "missing field `mem_size_mib`",
            ),
            (
                Put,
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "gpu": 1}"#,
                "unknown field `gpu`",
            ),
            (
                Put,
                "/machine-config",
                r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
                "vcpu_count 0",
            ),
            (
                Put,
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 256, "cpu_template": "Z9"}"#,
                "cpu_template 'Z9'",
            ),
            (
                Put,
                "/drives/a",
                r#"{"drive_id": "b", "path_on_host": "x", "is_root_device": false}"#,
                "does not match",
            ),
            (
                Put,
                "/drives/a-b",
                r#"{"drive_id": "a-b", "path_on_host": "x", "is_root_device": false}"#,
                "drive_id 'a-b' is invalid",
            ),
            (
                Put,
                "/drives/a",
                r#"{"drive_id": "a", "path_on_host": "x"}"#,
                "missing field `is_root_device`",
            ),
            (
                Put,
                "/drives/a",
                r#"{"drive_id": "a", "path_on_host": "x", "is_root_device": false, "cache_type": "Fast"}"#,
                "unknown variant `Fast`",
            ),
            (
                Put,
                "/network-interfaces/e",
                r#"{"iface_id": "f", "host_dev_name": "t"}"#,
                "does not match",
            ),
            (
                Put,
                "/network-interfaces/e",
                r#"{"iface_id": "e", "host_dev_name": "t", "guest_mac": "nope"}"#,
                "guest_mac 'nope'",
            ),
            (
                Put,
                "/actions",
                r#"{"action_type": "Reboot"}"#,
                "unknown variant `Reboot`",
            ),
            (
                Put,
                "/actions",
                r#"{"action_type": 7}"#,
                "deserializing the json body",
            ),
            (
                Patch,
                "/vm",
                r#"{"state": "Running"}"#,
                "unknown variant `Running`",
            ),
            (
                Put,
                "/boot-source",
                r#"{"kernel_image_path": ""}"#,
                "kernel_image_path is empty",
            ),
            (Put, "/logger", r#"{"level": "Loud"}"#, "'Loud'"),
            (
                Put,
                "/boot-source",
                "\u{0}\u{1}garbage",
                "deserializing the json body",
            ),
            (
                Get,
                "/nope",
                "",
                "Invalid request method and/or path: GET /nope.",
            ),
            (Put, "/", "{}", "Invalid request method and/or path: PUT /."),
            (Other("POST".into()), "/actions", "{}", "POST /actions"),
            (
                Put,
                "/mmds",
                "{",
                "An error occurred when deserializing the json body of a request: EOF",
            ),
            (
                Put,
                "/mmds/config",
                r#"{"network_interfaces": []}"#,
                "forwarding MMDS requests is empty",
            ),
            (
                Put,
                "/mmds/config",
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.9"}"#,
                "169.254.0.9 is not a valid link-local address",
            ),
            (
                Put,
                "/mmds/config",
                r#"{"network_interfaces": ["eth0"], "version": "V3"}"#,
                "unknown variant `V3`",
            ),
            (Put, "/balloon", "{}", "missing field `amount_mib`"),
            (Patch, "/balloon/hinting/start", "{}", "Free page hinting"),
            (
                Put,
                "/snapshot/create",
                r#"{"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Incremental"}"#,
                "unknown variant `Incremental`, expected `Full` or `Diff`",
            ),
            (
                Put,
                "/snapshot/create",
                r#"{"snapshot_path": "s"}"#,
                "missing field `mem_file_path`",
            ),
            (
                Put,
                "/snapshot/load",
                r#"{"snapshot_path": "s"}"#,
                "either `mem_backend` or `mem_file_path` is required",
            ),
            (
                Put,
                "/snapshot/load",
                r#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
                "exclusively is required",
            ),
            (
                Put,
                "/snapshot/load",
                r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Pipe", "backend_path": "u"}}"#,
                "unknown variant `Pipe`",
            ),
            (
                Put,
                "/snapshot/load",
                r#"{"snapshot_path": "s", "mem_file_path": "m", "huge_pages": "1G"}"#,
                "unknown variant `1G`",
            ),
            (Put, "/vsock", "{}", "missing field"),
            (
                Put,
                "/vsock",
                r#"{"guest_cid": 1, "uds_path": "/v.sock"}"#,
                "guest_cid 1 is reserved",
            ),
            (
                Put,
                "/entropy",
                r#"{"rate_limiter": {"bytes": {}}}"#,
                "unknown field `bytes`",
            ),
        ] {
            let f = fault(parse(&req(m.clone(), p, b)));
            assert!(f.contains(want), "{m:?} {p} {b}: {f}");
        }
        let f = fault(parse(&req(Get, &format!("/{}", "x".repeat(5000)), "")));
        assert!(f.len() < 200 && f.contains("..."), "{f}");
        let f = fault(parse(&Request {
            method: Method::Put,
            path: "/actions".into(),
            body: vec![0xff, 0xfe, b'{'],
        }));
        assert!(f.contains("deserializing the json body"), "{f}");
    }

    #[test]
    fn a_uffd_backend_names_the_handler_socket() {
        let body = r#"{"snapshot_path": "vm.snap",
            "mem_backend": {"backend_type": "Uffd", "backend_path": "/run/uffd.sock"}}"#;
        let Ok(ApiRequest::LoadSnapshot(l)) = parse(&req(Method::Put, "/snapshot/load", body))
        else {
            panic!("not a load");
        };
        assert_eq!(l.mem, MemorySource::Uffd("/run/uffd.sock".into()));
    }

    #[test]
    fn a_firecracker_1_16_snapshot_load_is_understood_whole() {
        let body = r#"{"snapshot_path": "vm.snap",
            "mem_backend": {"backend_type": "File", "backend_path": "vm.mem"},
            "resume_vm": true, "track_dirty_pages": false,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
            "vsock_override": {"uds_path": "/run/v.sock"}, "clock_realtime": true}"#;
        let Ok(ApiRequest::LoadSnapshot(l)) = parse(&req(Method::Put, "/snapshot/load", body))
        else {
            panic!("not a load");
        };
        assert_eq!(
            l,
            SnapshotLoad {
                snapshot_path: "vm.snap".into(),
                mem: MemorySource::File("vm.mem".into()),
                resume: true,
                network_overrides: vec![NetworkOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: "tap7".into()
                }],
                vsock_override: Some("/run/v.sock".into()),
                clock_realtime: true,
                track_dirty_pages: false,
                huge_pages: None,
            }
        );
    }

    #[test]
    fn firecracker_python_s_load_with_enable_diff_snapshots_turns_tracking_on() {
        // What firecracker-python's restore sends (the deprecated alias).
        let body = r#"{"enable_diff_snapshots": true,
            "mem_backend": {"backend_type": "File", "backend_path": "vm.mem"},
            "snapshot_path": "vm.snap", "resume_vm": true,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap0"}]}"#;
        let r = req(Method::Put, "/snapshot/load", body);
        let Ok(ApiRequest::LoadSnapshot(l)) = parse(&r) else {
            panic!("not a load");
        };
        assert!(l.track_dirty_pages && l.resume);
        assert_eq!(
            deprecated(&r).as_deref(),
            Some("PUT /snapshot/load: enable_diff_snapshots field is deprecated.")
        );
        let body = r#"{"snapshot_path": "s", "mem_file_path": "m", "huge_pages": "2M"}"#;
        let Ok(ApiRequest::LoadSnapshot(l)) = parse(&req(Method::Put, "/snapshot/load", body))
        else {
            panic!("not a load");
        };
        assert_eq!(l.huge_pages, Some(crate::config::HugePages::Hugetlbfs2M));
        // A Diff is a snapshot type like Full.
        let body = r#"{"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Diff"}"#;
        let Ok(ApiRequest::CreateSnapshot(c)) = parse(&req(Method::Put, "/snapshot/create", body))
        else {
            panic!("not a create");
        };
        assert_eq!(c.snapshot_type, Some(SnapshotType::Diff));
    }

    #[test]
    fn pre_boot_and_runtime_only_requests_are_classified() {
        assert!(ApiRequest::Action(ActionType::InstanceStart).is_pre_boot_only());
        assert!(ApiRequest::PutBootSource(BootSource::default()).is_pre_boot_only());
        assert!(ApiRequest::PatchVm(VmStateChange::Paused).is_runtime_only());
        assert!(ApiRequest::Action(ActionType::SendCtrlAltDel).is_runtime_only());
        assert!(
            ApiRequest::Action(ActionType::FlushMetrics).is_runtime_only(),
            "as in Firecracker"
        );
        assert!(!ApiRequest::GetVmConfig.is_pre_boot_only());
    }
}
