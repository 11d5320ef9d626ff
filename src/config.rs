//! `VmConfig`: what the user asked for, validated, as plain data.

use std::path::PathBuf;

use crate::arch::x86_64::layout::MAX_CPUS;

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Smallest guest memory accepted: room for the boot tables and a small kernel.
pub const MIN_MEMORY: u64 = 16 * MIB;
/// Largest guest memory accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors in what the user gave.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Memory size that does not parse.
    #[error("--memory '{0}' is not a size; give a number with a unit, e.g. 512M or 2G.")]
    MemoryUnparsable(String),
    /// Memory size out of range.
    #[error("--memory {given} is out of range; give between 16M and 1024G.")]
    MemoryOutOfRange { given: String },
    /// vCPU count out of range.
    #[error("--cpus {given} is out of range; give between 1 and {max}.")]
    CpusOutOfRange { given: u64, max: u32 },
    /// A `--disk` spec that does not parse.
    #[error("--disk '{spec}': {reason}; give path=FILE[,readonly=on|off][,id=SERIAL].")]
    DiskSpec { spec: String, reason: String },
    /// More devices than the MMIO window and interrupt lines allow.
    #[error("{0} virtio devices are more than the {max} the VMM can attach; give fewer --disk and --net options.", max = MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    /// A `--net` spec that does not parse.
    #[error("--net '{spec}': {reason}; give tap=NAME[,mac=02:xx:xx:xx:xx:xx][,mtu=N][,mrg_rxbuf=on|off].")]
    NetSpec { spec: String, reason: String },
}

/// Most virtio devices the VMM attaches (one interrupt line each, IRQ 5..=23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// A network interface attached to a host TAP device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of an existing TAP device.
    pub tap: String,
    /// MAC address; derived from the TAP name when not given.
    pub mac: [u8; 6],
    /// MTU announced to the guest, if given.
    pub mtu: Option<u16>,
    /// Whether the device offers mergeable receive buffers (on by default).
    pub mrg_rxbuf: bool,
}

/// A stable, locally administered unicast MAC derived from `name` (FNV-1a).
pub fn derived_mac(name: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x02, 0x76, b[0], b[1], b[2], b[3]]
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// Parses `tap=NAME[,mac=02:xx:xx:xx:xx:xx][,mtu=N][,mrg_rxbuf=on|off]`.
pub fn parse_net_spec(spec: &str) -> Result<NetConfig, Error> {
    let err = |reason: &str| Error::NetSpec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (mut tap, mut mac, mut mtu, mut mrg_rxbuf) = (None, None, None, true);
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| err(&format!("'{item}' is not key=value")))?;
        match key {
            "tap" if value.is_empty() => return Err(err("the TAP name is empty")),
            "tap" => tap = Some(value.to_string()),
            "mac" => {
                let m = parse_mac(value).ok_or_else(|| {
                    err(&format!(
                        "mac '{value}' is not six hex bytes separated by ':'"
                    ))
                })?;
                if m[0] & 1 != 0 {
                    return Err(err(&format!("mac '{value}' is a multicast address")));
                }
                mac = Some(m);
            }
            "mtu" => {
                let n: u16 = value
                    .parse()
                    .ok()
                    .filter(|n| (68..=65535).contains(n))
                    .ok_or_else(|| err(&format!("mtu '{value}' is not between 68 and 65535")))?;
                mtu = Some(n);
            }
            "mrg_rxbuf" => {
                mrg_rxbuf = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(err(&format!("mrg_rxbuf '{value}' is not on or off"))),
                }
            }
            other => return Err(err(&format!("unknown key '{other}'"))),
        }
    }
    let tap = tap.ok_or_else(|| err("no tap= given"))?;
    let mac = mac.unwrap_or_else(|| derived_mac(&tap));
    Ok(NetConfig {
        tap,
        mac,
        mtu,
        mrg_rxbuf,
    })
}

/// A disk image attached as a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Read-only to the guest, and opened read-only on the host.
    pub read_only: bool,
    /// Serial the guest reads with GET_ID (at most 20 bytes).
    pub id: Option<String>,
}

