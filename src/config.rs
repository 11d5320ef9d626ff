//! `VmConfig`: what the user asked for, as plain data in the shape of
//! Firecracker's configuration file (`boot-source`, `machine-config`, `drives`,
//! `network-interfaces`, `logger`, `metrics`). The command line (`cli.rs`), the
//! `--config-file` JSON and the control API all produce it; the builder reads it.
//! Errors name the field, never a command-line flag.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::MAX_CPUS;

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Smallest guest memory accepted, in MiB: room for the boot tables and a small kernel.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest memory accepted, in MiB (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Most virtio devices the VMM attaches (one interrupt line each, IRQ 5..=22;
/// 23 is the VM generation ID's event device).
pub const MAX_VIRTIO_DEVICES: usize = 18;
/// Most virtio devices with `--enable-pci`: every function of bus 0's
/// devices but the host bridge's.
pub const MAX_PCI_DEVICES: usize = devices::pci::root::MAX_FUNCTIONS;
/// Firecracker's static CPU template names (its `CpuTemplate` enum).
pub const CPU_TEMPLATES: &[&str] = &["None", "C3", "T2", "T2S", "T2CL", "T2A"];
/// Longest device ID accepted (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;
/// Longest disk serial a guest can read (virtio-blk GET_ID).
pub const MAX_SERIAL_LEN: usize = 20;

/// Errors in a configuration; each names the field and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A balloon larger than the guest.
    #[error("balloon amount_mib {amount_mib} is more than the guest's {mem_size_mib} MiB of memory; give at most {mem_size_mib}.")]
    BalloonTooLarge { amount_mib: u32, mem_size_mib: u64 },
    /// mmds-config without interfaces.
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty; name the iface_id of at least one network interface.")]
    MmdsNoInterface,
    /// mmds-config names an interface that is not configured.
    #[error("The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface: '{0}'; PUT /network-interfaces/{0} first.")]
    MmdsInterface(String),
    /// An address outside the usable link-local range.
    #[error("mmds-config ipv4_address {0} is not a valid link-local address; give one from 169.254.1.0 to 169.254.254.255.")]
    MmdsAddress(std::net::Ipv4Addr),
    /// vCPU count out of range.
    #[error("machine-config vcpu_count {0} is out of range; give between 1 and {max}.", max = MAX_CPUS)]
    VcpuCount(u64),
    /// SMT with an odd vCPU count.
    #[error("machine-config vcpu_count {0} is odd; with smt enabled give 1 or an even count.")]
    SmtOddVcpus(u64),
    /// Memory size out of range.
    #[error("machine-config mem_size_mib {0} is out of range; give between {MIN_MEM_MIB} and {MAX_MEM_MIB}.")]
    MemSize(u64),
    /// A feature of Firecracker's machine configuration this VMM does not have.
    #[error("machine-config {field} '{value}' is not supported; give \"None\" or leave it out.")]
    MachineFeature { field: &'static str, value: String },
    /// Guest memory that huge pages cannot back whole.
    #[error("machine-config mem_size_mib {0} is not a multiple of 2 MiB, which huge_pages \"{1}\" needs; give an even mem_size_mib.")]
    HugePagesSize(u64, &'static str),
    /// A balloon on hugetlbfs memory, which it cannot give back page by page.
    #[error("Firecracker's huge pages support is incompatible with memory ballooning: huge_pages \"2M\" and a balloon device cannot be used together; remove one.")]
    HugePagesBalloon,
    /// A CPU template name Firecracker does not have.
    #[error("machine-config cpu_template '{0}' is not a CPU template; give one of None, C3, T2, T2S, T2CL, T2A.")]
    CpuTemplate(String),
    /// An ID with characters or a length Firecracker would refuse.
    #[error("{field} '{id}' is invalid; use 1 to {MAX_ID_LEN} ASCII letters, digits or '_'.")]
    Id { field: &'static str, id: String },
    /// Two devices with one ID.
    #[error("{field} '{id}' is used twice; give each device its own ID.")]
    DuplicateId { field: &'static str, id: String },
    /// Two root drives.
    #[error("A root block device already exists: drives '{0}' and '{1}' are both root devices; mark only one is_root_device.")]
    TwoRoots(String, String),
    /// A root pmem device beside a root drive (Firecracker's message first).
    #[error("Attempt to add pmem as a root device while the root device defined as a block device: pmem '{pmem}' and drive '{drive}'; mark only one as root.")]
    PmemRootBesideDrive { pmem: String, drive: String },
    /// A root drive beside a root pmem device (Firecracker's message first).
    #[error("Attempt to add block as a root device while the root device defined as a pmem device: drive '{drive}' and pmem '{pmem}'; mark only one as root.")]
    DriveRootBesidePmem { drive: String, pmem: String },
    /// Two root pmem devices (Firecracker's message first).
    #[error("A root pmem device already exist: pmem '{0}' and '{1}' are both root devices; mark only one root_device.")]
    TwoPmemRoots(String, String),
    /// More devices than the MMIO window and interrupt lines allow.
    #[error("{0} virtio devices are more than the {1} the VMM can attach; configure fewer drives and network interfaces.")]
    TooManyDevices(usize, usize),
    /// A disk serial that does not fit GET_ID.
    #[error("drive '{0}': serial is longer than {MAX_SERIAL_LEN} bytes; shorten it.")]
    Serial(String),
    /// A field given as an empty string.
    #[error("{0} is empty; give a path.")]
    EmptyPath(&'static str),
    /// A reserved vsock CID.
    #[error("vsock guest_cid {0} is reserved; give 3 or more.")]
    VsockCid(u32),
    /// A MAC address that does not parse or is multicast.
    #[error("network interface '{iface}': guest_mac '{mac}' {reason}; give six hex bytes like 06:00:AC:10:00:02.")]
    Mac {
        iface: String,
        mac: String,
        reason: &'static str,
    },
    /// Two interfaces with one MAC address.
    #[error(
        "The MAC address is already in use: {0}; give each network interface its own guest_mac."
    )]
    MacInUse(String),
    /// Two interfaces on one TAP device.
    #[error("Could not create the network device: TAP '{tap}' is already used by network interface '{iface}'; give each interface its own TAP.")]
    TapInUse { tap: String, iface: String },
    /// MTU out of range.
    #[error("network interface '{0}': mtu {1} is out of range; give between 68 and 65535.")]
    Mtu(String, u32),
    /// A vhost-user drive.
    #[error("drive '{0}': vhost-user drives (socket) are not supported; give path_on_host.")]
    VhostUser(String),
    /// A section of Firecracker's configuration this VMM does not implement yet.
    #[error("'{0}' is not supported by this VMM yet; remove it from the configuration.")]
    Unsupported(&'static str),
    /// Starting without a kernel.
    #[error("No boot source is configured; give boot-source with kernel_image_path.")]
    NoBootSource,
    /// A configuration file that does not parse.
    #[error("The configuration is not valid JSON for this VMM: {0}.")]
    Json(String),
}

/// The kernel to boot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// ELF vmlinux (64-bit or PVH entry) or bzImage.
    pub kernel_image_path: PathBuf,
    /// Kernel command line; `None` means [`crate::loader::default_cmdline`].
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Optional initial ramdisk.
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
}

/// vCPUs and memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u64,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading in the guest's CPU topology (stored; the
    /// topology is one thread per core either way).
    #[serde(default)]
    pub smt: bool,
    /// Dirty-page tracking: KVM's dirty log and the VMM's own writes, so
    /// that a Diff snapshot holds only the pages written since the last one.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker CPU template; only "None" is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// What backs guest memory: base pages, transparent huge pages, or 2 MiB
    /// hugetlbfs pages.
    #[serde(default)]
    pub huge_pages: HugePages,
}

/// Firecracker's `huge_pages`: what backs guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// The host's base pages.
    #[default]
    None,
    /// Anonymous memory advised to use transparent huge pages (MADV_HUGEPAGE).
    Transparent,
    /// 2 MiB pages from the host's hugetlbfs pool, reserved when mapped.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl HugePages {
    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            HugePages::None => "None",
            HugePages::Transparent => "Transparent",
            HugePages::Hugetlbfs2M => "2M",
        }
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: HugePages::None,
        }
    }
}

