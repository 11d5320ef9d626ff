//! The `Vmm`: one VM's lifecycle as a state machine (Not started → Running ⇄
//! Paused → Exited), owning its configuration, and once started its KVM VM,
//! memory, devices and vCPU handles. The event loop thread drives it; nothing
//! else touches it (the API thread sends requests through a channel).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::path::Path;

use devices::persist::Persist;

use crate::builder::{self, MicroVm};
use crate::config::VmConfig;
use crate::device_manager::{DeviceManager, VirtioKind};
use crate::exit::{ExitSignal, VmExit};
use crate::runtime::{self, EventLoop};
use crate::snapshot::{self, MicrovmState};
use crate::vstate::vcpu::{self, VcpuContext, VcpuEvent, VcpuHandle, VcpuResponse};
use crate::vstate::vcpu_state::VcpuState as VcpuStateData;
use crate::vstate::vm;
use crate::vstate::vm::VmKvmState;
use devices::memory::GuestMemoryMmap;

/// How long a vCPU gets to answer a pause or resume.
const VCPU_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Configured (or being configured), not booted.
    NotStarted,
    /// vCPUs run guest code; devices process their queues.
    Running,
    /// No vCPU runs guest code; devices leave their queues alone.
    Paused,
    /// The guest ended or the VMM stopped it; nothing runs.
    Exited,
}

impl VmState {
    /// The name Firecracker's `GET /` uses ("Not started", "Running", "Paused").
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Exited => "Exited",
        }
    }
}

/// What a caller asked the VM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Boot it.
    Start,
    /// Stop its vCPUs and devices.
    Pause,
    /// Let them run again.
    Resume,
    /// Act on the running guest (e.g. Ctrl-Alt-Del, drive update).
    RuntimeCall,
    /// Change the configuration that boot uses.
    Configure,
}

/// The state a VM goes to on `action` from `from`, or why it cannot.
/// Pause while paused and resume while running are accepted and change
/// nothing, as Firecracker does.
pub fn transition(from: VmState, action: Action) -> Result<VmState, &'static str> {
    use Action::*;
    use VmState::*;
    match (from, action) {
        (NotStarted, Start) => Ok(Running),
        (NotStarted, Configure) => Ok(NotStarted),
        (Running | Paused, Pause) => Ok(Paused),
        (Running | Paused, Resume) => Ok(Running),
        (Running | Paused, RuntimeCall) => Ok(from),
        (NotStarted, Pause | Resume | RuntimeCall) => {
            Err("the microVM is not started yet; boot it with InstanceStart first")
        }
        (Running | Paused, Start) => Err("the microVM is already started"),
        (Running | Paused, Configure) => {
            Err("this configuration can only change before the microVM starts")
        }
        (Exited, _) => Err("the microVM has exited"),
    }
}

/// Errors driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A transition the state machine refuses.
    #[error("Cannot {action:?} while the microVM is {state}: {reason}.", state = .from.as_str())]
    Transition {
        from: VmState,
        action: Action,
        reason: &'static str,
    },
    /// Building the VM failed.
    #[error(transparent)]
    Build(#[from] builder::Error),
    /// A vCPU thread could not start.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// A vCPU did not answer a pause or resume.
    #[error("vCPU {0} did not answer within 5 s.")]
    VcpuTimeout(u32),
    /// The event loop could not watch a device.
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
    /// A device could not be placed.
    #[error(transparent)]
    Devices(#[from] crate::device_manager::Error),
    /// A snapshot cannot be taken or loaded.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// The serial output cannot be opened.
    #[error(transparent)]
    Serial(crate::serial::Error),
    /// The VMM thread's seccomp filter cannot be installed.
    #[error(transparent)]
    Seccomp(crate::seccomp::Error),
}

/// How a snapshot is loaded (Firecracker's `PUT /snapshot/load` options).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Resume the VM once loaded (else it stays Paused).
    pub resume: bool,
    /// (iface_id, TAP) pairs: the TAP of this host for an interface.
    pub network_overrides: Vec<(String, String)>,
    /// A new socket path for the vsock device.
    pub vsock_override: Option<std::path::PathBuf>,
    /// Advance the kvmclock by the wall-clock time since the snapshot.
    pub clock_realtime: bool,
    /// Track dirty pages on the restored VM (for Diff snapshots of it).
    pub track_dirty_pages: bool,
    /// What backs guest memory; `None` for the snapshot's setting.
    pub huge_pages: Option<crate::config::HugePages>,
}

