//! Snapshots: a paused VM saved to two files — the state (versioned and
//! checksummed, `format.rs`) and the guest memory, byte for byte — and a VM
//! restored from them. The memory file is mapped privately and lazily
//! (MAP_PRIVATE): untouched pages cost nothing, and clones of one snapshot
//! share the page cache until they write.
//!
//! Devices are saved before the KVM state, with their transports; on
//! restore, disk images are reopened (and locked) by path and TAP devices by
//! name before any vCPU runs. A Diff snapshot ([`diff`]) writes only the pages written since the
//! previous one.

pub mod diff;
pub mod format;
pub mod tool;
pub mod uffd;

use std::path::Path;

use devices::legacy::i8042::I8042State;
use devices::legacy::serial::SerialDeviceState;
use devices::memory::{GuestMemoryMmap, GuestRegionMmap};
use devices::virtio::block::BlockState;
use devices::virtio::mmio::MmioTransportState;
use devices::virtio::net::NetState;
use devices::virtio::vsock::VsockState;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmKvmState;

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state file is unusable.
    #[error(transparent)]
    Format(#[from] format::Error),
    /// The memory file cannot be written or read.
    #[error("Cannot {what} the memory file '{path}': {err}.")]
    MemoryFile {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
    /// The memory file does not have the snapshot's size.
    #[error("The memory file '{path}' has {found} bytes, the snapshot's guest memory {want}; give the memory file taken with this snapshot.")]
    MemorySize { path: String, found: u64, want: u64 },
    /// A Diff written onto a memory file of another guest size.
    #[error("The memory file '{path}' has {found} bytes, the guest's memory {want}: a Diff is written onto the memory file of this VM's previous snapshot or a new file; give one of those.")]
    DiffBase { path: String, found: u64, want: u64 },
    /// The memory file cannot be mapped.
    #[error("Cannot map the memory file '{path}': {err}.")]
    Map { path: String, err: String },
    /// Something the snapshot cannot hold yet.
    #[error("{0} cannot be snapshotted yet; remove it from the VM to take a snapshot.")]
    Unsupported(&'static str),
    /// The VM is not in a state to snapshot.
    #[error("{0}")]
    State(String),
}

/// What a snapshot's memory file holds (Firecracker's `snapshot_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// Every page of guest memory.
    #[default]
    Full,
    /// The pages written since the previous snapshot ([`diff`]).
    Diff,
}

/// Where one guest RAM region lives in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub offset: u64,
}

/// The device ID of the vsock device (Firecracker's default `vsock_id`).
pub const VSOCK_ID: &str = "vsock";
/// The device ID of the entropy device.
pub const ENTROPY_ID: &str = "entropy";
/// The device ID of the balloon.
pub const BALLOON_ID: &str = "balloon";

/// A virtio device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// A drive.
    Block(BlockState),
    /// A network interface (its TAP is the configuration's `host_dev_name`,
    /// which `network_overrides` may change).
    Net(NetState),
    /// The vsock device (its socket is the configuration's `uds_path`,
    /// which `vsock_override` may change).
    Vsock(VsockState),
    /// The entropy device (nothing of its own beyond the transport; its rate
    /// limit is the configuration's).
    Entropy,
    /// The balloon: its target and the size the guest reported.
    Balloon(devices::virtio::balloon::BalloonState),
    /// A virtio-pmem device: its file and where the guest finds it (the
    /// file holds its contents; its rate limit is the configuration's).
    Pmem(devices::virtio::pmem::PmemState),
}

/// One virtio device: its ID in the configuration, where the guest finds it,
/// the transport and the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioEntryState {
    /// `drive_id` or `iface_id`.
    pub id: String,
    /// Where the guest finds it, and its transport.
    #[serde(flatten)]
    pub placed: PlacedTransport,
    /// The device.
    pub device: VirtioDeviceState,
}