/// A partial machine configuration (PATCH /machine-config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// New vCPU count.
    pub vcpu_count: Option<u64>,
    /// New memory size.
    pub mem_size_mib: Option<u64>,
    /// New SMT setting.
    pub smt: Option<bool>,
    /// New dirty-page tracking setting.
    pub track_dirty_pages: Option<bool>,
    /// New CPU template.
    pub cpu_template: Option<String>,
    /// New huge-page setting.
    pub huge_pages: Option<HugePages>,
}

impl MachineConfig {
    /// This configuration with `update` applied.
    pub fn updated(&self, update: MachineConfigUpdate) -> MachineConfig {
        MachineConfig {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            cpu_template: update.cpu_template.or_else(|| self.cpu_template.clone()),
            huge_pages: update.huge_pages.unwrap_or(self.huge_pages),
        }
    }

    /// Checks ranges and supported features.
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpu_count == 0 || self.vcpu_count > u64::from(MAX_CPUS) {
            return Err(Error::VcpuCount(self.vcpu_count));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(Error::SmtOddVcpus(self.vcpu_count));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_size_mib) {
            return Err(Error::MemSize(self.mem_size_mib));
        }
        // Firecracker's static templates are taken here (it checks them
        // against the host at the start); anything else is refused.
        if let Some(t) = self.cpu_template.as_deref() {
            if !CPU_TEMPLATES.contains(&t) {
                return Err(Error::CpuTemplate(t.into()));
            }
        }
        if self.huge_pages != HugePages::None && !self.mem_size_mib.is_multiple_of(2) {
            return Err(Error::HugePagesSize(
                self.mem_size_mib,
                self.huge_pages.name(),
            ));
        }
        Ok(())
    }

    /// What a build needs beyond [`Self::validate`]: a CPU template this VMM
    /// applies (none yet: only "None").
    pub fn check_buildable(&self) -> Result<(), Error> {
        if let Some(t) = self.cpu_template.as_deref().filter(|t| *t != "None") {
            return Err(Error::MachineFeature {
                field: "cpu_template",
                value: t.into(),
            });
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_size_mib * MIB
    }
}