/// The console output, shared so that a failed start does not lose it.
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// A started VM's parts.
struct Started {
    // Dropped last: the VM fd outlives the vCPU threads and devices.
    devices: DeviceManager,
    vcpus: Vec<VcpuHandle>,
    mem: GuestMemoryMmap,
    vm: vm::Vm,
}

/// One VM and its lifecycle.
pub struct Vmm {
    state: VmState,
    config: VmConfig,
    exit: Arc<ExitSignal>,
    started_at: Instant,
    serial_out: SharedWriter,
    devices_paused: Arc<AtomicBool>,
    boot_timer: bool,
    /// Something was configured (a snapshot can then no longer be loaded).
    configured: bool,
    /// The userfaultfd behind restored guest memory (Uffd backend).
    uffd: Option<std::os::fd::OwnedFd>,
    /// The `serial` configuration was applied to the console output (once:
    /// a failed start may be retried).
    serial_applied: bool,
    /// The vsock socket bound at `PUT /vsock`, for the start to use.
    vsock_backend: Option<devices::virtio::vsock::muxer::Muxer>,
    /// The metadata store (`/mmds`), served to the guest on the interfaces
    /// `mmds-config` names.
    mmds: devices::mmds::SharedMmds,
    started: Option<Started>,
}

impl Vmm {
    /// A VM not started yet, whose console output will go to `serial_out`.
    /// `started_at` is when the process started (for timing traces).
    pub fn new(
        config: VmConfig,
        exit: Arc<ExitSignal>,
        serial_out: Box<dyn Write + Send>,
        started_at: Instant,
    ) -> Self {
        let mmds = Arc::new(Mutex::new(devices::mmds::Mmds::new(
            builder::DEFAULT_MMDS_LIMIT,
        )));
        crate::metrics::report_mmds(&mmds);
        Vmm {
            state: VmState::NotStarted,
            config,
            exit,
            started_at,
            serial_out: SharedWriter(Arc::new(Mutex::new(serial_out))),
            devices_paused: Arc::new(AtomicBool::new(false)),
            boot_timer: false,
            configured: false,
            serial_applied: false,
            uffd: None,
            vsock_backend: None,
            mmds,
            started: None,
        }
    }

    /// The metadata store.
    pub fn mmds(&self) -> &devices::mmds::SharedMmds {
        &self.mmds
    }