/// A virtio device's transport and where the guest finds it (format 1.2
/// adds PCI; a virtio-mmio entry has the fields it had in 1.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PlacedTransport {
    /// A virtio-mmio window and interrupt line.
    Mmio {
        /// Base of its MMIO window.
        mmio_base: u64,
        /// Its interrupt line.
        irq: u32,
        /// The virtio-mmio registers and queues.
        transport: MmioTransportState,
    },
    /// A function on PCI bus 0 (`--enable-pci`).
    Pci {
        /// Its function number and transport.
        pci: crate::pci::PciEntryState,
    },
}

impl PlacedTransport {
    /// The transport-neutral registers and queues.
    pub fn core(&self) -> &devices::virtio::transport::CoreState {
        match self {
            PlacedTransport::Mmio { transport, .. } => &transport.core,
            PlacedTransport::Pci { pci } => &pci.transport.core,
        }
    }
}

/// Everything a snapshot's state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The configuration the VM was booted with (GET /vm/config).
    pub config: VmConfig,
    /// The guest RAM layout in the memory file.
    pub memory: Vec<MemoryRegionState>,
    /// In-kernel irqchip, PIT, kvmclock.
    pub vm: VmKvmState,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The i8042.
    pub i8042: I8042State,
    /// The virtio devices, in attachment order (format 1.1; a 1.0 state,
    /// which could not hold any, has none).
    #[serde(default)]
    pub virtio: Vec<VirtioEntryState>,
    /// Whether the VM had a PCI segment (`--enable-pci`; format 1.2).
    #[serde(default)]
    pub pci: bool,
    /// Whether the VM has the VM generation ID device (format 1.3; a
    /// snapshot taken before it existed, or with --no-vmgenid, has not).
    #[serde(default)]
    pub vmgenid: bool,
}

impl MicrovmState {
    /// Checks that the parts agree: the state file is checksummed, not
    /// trusted. vCPUs 0..N for N = the configured count, memory regions back
    /// to back adding up to the configured size.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |why: String| {
            Err(Error::State(format!(
                "The snapshot is inconsistent: {why}."
            )))
        };
        let count = self.config.machine_config.vcpu_count;
        if self.vcpus.is_empty() || self.vcpus.len() as u64 != count {
            return bad(format!(
                "{} vCPU states for vcpu_count {count}",
                self.vcpus.len()
            ));
        }
        if let Some((i, v)) = self
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, v)| v.index as usize != *i)
        {
            return bad(format!("vCPU state {i} is for vCPU {}", v.index));
        }
        let total = self.memory.iter().try_fold(0u64, |off, r| {
            (r.offset == off).then(|| off.checked_add(r.size)).flatten()
        });
        let want = self.config.machine_config.mem_bytes();
        if self.memory.is_empty() || total != Some(want) {
            return bad(format!(
                "the memory regions do not lay out {want} bytes of guest memory"
            ));
        }
        // Every configured drive and interface has its device and no other
        // device is there (in the order they were attached at the start,
        // drives first, the root drive first, and devices hotplugged later
        // after them: compared as sets, each ID once).
        let mut configured: Vec<(&str, u8)> = self
            .config
            .ordered_drives()
            .into_iter()
            .map(|d| (d.drive_id.as_str(), 0))
            .chain(
                self.config
                    .network_interfaces
                    .iter()
                    .map(|n| (n.iface_id.as_str(), 1)),
            )
            .chain(self.config.vsock.iter().map(|_| (VSOCK_ID, 2)))
            .chain(self.config.entropy.iter().map(|_| (ENTROPY_ID, 3)))
            .chain(self.config.balloon.iter().map(|_| (BALLOON_ID, 4)))
            .chain(self.config.pmem.iter().map(|p| (p.id.as_str(), 5)))
            .collect();
        let mut saved: Vec<(&str, u8)> = self
            .virtio
            .iter()
            .map(|v| {
                let kind = match v.device {
                    VirtioDeviceState::Block(_) => 0,
                    VirtioDeviceState::Net(_) => 1,
                    VirtioDeviceState::Vsock(_) => 2,
                    VirtioDeviceState::Entropy => 3,
                    VirtioDeviceState::Balloon(_) => 4,
                    VirtioDeviceState::Pmem(_) => 5,
                };
                (v.id.as_str(), kind)
            })
            .collect();
        configured.sort_unstable();
        saved.sort_unstable();
        if configured != saved || saved.windows(2).any(|w| w[0] == w[1]) {
            return bad(format!(
                "its virtio devices {saved:?} are not the configured ones {configured:?}"
            ));
        }
        // A device is what its configuration says (the configuration is what
        // GET /vm/config shows and what was validated).
        for v in &self.virtio {
            let agrees = match &v.device {
                VirtioDeviceState::Block(b) => self.config.drives.iter().any(|d| {
                    d.drive_id == v.id
                        && d.path_on_host == b.path
                        && d.is_read_only == b.read_only
                        && d.effective_serial().as_bytes() == b.serial
                }),
                VirtioDeviceState::Net(n) => {
                    self.config.network_interfaces.iter().any(|i| {
                        i.iface_id == v.id
                            // Without a configured MAC the guest keeps the one
                            // it was given (derived from the TAP it had then).
                            && (i.guest_mac.is_none() || i.mac().is_ok_and(|m| m.0 == n.mac))
                            && i.mtu.map(|m| m as u16) == n.mtu
                            && i.mrg_rxbuf == n.mrg_rxbuf
                    })
                }
                VirtioDeviceState::Vsock(vs) => self
                    .config
                    .vsock
                    .as_ref()
                    .is_some_and(|c| u64::from(c.guest_cid) == vs.guest_cid),
                VirtioDeviceState::Entropy => v.id == ENTROPY_ID && self.config.entropy.is_some(),
                VirtioDeviceState::Pmem(p) => self.config.pmem.iter().any(|c| {
                    c.id == v.id && c.path_on_host == p.path && c.read_only == p.read_only
                }),
                VirtioDeviceState::Balloon(b) => {
                    v.id == BALLOON_ID
                        && self.config.balloon.as_ref().is_some_and(|c| {
                            c.deflate_on_oom == b.deflate_on_oom
                                && (c.stats_polling_interval_s == 0) == (b.stats_interval_s == 0)
                        })
                }
            };
            if !agrees {
                return bad(format!(
                    "virtio device '{}' differs from its configuration",
                    v.id
                ));
            }
        }
        Ok(())
    }
}