/// A token bucket of a rate limiter: `size` tokens (bytes or operations),
/// refilled from empty to full in `refill_time` ms, plus `one_time_burst`
/// tokens spent first. Size 0 or refill time 0 limits nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds.
    pub size: u64,
    /// Initial extra tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket.
    pub refill_time: u64,
}

/// A rate limiter of a drive or of one direction of a network interface;
/// an operation goes ahead when every bucket can pay for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl TokenBucket {
    /// The bucket as the devices take it.
    pub fn device(&self) -> devices::rate_limiter::BucketConfig {
        devices::rate_limiter::BucketConfig {
            size: self.size,
            one_time_burst: self.one_time_burst.unwrap_or(0),
            refill_time_ms: self.refill_time,
        }
    }

    fn limits(&self) -> bool {
        self.device().limits()
    }
}

impl RateLimiter {
    /// The buckets as the devices take them (bandwidth, ops).
    pub fn buckets(&self) -> devices::virtio::net::LimiterUpdate {
        (
            self.bandwidth.as_ref().map(TokenBucket::device),
            self.ops.as_ref().map(TokenBucket::device),
        )
    }

    /// `old` after a PATCH with `self` (Firecracker's semantics): each bucket
    /// given replaces the old one, or removes it if it limits nothing; a
    /// bucket not given stays. None when no bucket is left.
    pub fn patch(&self, old: Option<&RateLimiter>) -> Option<RateLimiter> {
        let mut new = old.cloned().unwrap_or_default();
        if let Some(b) = &self.bandwidth {
            new.bandwidth = b.limits().then(|| b.clone());
        }
        if let Some(b) = &self.ops {
            new.ops = b.limits().then(|| b.clone());
        }
        (new.bandwidth.is_some() || new.ops.is_some()).then_some(new)
    }
}

/// Block device caching strategy (stored; every write is passed to the host as
/// it comes, and flushes are honoured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests are not advertised (Firecracker's default).
    #[default]
    Unsafe,
    /// Flush requests are advertised and honoured.
    Writeback,
}

/// Block device I/O engine (stored; I/O is synchronous).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous reads and writes.
    #[default]
    Sync,
    /// io_uring in Firecracker; here stored and served synchronously.
    Async,
}

/// A disk image attached as a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's ID (API path, metrics group `block_<id>`).
    pub drive_id: String,
    /// Raw image file.
    #[serde(default)]
    pub path_on_host: PathBuf,
    /// The root file system: attached first (/dev/vda) and named in `root=`.
    pub is_root_device: bool,
    /// Read-only to the guest, and opened read-only on the host.
    #[serde(default)]
    pub is_read_only: bool,
    /// With `is_root_device`: `root=PARTUUID=<partuuid>` instead of /dev/vda.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Caching strategy.
    #[serde(default)]
    pub cache_type: CacheType,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// vhost-user socket (refused: not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Serial the guest reads with GET_ID; defaults to the first 20 bytes of
    /// `drive_id`. (An addition of this VMM.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl Drive {
    /// A read-write, non-root drive of `path` with ID `id`.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Drive {
            drive_id: id.into(),
            path_on_host: path.into(),
            is_root_device: false,
            is_read_only: false,
            partuuid: None,
            cache_type: CacheType::default(),
            io_engine: IoEngine::default(),
            rate_limiter: None,
            socket: None,
            serial: None,
        }
    }

    /// The serial the guest reads.
    pub fn effective_serial(&self) -> &str {
        match &self.serial {
            Some(s) => s,
            None => {
                let mut end = self.drive_id.len().min(MAX_SERIAL_LEN);
                while !self.drive_id.is_char_boundary(end) {
                    end -= 1;
                }
                &self.drive_id[..end]
            }
        }
    }

    /// Checks the drive on its own.
    pub fn validate(&self) -> Result<(), Error> {
        check_id("drive_id", &self.drive_id)?;
        if self.socket.is_some() {
            return Err(Error::VhostUser(self.drive_id.clone()));
        }
        if self.path_on_host.as_os_str().is_empty() {
            return Err(Error::EmptyPath("path_on_host"));
        }
        if self
            .serial
            .as_ref()
            .is_some_and(|s| s.len() > MAX_SERIAL_LEN)
        {
            return Err(Error::Serial(self.drive_id.clone()));
        }
        Ok(())
    }
}