/// Parses `path=FILE[,readonly=on|off][,id=SERIAL]`.
pub fn parse_disk_spec(spec: &str) -> Result<DiskConfig, Error> {
    let err = |reason: &str| Error::DiskSpec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let mut path = None;
    let mut read_only = false;
    let mut id = None;
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| err(&format!("'{item}' is not key=value")))?;
        match key {
            "path" if value.is_empty() => return Err(err("the path is empty")),
            "path" => path = Some(PathBuf::from(value)),
            "readonly" | "ro" => {
                read_only = match value {
                    "on" | "true" | "yes" | "1" => true,
                    "off" | "false" | "no" | "0" => false,
                    _ => return Err(err(&format!("readonly='{value}' is not on or off"))),
                }
            }
            "id" if value.len() > 20 => return Err(err("the id is longer than 20 bytes")),
            "id" => id = Some(value.to_string()),
            other => return Err(err(&format!("unknown key '{other}'"))),
        }
    }
    let path = path.ok_or_else(|| err("no path= given"))?;
    Ok(DiskConfig {
        path,
        read_only,
        id,
    })
}

/// A validated description of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// ELF vmlinux (64-bit or PVH entry) or bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line given by the user; `None` means the VMM's default.
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest memory in bytes, a multiple of 4 KiB.
    pub memory: u64,
    /// virtio-blk disks, in order (the first is /dev/vda).
    pub disks: Vec<DiskConfig>,
    /// Network interfaces, in order (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// Whether the first disk is the root file system (adds `root=/dev/vda rw`
    /// unless the command line names a root already).
    pub root_is_first_disk: bool,
}

impl VmConfig {
    /// A configuration with the defaults: 1 vCPU, 128 MiB, default cmdline.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            cpus: 1,
            memory: 128 * MIB,
            disks: Vec::new(),
            nets: Vec::new(),
            root_is_first_disk: false,
        }
    }

    /// Checks the ranges that do not depend on the host (KVM limits are checked when
    /// the VM is built).
    pub fn validate(&self) -> Result<(), Error> {
        check_cpus(self.cpus as u64)?;
        let devices = self.disks.len() + self.nets.len();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(Error::TooManyDevices(devices));
        }
        check_memory(self.memory, &format!("{}M", self.memory / MIB))
    }
}

/// Checks a vCPU count against the boot tables' limit.
pub fn check_cpus(cpus: u64) -> Result<u32, Error> {
    if cpus == 0 || cpus > MAX_CPUS as u64 {
        return Err(Error::CpusOutOfRange {
            given: cpus,
            max: MAX_CPUS,
        });
    }
    Ok(cpus as u32)
}

fn check_memory(bytes: u64, given: &str) -> Result<(), Error> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        return Err(Error::MemoryOutOfRange {
            given: given.to_string(),
        });
    }
    Ok(())
}