/// The snapshot data format version this VMM writes, as `MAJOR.MINOR.0`
/// (what `--snapshot-version` prints after a `v`, as Firecracker's does).
pub fn format_version() -> String {
    format!("{}.{}.0", format::VERSION_MAJOR, format::VERSION_MINOR)
}

/// What `vmm --describe-snapshot` prints: the container's version and what
/// the state holds.
pub fn describe(path: &Path) -> Result<String, Error> {
    let (header, state): (_, MicrovmState) = format::read(path)?;
    state.check()?;
    let mem: u64 = state.memory.iter().map(|r| r.size).sum();
    // First line as Firecracker's `--describe-snapshot`: the data format version.
    let mut out = format!("v{}.{}.0\n", header.major, header.minor);
    out += &format!(
        "vmm snapshot '{}': format {}.{}, {} bytes of state, checksum ok\n",
        path.display(),
        header.major,
        header.minor,
        header.payload_len
    );
    out += &format!(
        "guest memory: {} MiB in {} region(s); the memory file must be {mem} bytes\n",
        mem >> 20,
        state.memory.len()
    );
    for v in &state.vcpus {
        let unavailable = if v.unavailable.is_empty() {
            "none".to_string()
        } else {
            v.unavailable.join(", ")
        };
        out += &format!(
            "vCPU {}: RIP {:#x}, MP state {}, {} MSRs, {} CPUID leaves, TSC {} kHz, not saved on this host: {unavailable}\n",
            v.index,
            v.regs.rip,
            v.mp_state.mp_state,
            v.msrs.as_slice().len(),
            v.cpuid.as_slice().len(),
            v.tsc_khz.map_or("unknown".to_string(), |k| k.to_string()),
        );
    }
    let realtime = state.vm.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME != 0;
    out += &format!(
        "VM: PIC master and slave, IOAPIC, PIT, kvmclock at {} ns ({} wall-clock reference: clock_realtime {})\n",
        state.vm.clock.clock,
        if realtime { "with a" } else { "without a" },
        if realtime { "allowed" } else { "refused" }
    );
    out += &format!(
        "devices: COM1 ({} bytes of input pending), i8042 ({} bytes pending)\n",
        state.serial.in_buffer.len() + state.serial.pending.len(),
        state.i8042.output.len()
    );
    for v in &state.virtio {
        let core = v.placed.core();
        let queues = core
            .queues
            .iter()
            .map(|q| format!("size {} next {}/{}", q.size, q.next_avail, q.next_used))
            .collect::<Vec<_>>()
            .join(", ");
        let what = match &v.device {
            VirtioDeviceState::Block(b) => format!(
                "virtio-blk '{}': {} ({}, {} sectors)",
                v.id,
                b.path.display(),
                if b.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                b.capacity
            ),
            VirtioDeviceState::Entropy => "virtio-rng: the entropy device".to_string(),
            VirtioDeviceState::Pmem(p) => format!(
                "virtio-pmem '{}': {} ({}, {} MiB at {:#x})",
                v.id,
                p.path.display(),
                if p.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                p.size >> 20,
                p.guest_addr
            ),
            VirtioDeviceState::Balloon(b) => format!(
                "virtio-balloon: target {} pages, guest reported {}",
                b.num_pages, b.actual
            ),
            VirtioDeviceState::Vsock(vs) => format!(
                "virtio-vsock: guest CID {}, socket {}",
                vs.guest_cid,
                state
                    .config
                    .vsock
                    .as_ref()
                    .map_or("?".into(), |c| c.uds_path.display().to_string())
            ),
            VirtioDeviceState::Net(n) => {
                let tap = state
                    .config
                    .network_interfaces
                    .iter()
                    .find(|i| i.iface_id == v.id)
                    .map_or("?", |i| i.host_dev_name.as_str());
                format!(
                    "virtio-net '{}': TAP {tap}, MAC {}",
                    v.id,
                    n.mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                )
            }
        };
        let at = match &v.placed {
            PlacedTransport::Mmio { mmio_base, irq, .. } => {
                format!("virtio-mmio at {mmio_base:#x} IRQ {irq}")
            }
            PlacedTransport::Pci { pci } => {
                format!("PCI 00:{:02x}.{}", pci.devfn >> 3, pci.devfn & 7)
            }
        };
        out += &format!(
            "{what}; {at}, status {:#x}, {}; queues: {queues}\n",
            core.status,
            if core.activated {
                "started"
            } else {
                "not started"
            },
        );
    }
    if state.vmgenid {
        out += &format!(
            "VM generation ID: at {:#x}, notified on GSI {} (a new one at every restore)\n",
            crate::arch::x86_64::layout::VMGENID_START,
            crate::arch::x86_64::layout::VMGENID_IRQ
        );
    }
    if let Some(b) = &state.config.boot_source {
        out += &format!(
            "booted from: {} ({})\n",
            b.kernel_image_path.display(),
            state.config.boot_args()
        );
    }
    Ok(out)
}