/// A MAC address, written as six hex bytes separated by ':'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff`; the reason on failure.
    pub fn parse(s: &str) -> Result<MacAddr, &'static str> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err("is not six hex bytes separated by ':'");
        }
        let mut mac = [0u8; 6];
        for (m, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err("is not six hex bytes separated by ':'");
            }
            *m = u8::from_str_radix(p, 16).map_err(|_| "is not six hex bytes separated by ':'")?;
        }
        // Any address is taken, multicast and locally administered ones
        // too, as Firecracker takes them: the guest's driver decides.
        Ok(MacAddr(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A network interface attached to a host TAP device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's ID (API path, metrics group `net_<id>`).
    pub iface_id: String,
    /// Name of an existing TAP device.
    pub host_dev_name: String,
    /// MAC address; derived from the TAP name when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU announced to the guest, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
    /// Mergeable receive buffers (on unless turned off; an addition of this VMM).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub mrg_rxbuf: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl NetworkInterface {
    /// An interface `id` on TAP `tap` with the defaults.
    pub fn new(id: impl Into<String>, tap: impl Into<String>) -> Self {
        NetworkInterface {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mrg_rxbuf: true,
        }
    }

    /// The MAC the guest sees: the one given, or one derived from the TAP name.
    pub fn mac(&self) -> Result<MacAddr, Error> {
        match &self.guest_mac {
            Some(s) => MacAddr::parse(s).map_err(|reason| Error::Mac {
                iface: self.iface_id.clone(),
                mac: s.clone(),
                reason,
            }),
            None => Ok(derived_mac(&self.host_dev_name)),
        }
    }

    /// Checks the interface on its own.
    pub fn validate(&self) -> Result<(), Error> {
        check_id("iface_id", &self.iface_id)?;
        if self.host_dev_name.is_empty() {
            return Err(Error::EmptyPath("host_dev_name"));
        }
        self.mac()?;
        if let Some(mtu) = self.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(Error::Mtu(self.iface_id.clone(), mtu));
            }
        }
        Ok(())
    }
}

/// A stable, locally administered unicast MAC derived from `name` (FNV-1a).
pub fn derived_mac(name: &str) -> MacAddr {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    MacAddr([0x02, 0x76, b[0], b[1], b[2], b[3]])
}

/// Where and how the VMM logs (Firecracker's `Logger`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or named pipe for the log; stderr when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Error, Warning, Info, Debug, Trace or Off (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Print the level in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print the source file and line of each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log records of this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Where the VMM writes its metrics (Firecracker's `Metrics`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or named pipe; one JSON object per line.
    pub metrics_path: PathBuf,
}

/// The VM's vsock device (Firecracker's `Vsock`): the guest's CID and the
/// Unix socket host programs connect to (guest connections to port P go to
/// `<uds_path>_P`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID, 3 or more (0-2 are reserved).
    pub guest_cid: u32,
    /// The Unix socket the VMM listens on; must not exist yet.
    pub uds_path: PathBuf,
    /// Deprecated by Firecracker; accepted and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

impl VsockConfig {
    /// Checks the CID and the path.
    pub fn validate(&self) -> Result<(), Error> {
        if self.guest_cid < 3 {
            return Err(Error::VsockCid(self.guest_cid));
        }
        if self.uds_path.as_os_str().is_empty() {
            return Err(Error::EmptyPath("vsock uds_path"));
        }
        Ok(())
    }
}

/// A validated description of one VM: Firecracker's configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel; required to start.
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// virtio-blk disks; the root device is attached first (/dev/vda).
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Network interfaces, in order (eth0, eth1, ...).
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Logger set-up.
    #[serde(default)]
    pub logger: Option<LoggerConfig>,
    /// Metrics set-up.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// The balloon device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// The vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The metadata service: its version, address and interfaces.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    /// The entropy device (virtio-rng), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// Firecracker's `cpu-config` section: refused (not implemented yet).
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<serde_json::Value>,
    /// virtio-pmem devices, in order (/dev/pmem0, /dev/pmem1, ...).
    #[serde(default)]
    pub pmem: Vec<PmemConfig>,
    /// Virtio devices are PCI functions (`--enable-pci`, a process flag as
    /// in Firecracker: never part of the JSON).
    #[serde(skip)]
    pub pci: bool,
    /// No VM generation ID device at boot, and a restored one keeps the
    /// snapshot's ID (`--no-vmgenid`: clones then share their RNG state; a
    /// process flag, never part of the JSON).
    #[serde(skip)]
    pub no_vmgenid: bool,
    /// Where the serial console goes, and its rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// Firecracker's `memory-hotplug` section: refused (not implemented yet).
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<serde_json::Value>,
}