    /// Binds the socket of the configured vsock device now (Firecracker binds
    /// it at `PUT /vsock`), after removing the one an earlier call bound. If
    /// the bind fails the VM is left with no vsock device, as in Firecracker.
    pub fn bind_vsock(&mut self) -> Result<(), Error> {
        drop(self.vsock_backend.take());
        let Some(v) = &self.config.vsock else {
            return Ok(());
        };
        match devices::virtio::vsock::muxer::Muxer::new(u64::from(v.guest_cid), &v.uds_path) {
            Ok(m) => {
                self.vsock_backend = Some(m);
                Ok(())
            }
            Err(e) => {
                self.config.vsock = None;
                Err(Error::Build(crate::device_kinds::Error::from(e).into()))
            }
        }
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The configuration (what GET /vm/config returns).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The configuration, to change before boot.
    pub fn config_mut(&mut self) -> Result<&mut VmConfig, Error> {
        self.check(Action::Configure)?;
        Ok(&mut self.config)
    }

    /// Whether a snapshot load would be tried now (nothing started, no boot
    /// resource configured): one that then fails ends the VMM, as in
    /// Firecracker, since it may have left the VM half built.
    pub fn snapshot_loadable(&self) -> bool {
        self.state == VmState::NotStarted && !self.configured
    }

    /// Records that a boot resource (boot source, machine, drive, network
    /// interface) was configured: a snapshot can no longer be loaded, as in
    /// Firecracker. Logger and metrics do not count.
    pub fn mark_boot_configured(&mut self) {
        self.configured = true;
    }

    /// Records a change a runtime call made (e.g. a drive's new image), so that
    /// GET /vm/config shows it.
    pub fn config_runtime_update(&mut self, change: impl FnOnce(&mut VmConfig)) {
        change(&mut self.config);
    }

    /// Hotplug (Firecracker 1.16's, on a running PCI VM): adds the device
    /// `add` puts into the configuration, opened and plugged into a free PCI
    /// slot, its queues watched by `el`. The guest finds it after a rescan
    /// of its PCI bus. The message says why not, in Firecracker's words
    /// where it has them.
    pub fn hotplug(
        &mut self,
        el: &mut EventLoop,
        add: impl FnOnce(&mut VmConfig) -> Result<(), String>,
    ) -> Result<(), String> {
        if !self.config.pci {
            return Err("PCI is not enabled: devices can be added to a running VM only on PCI; start vmm with --enable-pci.".into());
        }
        let Some(s) = self.started.as_mut() else {
            return Err(
                "The requested operation is not supported before starting the microVM.".into(),
            );
        };
        let mut config = self.config.clone();
        add(&mut config)?;
        config.validate().map_err(|e| e.to_string())?;
        // Only the new device, opened as at the start (its rate limiter,
        // the metadata service's interfaces).
        let mut one = VmConfig {
            drives: added(&config.drives, &self.config.drives, |d| &d.drive_id),
            network_interfaces: added(
                &config.network_interfaces,
                &self.config.network_interfaces,
                |n| &n.iface_id,
            ),
            pmem: added(&config.pmem, &self.config.pmem, |p| &p.id),
            mmds_config: config.mmds_config.clone(),
            ..VmConfig::default()
        };
        one.pci = true;
        let mut opening = crate::device_kinds::Opening {
            config: &one,
            mmds: &self.mmds,
            vsock: None,
        };
        let opened = crate::device_kinds::open_all(&mut opening).map_err(|e| e.to_string())?;
        for (names, device) in opened {
            let label = names.2.clone();
            s.devices
                .attach_virtio(&s.vm, &s.mem, names, device, None)
                .map_err(|e| e.to_string())?;
            let entry = s
                .devices
                .virtio
                .last_mut()
                .ok_or("the device was not attached")?;
            if let Err(e) = el.watch_device(entry, self.devices_paused.clone()) {
                let (kind, id) = (entry.kind, entry.id.clone());
                let _ = s.devices.detach_pci(&s.vm, kind, &id);
                return Err(e.to_string());
            }
            log::info!("{label}: plugged into PCI");
        }
        self.config = config;
        Ok(())
    }

    /// Hot-unplug: removes the device of `kind` with `id` from a running
    /// PCI VM once the guest has released it (its driver reset it).
    pub fn unplug(&mut self, el: &mut EventLoop, kind: VirtioKind, id: &str) -> Result<(), String> {
        if !self.config.pci {
            return Err("PCI is not enabled: devices can be removed from a running VM only on PCI; start vmm with --enable-pci.".into());
        }
        let Some(s) = self.started.as_mut() else {
            return Err(
                "The requested operation is not supported before starting the microVM.".into(),
            );
        };
        let root = match kind {
            VirtioKind::Block => self
                .config
                .drives
                .iter()
                .any(|d| d.drive_id == id && d.is_root_device),
            VirtioKind::Pmem => self.config.pmem.iter().any(|p| p.id == id && p.root_device),
            _ => false,
        };
        if root {
            return Err(format!(
                "Cannot unplug root device: '{id}' is the root device."
            ));
        }
        let entry = s.devices.detach_pci(&s.vm, kind, id)?;
        if let Some(watch) = entry.watch {
            el.unwatch(watch);
        }
        log::info!("{}: unplugged", entry.label);
        drop(entry);
        match kind {
            VirtioKind::Block => self.config.drives.retain(|d| d.drive_id != id),
            VirtioKind::Net => self.config.network_interfaces.retain(|n| n.iface_id != id),
            VirtioKind::Pmem => self.config.pmem.retain(|p| p.id != id),
            _ => {}
        }
        Ok(())
    }

    /// Adds the boot timer device when the VM starts: the guest's write of
    /// 123 at its address logs the boot time.
    pub fn set_boot_timer(&mut self, on: bool) {
        self.boot_timer = on;
    }

    /// `--enable-pci`: virtio devices are PCI functions.
    pub fn set_pci(&mut self, on: bool) {
        self.config.pci = on;
    }

    /// Whether a booted VM gets a VM generation ID device and a restored
    /// one a new ID (on unless `--no-vmgenid`).
    pub fn set_vmgenid(&mut self, on: bool) {
        self.config.no_vmgenid = !on;
    }

    /// The signal through which the VM's end is reported.
    pub fn exit_signal(&self) -> &Arc<ExitSignal> {
        &self.exit
    }

    /// The devices of a started VM.
    pub fn devices(&self) -> Option<&DeviceManager> {
        self.started.as_ref().map(|s| &s.devices)
    }

    fn check(&self, action: Action) -> Result<VmState, Error> {
        transition(self.state, action).map_err(|reason| Error::Transition {
            from: self.state,
            action,
            reason,
        })
    }

    /// Builds the VM from its configuration and starts it.
    pub fn start(&mut self, el: &mut EventLoop) -> Result<(), Error> {
        self.check(Action::Start)?;
        if let (Some(s), false) = (&self.config.serial, self.serial_applied) {
            let mut current = self.serial_out.0.lock().unwrap_or_else(|e| e.into_inner());
            crate::serial::apply(s, &mut current).map_err(Error::Serial)?;
            self.serial_applied = true;
        }
        // A clone: a start that fails keeps the console for the next one.
        let out = Box::new(self.serial_out.clone());
        let built = builder::build_with(
            &self.config,
            out,
            self.exit.clone(),
            self.started_at,
            self.vsock_backend.take(),
            &self.mmds,
        )?;
        self.start_built(built, el)
    }

    /// Starts a VM that is already built: its devices join the event loop,
    /// then its vCPU threads start.
    pub fn start_built(&mut self, built: MicroVm, el: &mut EventLoop) -> Result<(), Error> {
        self.check(Action::Start)?;
        self.launch(built, el, false)
    }

    /// Restores a VM from a snapshot's state file and its memory (a file, or
    /// a page fault handler; only before anything was configured, as in
    /// Firecracker), Running if `options.resume`, else Paused.
    pub fn load_snapshot(
        &mut self,
        snapshot: &Path,
        mem_file: &snapshot::MemorySource,
        options: &RestoreOptions,
        el: &mut EventLoop,
    ) -> Result<(), Error> {
        self.check(Action::Start)?;
        let refuse = |why: String| Err(Error::Snapshot(snapshot::Error::State(why)));
        if self.configured {
            return refuse("Loading a microVM snapshot not allowed after configuring boot-specific resources; start a fresh vmm to load it.".into());
        }
        // The console as PUT /serial set it (the one setting a snapshot
        // load keeps from before it, as in Firecracker).
        if let (Some(s), false) = (&self.config.serial, self.serial_applied) {
            let mut current = self.serial_out.0.lock().unwrap_or_else(|e| e.into_inner());
            crate::serial::apply(s, &mut current).map_err(Error::Serial)?;
            self.serial_applied = true;
        }
        let serial = self.config.serial.clone();
        let (_, mut state): (_, MicrovmState) =
            snapshot::format::read(snapshot).map_err(snapshot::Error::from)?;
        for (iface, tap) in &options.network_overrides {
            let Some(n) = state
                .config
                .network_interfaces
                .iter_mut()
                .find(|n| &n.iface_id == iface)
            else {
                return refuse(format!(
                    "The snapshot has no network interface '{iface}'; network_overrides can only name its interfaces."
                ));
            };
            n.host_dev_name = tap.clone();
        }
        if let Some(path) = &options.vsock_override {
            let Some(v) = state.config.vsock.as_mut() else {
                return refuse(
                    "Unknown Vsock Device: the snapshot has no vsock device; vsock_override only renames the socket of one."
                        .into(),
                );
            };
            v.uds_path = path.clone();
        }
        state.config.machine_config.track_dirty_pages = options.track_dirty_pages;
        state.config.no_vmgenid = self.config.no_vmgenid;
        if let Some(h) = options.huge_pages {
            state.config.machine_config.huge_pages = h;
        }
        let out = Box::new(self.serial_out.clone());
        // As Firecracker: the snapshot's devices come back on the transport
        // they were saved on, whether this process was started with
        // --enable-pci or not.
        if state.pci != self.config.pci {
            log::info!(
                "the snapshot's virtio devices are on {}: restored so, whatever --enable-pci says",
                if state.pci { "PCI" } else { "virtio-mmio" }
            );
        }
        let built = builder::build_from_snapshot(
            &state,
            options.clock_realtime,
            mem_file,
            out,
            self.exit.clone(),
            self.started_at,
            &self.mmds,
        )?;
        self.config = built.config.clone();
        if serial.is_some() {
            self.config.serial = serial;
        }
        self.launch(built, el, !options.resume)?;
        if let Some(s) = &self.started {
            s.devices.kick_restored();
        }
        if !options.resume {
            self.devices_paused.store(true, Ordering::SeqCst);
            self.state = VmState::Paused;
        }
        Ok(())
    }

    /// Saves the paused VM: devices first, then the KVM state (vCPUs on
    /// their own threads), then guest memory to `mem_file`, then the state
    /// file.
    pub fn create_snapshot(
        &self,
        snapshot_path: &Path,
        mem_file: &Path,
        kind: snapshot::Kind,
    ) -> Result<(), Error> {
        if self.state != VmState::Paused {
            return Err(Error::Snapshot(snapshot::Error::State(
                "Operation not allowed: save/restore unavailable while running; pause the microVM first (PATCH /vm {\"state\": \"Paused\"}).".into(),
            )));
        }
        let Some(s) = &self.started else {
            return Err(Error::Snapshot(snapshot::Error::State(
                "The microVM is not started.".into(),
            )));
        };
        if snapshot_path == mem_file {
            return Err(Error::Snapshot(snapshot::Error::State(
                "snapshot_path and mem_file_path are the same file; give two paths.".into(),
            )));
        }
        let virtio = s.devices.save_virtio()?;
        let serial = s
            .devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        let i8042 = s
            .devices
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        let (vm, vcpus) = self
            .save_kvm_state()
            .map_err(|e| Error::Snapshot(snapshot::Error::State(e)))?;
        let (memory, mem_pending) =
            snapshot::diff::save_memory_of_kind(&s.vm, &s.mem, mem_file, kind)?;
        let state = MicrovmState {
            config: self.config.clone(),
            memory,
            vm,
            vcpus,
            serial,
            i8042,
            virtio,
            pci: s.devices.pci_enabled(),
            vmgenid: s.devices.vmgenid.is_some(),
        };
        // Both files are complete before either replaces what was there: a
        // failed snapshot leaves the old files as they were.
        let state_pending =
            snapshot::format::prepare(snapshot_path, &state).map_err(snapshot::Error::from)?;
        if let Some(pending) = mem_pending {
            pending
                .commit()
                .map_err(|err| snapshot::Error::MemoryFile {
                    what: "write",
                    path: mem_file.display().to_string(),
                    err,
                })?;
        }
        state_pending.commit().map_err(|err| {
            snapshot::Error::Format(snapshot::format::Error::Io {
                what: "write",
                path: snapshot_path.display().to_string(),
                err,
            })
        })?;
        Ok(())
    }

    fn launch(&mut self, built: MicroVm, el: &mut EventLoop, paused: bool) -> Result<(), Error> {
        let MicroVm {
            vm,
            mem,
            vcpus,
            mut devices,
            started,
            uffd,
            ..
        } = built;
        self.uffd = uffd;
        if self.boot_timer {
            devices.add_boot_timer(started)?;
        }
        el.watch_devices(&mut devices, self.devices_paused.clone())?;
        let ctx = VcpuContext {
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            mem: mem.clone(),
            exit: self.exit.clone(),
            started,
            start_paused: paused,
        };
        let mut handles = Vec::with_capacity(vcpus.len());
        let mut result = Ok(());
        for vcpu in vcpus {
            match vcpu.start(ctx.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.started = Some(Started {
            devices,
            vcpus: handles,
            mem,
            vm,
        });
        self.state = VmState::Running;
        if let Err(e) = result {
            self.shutdown();
            return Err(e.into());
        }
        // The vCPUs run under their own filters; this thread, which serves
        // the devices from here on, under the VMM role's (as Firecracker,
        // after the vCPUs started, so that they do not inherit it).
        if let Err(e) = crate::seccomp::apply(crate::seccomp::Role::Vmm) {
            self.shutdown();
            return Err(Error::Seccomp(e));
        }
        Ok(())
    }

    /// Pauses every vCPU (acknowledged once each is out of KVM_RUN) and stops
    /// device queue processing. If a vCPU does not answer, the VM is resumed
    /// and stays Running, and the error says which vCPU.
    pub fn pause(&mut self) -> Result<(), Error> {
        let to = self.check(Action::Pause)?;
        self.devices_paused.store(true, Ordering::SeqCst);
        if let Err(e) = self.signal_vcpus(VcpuEvent::Pause, VcpuResponse::Paused) {
            let _ = self.signal_vcpus(VcpuEvent::Resume, VcpuResponse::Resumed);
            self.resume_devices();
            return Err(e);
        }
        self.state = to;
        Ok(())
    }

    /// Resumes every vCPU where it stopped, and the devices' queues.
    pub fn resume(&mut self) -> Result<(), Error> {
        let to = self.check(Action::Resume)?;
        self.signal_vcpus(VcpuEvent::Resume, VcpuResponse::Resumed)?;
        self.resume_devices();
        self.state = to;
        Ok(())
    }

    /// Lets devices serve their queues again, and looks at every queue once:
    /// notifications that arrived while paused were only noted.
    fn resume_devices(&self) {
        self.devices_paused.store(false, Ordering::SeqCst);
        if let Some(s) = &self.started {
            for entry in &s.devices.virtio {
                let t = entry.transport.lock().unwrap_or_else(|e| e.into_inner());
                for evt in t.core().queue_evts() {
                    let _ = evt.write(1);
                }
            }
        }
    }

    /// Sends `event` to every vCPU and collects every answer (a late answer
    /// to an earlier event is discarded first); the first vCPU that did not
    /// answer `want` is the error.
    fn signal_vcpus(&mut self, event: VcpuEvent, want: VcpuResponse) -> Result<(), Error> {
        let Some(s) = &self.started else {
            return Ok(());
        };
        for v in &s.vcpus {
            v.discard_stale_responses();
            v.send(event.clone());
        }
        let mut result = Ok(());
        for v in &s.vcpus {
            let ok = matches!(
                (v.response(VCPU_RESPONSE_TIMEOUT), &want),
                (Some(VcpuResponse::Paused), VcpuResponse::Paused)
                    | (Some(VcpuResponse::Resumed), VcpuResponse::Resumed)
            );
            if !ok && result.is_ok() {
                result = Err(Error::VcpuTimeout(v.index()));
            }
        }
        result
    }

    /// Saves every vCPU's KVM state, each on its own thread (the VM must be
    /// paused), and the VM's (irqchip, PIT, clock). Groundwork for snapshots.
    pub fn save_kvm_state(&self) -> Result<(VmKvmState, Vec<VcpuStateData>), String> {
        if self.state != VmState::Paused {
            return Err("the microVM is not paused; pause it first".into());
        }
        let Some(s) = &self.started else {
            return Err("the microVM is not started".into());
        };
        let msrs = Arc::new(s.vm.saveable_msrs().map_err(|e| e.to_string())?);
        let vcpus = s
            .vcpus
            .iter()
            .map(|v| v.save_state(msrs.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = s.vm.save_state().map_err(|e| e.to_string())?;
        Ok((vm, vcpus))
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), Error> {
        self.check(Action::RuntimeCall)?;
        if let Some(s) = &self.started {
            s.devices
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send_ctrl_alt_del();
        }
        Ok(())
    }

    /// Checks that a runtime call (one that acts on the booted guest) is allowed now.
    pub fn check_runtime_call(&self) -> Result<(), Error> {
        self.check(Action::RuntimeCall).map(|_| ())
    }

    /// Asks the VM to stop (as a signal or the console escape would).
    pub fn request_stop(&self, exit: VmExit) {
        self.exit.raise(Ok(exit));
    }

    /// Stops every vCPU thread and joins it, logs the devices' counters, and
    /// releases the VM. Idempotent.
    pub fn shutdown(&mut self) {
        // A socket bound at PUT /vsock for a VM that never started.
        drop(self.vsock_backend.take());
        if let Some(s) = self.started.take() {
            for v in s.vcpus {
                v.finish();
            }
            for entry in &s.devices.virtio {
                let t = entry.transport.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(report) = t.core().report() {
                    log::info!("{}: {report}", entry.label);
                }
                // The event loop may outlive this (the process exits from
                // it): the vsock socket goes now.
                t.core().with_device(|d| {
                    if let Some(v) = d
                        .as_any_mut()
                        .downcast_mut::<devices::virtio::vsock::Vsock>()
                    {
                        v.close();
                    }
                });
            }
        }
        self.state = VmState::Exited;
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The entries of `new` whose ID is not in `old`.
fn added<T: Clone>(new: &[T], old: &[T], id: impl Fn(&T) -> &String) -> Vec<T> {
    new.iter()
        .filter(|n| !old.iter().any(|o| id(o) == id(n)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_transitions() {
        use Action::*;
        use VmState::*;
        assert_eq!(transition(NotStarted, Start), Ok(Running));
        assert_eq!(transition(NotStarted, Configure), Ok(NotStarted));
        assert_eq!(transition(Running, Pause), Ok(Paused));
        assert_eq!(transition(Paused, Resume), Ok(Running));
        assert_eq!(transition(Paused, Pause), Ok(Paused));
        assert_eq!(transition(Running, Resume), Ok(Running));
        assert_eq!(transition(Paused, RuntimeCall), Ok(Paused));
    }

    #[test]
    fn refused_transitions_say_why() {
        use Action::*;
        use VmState::*;
        for (from, action, why) in [
            (NotStarted, Pause, "not started"),
            (NotStarted, Resume, "not started"),
            (NotStarted, RuntimeCall, "not started"),
            (Running, Start, "already started"),
            (Paused, Start, "already started"),
            (Running, Configure, "before the microVM starts"),
            (Exited, Start, "exited"),
            (Exited, Resume, "exited"),
            (Exited, Configure, "exited"),
        ] {
            let e = transition(from, action).unwrap_err();
            assert!(e.contains(why), "{from:?} {action:?}: {e}");
        }
    }

    #[test]
    fn state_names_are_firecracker_s() {
        assert_eq!(VmState::NotStarted.as_str(), "Not started");
        assert_eq!(VmState::Running.as_str(), "Running");
        assert_eq!(VmState::Paused.as_str(), "Paused");
    }
}