/// Parses a memory size: a whole number with an optional unit K, M, G or T (also
/// written KiB, MB, ...; all binary). A bare number means MiB. The result is
/// rounded up to whole 4 KiB pages and checked against the accepted range.
pub fn parse_memory(s: &str) -> Result<u64, Error> {
    let unparsable = || Error::MemoryUnparsable(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| unparsable())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(unparsable()),
    };
    let too_big = || Error::MemoryOutOfRange {
        given: s.to_string(),
    };
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(too_big)?;
    let bytes = bytes.checked_add(0xfff).ok_or_else(too_big)? & !0xfff;
    check_memory(bytes, s)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units_parse() {
        assert_eq!(parse_memory("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_memory("512").unwrap(), 512 * MIB);
        assert_eq!(parse_memory("2G").unwrap(), 2048 * MIB);
        assert_eq!(parse_memory("1GiB").unwrap(), 1024 * MIB);
        assert_eq!(parse_memory("65536k").unwrap(), 64 * MIB);
        assert_eq!(parse_memory(" 128mb ").unwrap(), 128 * MIB);
    }

    #[test]
    fn memory_rounds_up_to_pages() {
        assert_eq!(parse_memory("16385K").unwrap(), 16 * MIB + 4096);
    }

    #[test]
    fn memory_zero_small_or_absurd_is_out_of_range() {
        for s in ["0", "0G", "15M", "2T", "18446744073709551615G"] {
            assert!(
                matches!(parse_memory(s), Err(Error::MemoryOutOfRange { .. })),
                "{s}"
            );
        }
    }

    #[test]
    fn memory_garbage_is_unparsable() {
        for s in ["", "M", "12X", "-5M", "1.5G", "abc", "5 M B"] {
            assert_eq!(
                parse_memory(s),
                Err(Error::MemoryUnparsable(s.into())),
                "{s}"
            );
        }
    }

    #[test]
    fn cpus_range_is_enforced() {
        assert!(check_cpus(0).is_err());
        assert_eq!(check_cpus(1), Ok(1));
        assert_eq!(check_cpus(MAX_CPUS as u64), Ok(MAX_CPUS));
        assert!(matches!(
            check_cpus(MAX_CPUS as u64 + 1),
            Err(Error::CpusOutOfRange { .. })
        ));
    }

    #[test]
    fn disk_specs_parse() {
        assert_eq!(
            parse_disk_spec("path=/a.img").unwrap(),
            DiskConfig {
                path: "/a.img".into(),
                read_only: false,
                id: None
            }
        );
        assert_eq!(
            parse_disk_spec("path=d.img,readonly=on,id=SER1").unwrap(),
            DiskConfig {
                path: "d.img".into(),
                read_only: true,
                id: Some("SER1".into())
            }
        );
        assert!(!parse_disk_spec("readonly=off,path=x").unwrap().read_only);
    }

    #[test]
    fn bad_disk_specs_name_the_problem() {
        for (spec, want) in [
            ("", "is not key=value"),
            ("disk.img", "is not key=value"),
            ("path=", "the path is empty"),
            ("readonly=on", "no path= given"),
            ("path=a,readonly=maybe", "not on or off"),
            ("path=a,cache=none", "unknown key 'cache'"),
            ("path=a,id=123456789012345678901", "longer than 20 bytes"),
        ] {
            let e = parse_disk_spec(spec).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("path=FILE"), "{spec:?}: {e}");
        }
    }

    #[test]
    fn net_specs_parse_with_a_stable_derived_mac() {
        let n = parse_net_spec("tap=tap0").unwrap();
        assert_eq!((n.tap.as_str(), n.mtu, n.mrg_rxbuf), ("tap0", None, true));
        assert_eq!(n.mac, derived_mac("tap0"));
        assert_eq!(n.mac[0] & 3, 2, "locally administered unicast");
        assert_ne!(derived_mac("tap0"), derived_mac("tap1"));
        let n = parse_net_spec("mtu=1400,mac=02:aa:bb:cc:dd:ee,tap=t,mrg_rxbuf=off").unwrap();
        assert_eq!(
            (n.mac, n.mtu, n.mrg_rxbuf),
            ([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee], Some(1400), false)
        );
    }

    #[test]
    fn bad_net_specs_name_the_problem() {
        for (spec, want) in [
            ("tap0", "is not key=value"),
            ("tap=", "the TAP name is empty"),
            ("mac=02:00:00:00:00:01", "no tap= given"),
            ("tap=t,mac=02:00:00:00:00", "not six hex bytes"),
            ("tap=t,mac=01:00:00:00:00:01", "multicast"),
            ("tap=t,mtu=20", "between 68 and 65535"),
            ("tap=t,mrg_rxbuf=yes", "not on or off"),
            ("tap=t,queues=4", "unknown key 'queues'"),
        ] {
            let e = parse_net_spec(spec).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("tap=NAME"), "{spec:?}: {e}");
        }
    }

    #[test]
    fn error_messages_name_the_input_and_the_fix() {
        let e = parse_memory("12X").unwrap_err().to_string();
        assert!(e.contains("--memory '12X'") && e.contains("512M"), "{e}");
        let e = check_cpus(0).unwrap_err().to_string();
        assert!(e.contains("--cpus 0") && e.contains("between 1 and"), "{e}");
    }
}