/// Writes every guest RAM region to a temporary file next to `path`, in
/// guest-address order; committing the returned file puts it in place. Pages
/// that are all zero (every page the guest never touched, among others) are
/// left as holes of a sparse file: they cost neither write time nor disk
/// space, and read back as zero.
pub fn save_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(Vec<MemoryRegionState>, format::PendingFile), Error> {
    let io = |err| Error::MemoryFile {
        what: "write",
        path: path.display().to_string(),
        err,
    };
    // Written under a temporary name and renamed into place: a VM restored
    // from the old file keeps its mapping of the old file.
    let mut pending = format::PendingFile::create(path).map_err(io)?;
    let file = pending.file();
    let regions = write_regions(mem, file, |_, bytes, offset| {
        write_sparse(file, bytes, offset)
    })
    .map_err(io)?;
    Ok((regions, pending))
}

/// Sizes `file` to hold guest memory, its regions back to back from offset 0,
/// and hands each region's bytes to `write` with the region's index and its
/// offset in the file; returns the layout. The VM must be paused (nothing
/// writes guest memory meanwhile).
fn write_regions(
    mem: &GuestMemoryMmap,
    file: &std::fs::File,
    mut write: impl FnMut(usize, &[u8], u64) -> std::io::Result<()>,
) -> std::io::Result<Vec<MemoryRegionState>> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total)?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (i, region) in mem.iter().enumerate() {
        let size = region.len();
        // SAFETY: the region's mapping starts at `as_ptr` and is `size` bytes
        // long; it stays mapped while `mem` lives, and the VM is paused, so
        // no vCPU writes it meanwhile (devices are idle too).
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), size as usize) };
        write(i, bytes, offset)?;
        regions.push(MemoryRegionState {
            gpa: region.start_addr().0,
            size,
            offset,
        });
        offset += size;
    }
    Ok(regions)
}