/// Whether an optional section was given with something in it (Firecracker
/// writes empty device lists, `"pmem": []`, in its configurations).
fn present(section: &Option<serde_json::Value>) -> bool {
    match section {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

impl VmConfig {
    /// A configuration booting `kernel` with the defaults: 1 vCPU, 128 MiB,
    /// the default command line.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            boot_source: Some(BootSource {
                kernel_image_path: kernel.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Parses a Firecracker-shaped JSON configuration and validates it.
    pub fn from_json(text: &str) -> Result<VmConfig, Error> {
        Self::from_json_for(text, false)
    }

    /// As [`Self::from_json`], for a VMM whose virtio devices are on PCI or
    /// not (`--enable-pci`: more devices fit).
    pub fn from_json_for(text: &str, pci: bool) -> Result<VmConfig, Error> {
        let mut config: VmConfig =
            serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))?;
        config.pci = pci;
        config.validate()?;
        Ok(config)
    }

    /// The kernel command line the user gave, or the default.
    pub fn boot_args(&self) -> std::borrow::Cow<'_, str> {
        match self
            .boot_source
            .as_ref()
            .and_then(|b| b.boot_args.as_deref())
        {
            Some(args) => args.into(),
            None => crate::loader::default_cmdline(),
        }
    }

    /// Drives in attachment order: the root device first, then the others as given.
    pub fn ordered_drives(&self) -> Vec<&Drive> {
        let root = self.drives.iter().filter(|d| d.is_root_device);
        root.chain(self.drives.iter().filter(|d| !d.is_root_device))
            .collect()
    }

    /// Inserts `drive`, or replaces the drive with the same ID.
    pub fn upsert_drive(&mut self, drive: Drive) {
        match self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            Some(d) => *d = drive,
            None => self.drives.push(drive),
        }
    }

    /// Inserts `pmem`, or replaces the device with the same ID (Firecracker's
    /// checks of root devices first).
    pub fn upsert_pmem(&mut self, pmem: PmemConfig) -> Result<(), Error> {
        if pmem.root_device {
            if let Some(d) = self.drives.iter().find(|d| d.is_root_device) {
                return Err(Error::PmemRootBesideDrive {
                    pmem: pmem.id,
                    drive: d.drive_id.clone(),
                });
            }
            if let Some(p) = self.pmem.iter().find(|p| p.root_device && p.id != pmem.id) {
                return Err(Error::TwoPmemRoots(p.id.clone(), pmem.id));
            }
        }
        match self.pmem.iter_mut().find(|p| p.id == pmem.id) {
            Some(p) => *p = pmem,
            None => self.pmem.push(pmem),
        }
        Ok(())
    }

    /// The root pmem device, if there is one, with its index (/dev/pmemN).
    pub fn root_pmem(&self) -> Option<(usize, &PmemConfig)> {
        self.pmem.iter().enumerate().find(|(_, p)| p.root_device)
    }

    /// Inserts `iface`, or replaces the interface with the same ID.
    pub fn upsert_interface(&mut self, iface: NetworkInterface) {
        match self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == iface.iface_id)
        {
            Some(n) => *n = iface,
            None => self.network_interfaces.push(iface),
        }
    }

    /// Checks everything that does not depend on the host (files and KVM limits
    /// are checked when the VM is built).
    pub fn validate(&self) -> Result<(), Error> {
        for (present, name) in [
            (present(&self.cpu_config), "cpu-config"),
            (present(&self.memory_hotplug), "memory-hotplug"),
        ] {
            if present {
                return Err(Error::Unsupported(name));
            }
        }
        self.machine_config.validate()?;
        if let Some(b) = &self.balloon {
            if self.machine_config.huge_pages == HugePages::Hugetlbfs2M {
                return Err(Error::HugePagesBalloon);
            }
            b.validate(self.machine_config.mem_size_mib)?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        if let Some(b) = &self.boot_source {
            if b.kernel_image_path.as_os_str().is_empty() {
                return Err(Error::EmptyPath("boot-source kernel_image_path"));
            }
        }
        let mut root: Option<&str> = None;
        for (i, d) in self.drives.iter().enumerate() {
            d.validate()?;
            if self.drives[..i].iter().any(|o| o.drive_id == d.drive_id) {
                return Err(Error::DuplicateId {
                    field: "drive_id",
                    id: d.drive_id.clone(),
                });
            }
            if d.is_root_device {
                if let Some(r) = root {
                    return Err(Error::TwoRoots(r.into(), d.drive_id.clone()));
                }
                root = Some(&d.drive_id);
            }
        }
        let mut pmem_root: Option<&str> = None;
        for (i, p) in self.pmem.iter().enumerate() {
            p.validate()?;
            if self.pmem[..i].iter().any(|o| o.id == p.id) {
                return Err(Error::DuplicateId {
                    field: "pmem id",
                    id: p.id.clone(),
                });
            }
            if p.root_device {
                if let Some(r) = pmem_root {
                    return Err(Error::TwoPmemRoots(r.into(), p.id.clone()));
                }
                if let Some(d) = root {
                    return Err(Error::PmemRootBesideDrive {
                        pmem: p.id.clone(),
                        drive: d.into(),
                    });
                }
                pmem_root = Some(&p.id);
            }
        }
        for (i, n) in self.network_interfaces.iter().enumerate() {
            n.validate()?;
            let earlier = &self.network_interfaces[..i];
            if earlier.iter().any(|o| o.iface_id == n.iface_id) {
                return Err(Error::DuplicateId {
                    field: "iface_id",
                    id: n.iface_id.clone(),
                });
            }
            if let Some(o) = earlier.iter().find(|o| o.host_dev_name == n.host_dev_name) {
                return Err(Error::TapInUse {
                    tap: n.host_dev_name.clone(),
                    iface: o.iface_id.clone(),
                });
            }
            if let Some(mac) = &n.guest_mac {
                let same = |o: &NetworkInterface| {
                    o.guest_mac
                        .as_deref()
                        .is_some_and(|m| m.eq_ignore_ascii_case(mac))
                };
                if earlier.iter().any(same) {
                    return Err(Error::MacInUse(mac.clone()));
                }
            }
        }
        if let Some(m) = &self.mmds_config {
            m.validate()?;
            if let Some(id) = m
                .network_interfaces
                .iter()
                .find(|id| !self.network_interfaces.iter().any(|n| &n.iface_id == *id))
            {
                return Err(Error::MmdsInterface(id.clone()));
            }
        }
        let devices = self.drives.len()
            + self.network_interfaces.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.entropy.is_some())
            + usize::from(self.balloon.is_some())
            + self.pmem.len();
        let max = if self.pci {
            MAX_PCI_DEVICES
        } else {
            MAX_VIRTIO_DEVICES
        };
        if devices > max {
            return Err(Error::TooManyDevices(devices, max));
        }
        Ok(())
    }
}

/// Firecracker's `serial` object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file or named pipe that takes the console output instead of stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    /// Bytes of output per refill period; the rest is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// Firecracker's `balloon` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The target size of the balloon, in MiB.
    pub amount_mib: u32,
    /// Let the guest take pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates (0: no statistics).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting (refused: not implemented; shown as Firecracker
    /// shows it).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting (refused: not implemented).
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    /// Checks the size against the guest's memory and the features this
    /// VMM has.
    pub fn validate(&self, mem_size_mib: u64) -> Result<(), Error> {
        if self.free_page_hinting || self.free_page_reporting {
            return Err(Error::Unsupported(
                "balloon free_page_hinting and free_page_reporting",
            ));
        }
        check_balloon_size(self.amount_mib, mem_size_mib)
    }
}

/// A balloon may not be larger than the guest's memory.
pub fn check_balloon_size(amount_mib: u32, mem_size_mib: u64) -> Result<(), Error> {
    if u64::from(amount_mib) > mem_size_mib {
        return Err(Error::BalloonTooLarge {
            amount_mib,
            mem_size_mib,
        });
    }
    Ok(())
}

/// Firecracker's `pmem` object: a virtio-pmem device on a host file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    /// The device's ID (API path, metrics group `pmem_<id>`).
    pub id: String,
    /// The backing file, mapped into guest-physical memory.
    pub path_on_host: PathBuf,
    /// The root file system: `root=/dev/pmemN` on the kernel command line.
    #[serde(default)]
    pub root_device: bool,
    /// Mapped read-only: the file never changes.
    #[serde(default)]
    pub read_only: bool,
    /// Flushes (msync) per refill period, and bytes (the file's size per flush).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

impl PmemConfig {
    /// Checks the ID and the path.
    pub fn validate(&self) -> Result<(), Error> {
        check_id("id", &self.id)?;
        if self.path_on_host.as_os_str().is_empty() {
            return Err(Error::EmptyPath("pmem path_on_host"));
        }
        Ok(())
    }
}

/// Firecracker's `entropy` object: the virtio-rng device and its limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Bytes and requests per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Firecracker's `mmds-config`: which interfaces reach the metadata service,
/// at which address, speaking which version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// V1 (no token needed, the default) or V2 (session tokens).
    #[serde(default)]
    pub version: devices::mmds::Version,
    /// The interfaces whose guest traffic to the address goes to the service.
    pub network_interfaces: Vec<String>,
    /// The service's address (link-local; 169.254.169.254 by default).
    #[serde(default = "default_mmds_address")]
    pub ipv4_address: std::net::Ipv4Addr,
    /// Answer in IMDS text format whatever the guest's Accept header says.
    #[serde(default)]
    pub imds_compat: bool,
}

fn default_mmds_address() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(169, 254, 169, 254)
}