/// Writes `bytes` at `offset` of `file` (already long enough), skipping the
/// 4 KiB pages that are all zero; consecutive other pages go in one write.
fn write_sparse(file: &std::fs::File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    // An OR over the page: no early exit, but vectorized, and pages of
    // guest memory are mostly either untouched or far from zero.
    let is_zero = |page: &[u8]| page.iter().fold(0u8, |acc, &b| acc | b) == 0;
    let mut run: Option<usize> = None;
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        let at = i * PAGE;
        match (is_zero(page), run) {
            (false, None) => run = Some(at),
            (true, Some(start)) => {
                file.write_all_at(&bytes[start..at], offset + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        file.write_all_at(&bytes[start..], offset + start as u64)?;
    }
    Ok(())
}

/// Where a restored VM's memory comes from (Firecracker's `mem_backend`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemorySource {
    /// The memory file, mapped copy-on-write.
    File(std::path::PathBuf),
    /// A page fault handler listening on this Unix socket ([`uffd`]).
    Uffd(std::path::PathBuf),
}

/// Guest memory from `source`, and the userfaultfd behind it if any.
/// With `backing`, as the load asks: dirty-page tracking, and huge pages
/// (hugetlbfs only from a page fault handler: a file cannot be mapped on
/// them; transparent huge pages for the pages the guest writes).
pub fn guest_memory(
    source: &MemorySource,
    regions: &[MemoryRegionState],
    backing: crate::vstate::memory::Backing,
) -> Result<(GuestMemoryMmap, Option<std::os::fd::OwnedFd>), Error> {
    use crate::config::HugePages;
    let (mem, fd) = match source {
        MemorySource::File(path) => {
            if backing.huge_pages == HugePages::Hugetlbfs2M {
                return Err(Error::State(format!(
                    "Cannot restore hugetlbfs backed snapshot by mapping the memory file '{}'. Please use uffd (mem_backend Uffd), or load with huge_pages \"None\".",
                    path.display()
                )));
            }
            (map_memory(path, regions, backing.track_dirty_pages)?, None)
        }
        MemorySource::Uffd(socket) => {
            let (mem, fd) = uffd::guest_memory(socket, regions, backing)?;
            (mem, Some(fd))
        }
    };
    if backing.huge_pages == HugePages::Transparent {
        crate::vstate::memory::advise_transparent(&mem).map_err(|e| Error::State(e.to_string()))?;
    }
    Ok((mem, fd))
}

/// Maps the memory file privately and lazily as the guest RAM `regions`,
/// with dirty bitmaps when `track`.
pub fn map_memory(
    path: &Path,
    regions: &[MemoryRegionState],
    track: bool,
) -> Result<GuestMemoryMmap, Error> {
    let shown = path.display().to_string();
    let file = format::open_regular(path).map_err(|err| Error::MemoryFile {
        what: "read",
        path: shown.clone(),
        err,
    })?;
    let found = file
        .metadata()
        .map_err(|err| Error::MemoryFile {
            what: "read",
            path: shown.clone(),
            err,
        })?
        .len();
    // Regions back to back from offset 0; the file holds exactly them.
    let laid_out = regions.iter().try_fold(0u64, |off, r| {
        (r.offset == off).then(|| off.checked_add(r.size)).flatten()
    });
    let want = laid_out.unwrap_or(u64::MAX);
    if found != want {
        return Err(Error::MemorySize {
            path: shown,
            found,
            want,
        });
    }
    let file = std::sync::Arc::new(file);
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let map_err = |err: String| Error::Map {
            path: shown.clone(),
            err,
        };
        let size = usize::try_from(r.size).map_err(|e| map_err(e.to_string()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(
            size,
            devices::memory::bitmap(size, track).map_err(|e| map_err(e.to_string()))?,
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .with_file_offset(FileOffset::from_arc(file.clone(), r.offset))
        .build()
        .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
            .ok_or_else(|| map_err("a region wraps the guest address space".into()))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| Error::Map {
        path: shown,
        err: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::transport::CoreState;
    use vm_memory::Bytes;

    /// A state with every part present (default KVM structures).
    fn sample_state() -> MicrovmState {
        use kvm_bindings::{CpuId, Msrs};
        let vcpu = VcpuState {
            index: 0,
            cpuid: CpuId::new(2).unwrap(),
            msrs: Msrs::new(3).unwrap(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Some(Default::default()),
            xcrs: Some(Default::default()),
            debug_regs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            vcpu_events: Default::default(),
            tsc_khz: Some(1_000_000),
            unavailable: vec![],
        };
        let mut config = VmConfig::new("vmlinux");
        config.drives.push(
            serde_json::from_str(
                r#"{"drive_id": "rootfs", "path_on_host": "/r.img", "is_root_device": true, "is_read_only": true}"#,
            )
            .unwrap(),
        );
        let queue = devices::virtio::QueueSnapshot {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 7,
            next_used: 6,
            event_idx: true,
        };
        MicrovmState {
            config,
            memory: vec![MemoryRegionState {
                gpa: 0,
                size: 1 << 20,
                offset: 0,
            }],
            vm: VmKvmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![vcpu],
            serial: devices::persist::Persist::save(&devices::legacy::serial::SerialDevice::new(
                std::sync::Arc::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap()),
                Box::new(std::io::sink()),
            )),
            i8042: I8042State {
                status: 0,
                config: 0x45,
                output: vec![],
                awaiting_data_for: None,
            },
            pci: false,
            vmgenid: true,
            virtio: vec![VirtioEntryState {
                id: "rootfs".into(),
                placed: PlacedTransport::Mmio {
                    mmio_base: 0xd000_0000,
                    irq: 5,
                    transport: MmioTransportState {
                        core: CoreState {
                            device_type: 2,
                            status: 15,
                            device_features_sel: 1,
                            driver_features_sel: 1,
                            driver_features: 1 << 32,
                            queue_sel: 0,
                            config_generation: 0,
                            activated: true,
                            queues: vec![queue],
                            bad_config: vec![false],
                        },
                        interrupt_status: 1,
                    },
                },
                device: VirtioDeviceState::Block(BlockState {
                    path: "/r.img".into(),
                    read_only: true,
                    serial: b"rootfs".to_vec(),
                    capacity: 2048,
                }),
            }],
        }
    }

    #[test]
    fn a_state_round_trips_and_mangled_states_are_refused_without_panicking() {
        let image = format::encode(&sample_state()).unwrap();
        let (_, back): (_, MicrovmState) = format::decode("s", &image).unwrap();
        assert_eq!(
            format::encode(&back).unwrap(),
            image,
            "save -> restore -> save"
        );
        // Hostile payloads in a valid container: mutated JSON, checksummed anew.
        let (_, payload) = format::check("s", &image).unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..300 {
            let mut p = payload.to_vec();
            for _ in 0..1 + (x % 4) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % p.len() as u64) as usize;
                p[i] = (x >> 32) as u8;
            }
            let text = String::from_utf8_lossy(&p).into_owned();
            let value: Result<serde_json::Value, _> = serde_json::from_str(&text);
            let Ok(value) = value else { continue };
            let reencoded = format::encode(&value).unwrap();
            // Either a state or an error; never a panic.
            let _ = format::decode::<MicrovmState>("s", &reencoded);
        }
    }

    #[test]
    fn inconsistent_states_are_refused() {
        // 1 MiB of regions for the configured 128 MiB.
        let st = sample_state();
        assert!(st
            .check()
            .unwrap_err()
            .to_string()
            .contains("memory regions"));
        let mut st = sample_state();
        st.config.machine_config.mem_size_mib = 1;
        st.memory[0].size = u64::MAX;
        assert!(st.check().is_err(), "an overflowing layout");
        let mut st = sample_state();
        st.config.machine_config.mem_size_mib = 1;
        st.vcpus.clear();
        assert!(st
            .check()
            .unwrap_err()
            .to_string()
            .contains("0 vCPU states"));
        let mut st = sample_state();
        st.config.machine_config.mem_size_mib = 1;
        st.vcpus[0].index = 3;
        assert!(st
            .check()
            .unwrap_err()
            .to_string()
            .contains("is for vCPU 3"));
        let mut st = sample_state();
        st.config.machine_config.mem_size_mib = 1;
        if let VirtioDeviceState::Block(b) = &mut st.virtio[0].device {
            b.read_only = false;
        }
        assert!(st
            .check()
            .unwrap_err()
            .to_string()
            .contains("'rootfs' differs from its configuration"));
        let mut st = sample_state();
        st.config.machine_config.mem_size_mib = 1;
        st.virtio.clear();
        assert!(st
            .check()
            .unwrap_err()
            .to_string()
            .contains("not the configured ones"));
        let mut st = sample_state();
        st.config.machine_config.mem_size_mib = 1;
        assert!(st.check().is_ok());
    }

    #[test]
    fn memory_round_trips_through_a_private_mapping() {
        let mem = crate::vstate::memory::create_guest_memory(32 << 20, Default::default()).unwrap();
        mem.write_slice(b"hello snapshot", GuestAddress(0x1234))
            .unwrap();
        mem.write_obj(0xfeed_u64, GuestAddress((32 << 20) - 8))
            .unwrap();
        // Runs of written pages between untouched ones, a lone byte at the
        // end of a page and at the start of the next.
        mem.write_slice(&[0xa5; 3 * 4096 + 100], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(0x20_0fff)).unwrap();
        mem.write_obj(2u8, GuestAddress(0x20_1000)).unwrap();
        let path = std::env::temp_dir().join(format!("vmm-mem-{}", std::process::id()));
        let (regions, file) = save_memory(&mem, &path).unwrap();
        file.commit().unwrap();
        // Sparse: untouched pages take no space on disk.
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&path).unwrap().blocks() * 512
        };
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");
        let restored = map_memory(&path, &regions, false).unwrap();
        let mut whole = vec![0u8; 32 << 20];
        let mut back = vec![0u8; 32 << 20];
        mem.read_slice(&mut whole, GuestAddress(0)).unwrap();
        restored.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(whole == back, "the memory reads back byte for byte");
        let mut buf = [0u8; 14];
        restored.read_slice(&mut buf, GuestAddress(0x1234)).unwrap();
        assert_eq!(&buf, b"hello snapshot");
        assert_eq!(
            restored
                .read_obj::<u64>(GuestAddress((32 << 20) - 8))
                .unwrap(),
            0xfeed
        );
        // Private: the guest's writes do not reach the file.
        restored
            .write_slice(b"changed", GuestAddress(0x1234))
            .unwrap();
        let again = map_memory(&path, &regions, false).unwrap();
        again.read_slice(&mut buf, GuestAddress(0x1234)).unwrap();
        assert_eq!(&buf, b"hello snapshot");
        // A memory file of another size is refused.
        let short = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        short.set_len((32 << 20) - 4096).unwrap();
        let e = map_memory(&path, &regions, false).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.contains("has 33550336 bytes") && e.contains("33554432"),
            "{e}"
        );
    }
}