impl MmdsConfig {
    /// Checks the list and the address (169.254.1.0 to 169.254.254.255, the
    /// link-local range RFC 3927 lets hosts use).
    pub fn validate(&self) -> Result<(), Error> {
        if self.network_interfaces.is_empty() {
            return Err(Error::MmdsNoInterface);
        }
        let [a, b, c, _] = self.ipv4_address.octets();
        if a != 169 || b != 254 || c == 0 || c == 255 {
            return Err(Error::MmdsAddress(self.ipv4_address));
        }
        Ok(())
    }
}

/// Checks a device ID: 1 to 64 ASCII alphanumerics or underscores.
pub fn check_id(field: &'static str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Id {
            field,
            id: id.chars().take(80).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_ranges_and_smt_rule() {
        let mut m = MachineConfig::default();
        assert_eq!(m.validate(), Ok(()));
        m.vcpu_count = 0;
        assert_eq!(m.validate(), Err(Error::VcpuCount(0)));
        m.vcpu_count = u64::from(MAX_CPUS) + 1;
        assert!(m.validate().is_err());
        m.vcpu_count = 3;
        m.smt = true;
        assert_eq!(m.validate(), Err(Error::SmtOddVcpus(3)));
        m.vcpu_count = 4;
        assert_eq!(m.validate(), Ok(()));
        m.mem_size_mib = 8;
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mem_size_mib 8"));
        m.mem_size_mib = 128;
        m.cpu_template = Some("T2".into());
        assert_eq!(
            m.validate(),
            Ok(()),
            "a template is taken as Firecracker takes it"
        );
        assert!(m
            .check_buildable()
            .unwrap_err()
            .to_string()
            .contains("cpu_template 'T2'"));
        m.cpu_template = Some("Z9".into());
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("one of None, C3"));
    }

    #[test]
    fn machine_config_patch_keeps_unset_fields() {
        let m = MachineConfig::default().updated(MachineConfigUpdate {
            mem_size_mib: Some(256),
            ..Default::default()
        });
        assert_eq!((m.vcpu_count, m.mem_size_mib), (1, 256));
    }

    #[test]
    fn ids_are_alphanumeric_or_underscore_up_to_64() {
        assert!(check_id("drive_id", "root_fs1").is_ok());
        for bad in ["", "a-b", "a b", "ä", &"x".repeat(65)] {
            let e = check_id("drive_id", bad).unwrap_err().to_string();
            assert!(e.starts_with("drive_id '"), "{e}");
        }
    }

    #[test]
    fn firecracker_config_file_parses() {
        let text = r#"{
          "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0"},
          "drives": [
            {"drive_id": "data", "path_on_host": "d.img", "is_root_device": false, "is_read_only": true},
            {"drive_id": "rootfs", "path_on_host": "r.ext4", "is_root_device": true, "is_read_only": false,
             "cache_type": "Writeback", "io_engine": "Sync",
             "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}
          ],
          "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
          "network-interfaces": [{"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}]
        }"#;
        let c = VmConfig::from_json(text).unwrap();
        assert_eq!(c.boot_args(), "console=ttyS0");
        assert_eq!(c.machine_config.vcpu_count, 2);
        let order: Vec<&str> = c
            .ordered_drives()
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(order, ["rootfs", "data"]);
        assert_eq!(c.drives[1].cache_type, CacheType::Writeback);
        assert_eq!(
            c.network_interfaces[0].mac().unwrap(),
            MacAddr([6, 0, 0xac, 0x10, 0, 2])
        );
        // What GET /vm/config returns parses back to the same configuration.
        let again = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn config_file_errors_name_the_field() {
        for (text, want) in [
            (
                r#"{"machine-config": {"vcpu_count": 1}}"#,
                "missing field `mem_size_mib`",
            ),
            (
                r#"{"machine-config": {"vcpu_count": "2", "mem_size_mib": 128}}"#,
                "invalid type",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k", "bogus": 1}}"#,
                "unknown field `bogus`",
            ),
            (
                r#"{"drives": [{"drive_id": "a-b", "path_on_host": "x", "is_root_device": false}]}"#,
                "drive_id 'a-b'",
            ),
            (
                r#"{"balloon": {"amount_mib": 1}}"#,
                "missing field `deflate_on_oom`",
            ),
            (
                r#"{"balloon": {"amount_mib": 999, "deflate_on_oom": false}}"#,
                "balloon amount_mib 999 is more than the guest's 128 MiB",
            ),
            (
                r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": false, "free_page_hinting": true}}"#,
                "free_page_hinting and free_page_reporting' is not supported",
            ),
            (
                r#"{"vsock": {"guest_cid": 2, "uds_path": "v"}}"#,
                "guest_cid 2 is reserved",
            ),
            (
                r#"{"network-interfaces": [{"iface_id": "e", "host_dev_name": "t", "guest_mac": "zz"}]}"#,
                "guest_mac 'zz'",
            ),
            (
                r#"{"network-interfaces": [{"iface_id": "e", "host_dev_name": "t", "mtu": 20}]}"#,
                "mtu 20",
            ),
            (
                r#"{"drives": [{"drive_id": "a", "path_on_host": "x", "is_root_device": true},
                           {"drive_id": "b", "path_on_host": "y", "is_root_device": true}]}"#,
                "both root devices",
            ),
            (
                r#"{"drives": [{"drive_id": "a", "path_on_host": "x", "is_root_device": false},
                           {"drive_id": "a", "path_on_host": "y", "is_root_device": false}]}"#,
                "used twice",
            ),
            (
                r#"{"drives": [{"drive_id": "a", "socket": "/s", "is_root_device": false}]}"#,
                "vhost-user",
            ),
            ("{", "not valid JSON"),
        ] {
            let e = VmConfig::from_json(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn default_serial_is_the_drive_id_cut_to_20_bytes() {
        let mut d = Drive::new("a_very_long_drive_identifier", "x");
        assert_eq!(d.effective_serial(), "a_very_long_drive_id");
        d.serial = Some("S1".into());
        assert_eq!(d.effective_serial(), "S1");
        d.serial = Some("x".repeat(21));
        assert!(d.validate().is_err());
    }

    #[test]
    fn derived_macs_are_stable_local_unicast() {
        let m = derived_mac("tap0");
        assert_eq!(m, derived_mac("tap0"));
        assert_eq!(m.0[0] & 3, 2);
        assert_ne!(m, derived_mac("tap1"));
        assert_eq!(MacAddr::parse(&m.to_string()), Ok(m));
        assert!(
            MacAddr::parse("01:00:00:00:00:01").is_ok(),
            "multicast, as Firecracker takes it"
        );
    }

    #[test]
    fn a_patch_replaces_the_buckets_it_names_and_removes_empty_ones() {
        let b = |size, refill_time| TokenBucket {
            size,
            one_time_burst: None,
            refill_time,
        };
        let old = RateLimiter {
            bandwidth: Some(b(1000, 100)),
            ops: Some(b(10, 100)),
        };
        let only_ops = RateLimiter {
            bandwidth: None,
            ops: Some(b(20, 1000)),
        };
        let patched = only_ops.patch(Some(&old)).unwrap();
        assert_eq!(patched.bandwidth, Some(b(1000, 100)));
        assert_eq!(patched.ops, Some(b(20, 1000)));
        // Size 0 (or refill time 0) removes a bucket; none left, no limiter.
        let off = RateLimiter {
            bandwidth: Some(b(0, 0)),
            ops: Some(b(5, 0)),
        };
        assert_eq!(off.patch(Some(&patched)), None);
        assert_eq!(only_ops.patch(None), Some(only_ops.clone()));
        let (bandwidth, ops) = off.buckets();
        assert!(!bandwidth.unwrap().limits() && !ops.unwrap().limits());
    }

    #[test]
    fn pmem_devices_parse_as_firecracker_writes_them_and_one_root_device_is_allowed() {
        let c: VmConfig = serde_json::from_str(
            r#"{"pmem": [{"id": "p0", "path_on_host": "./f", "root_device": true, "read_only": false, "rate_limiter": null},
                         {"id": "p1", "path_on_host": "./g"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.root_pmem().map(|(i, p)| (i, p.id.as_str())),
            Some((0, "p0"))
        );
        assert!(!c.pmem[1].read_only && !c.pmem[1].root_device);
        c.validate().unwrap();
        let mut with_root_drive = c.clone();
        let mut d = Drive::new("rootfs", "r.ext4");
        d.is_root_device = true;
        with_root_drive.drives.push(d);
        assert!(matches!(
            with_root_drive.validate(),
            Err(Error::PmemRootBesideDrive { .. })
        ));
        let mut two = c.clone();
        let err = two.upsert_pmem(PmemConfig {
            id: "p2".into(),
            path_on_host: "h".into(),
            root_device: true,
            read_only: true,
            rate_limiter: None,
        });
        assert!(err
            .unwrap_err()
            .to_string()
            .starts_with("A root pmem device already exist"));
        // The root device itself may be replaced.
        let mut same = c.pmem[0].clone();
        same.read_only = true;
        two.upsert_pmem(same).unwrap();
        assert!(two.pmem[0].read_only);
        let bad: Result<VmConfig, _> =
            serde_json::from_str(r#"{"pmem": [{"id": "p", "path_on_host": "f", "extra": 1}]}"#);
        assert!(bad.is_err());
        let dup: VmConfig = serde_json::from_str(
            r#"{"pmem": [{"id": "p", "path_on_host": "f"}, {"id": "p", "path_on_host": "g"}]}"#,
        )
        .unwrap();
        assert!(matches!(dup.validate(), Err(Error::DuplicateId { .. })));
    }
}
