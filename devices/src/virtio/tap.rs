//! A TAP device as the virtio-net backend: opened by name (it must exist), with
//! the 12-byte virtio-net header on every frame and offloads set from what the
//! guest accepted.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio_bindings::virtio_net::*;

use super::net::{NetBackend, NET_HDR_SIZE};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name cannot be an interface name.
    #[error("'{0}' is not a valid interface name; give the name of an existing TAP device.")]
    BadName(String),
    /// No such interface.
    #[error("There is no network interface '{0}'; create it first (ip tuntap add dev {0} mode tap) or give an existing TAP device.")]
    Missing(String),
    /// The interface is not a TAP device.
    #[error("Network interface '{0}' is not a TAP device; give a TAP device (ip tuntap add dev NAME mode tap).")]
    NotTap(String),
    /// /dev/net/tun cannot be opened or the device attached.
    #[error("Cannot attach TAP device '{name}': {err}. Check that you may use it (root or the device's owner).")]
    Attach { name: String, err: std::io::Error },
}

/// An attached TAP device.
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Attaches the existing TAP device `name` (in this process's network namespace).
    pub fn open(name: &str) -> Result<Tap, Error> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(Error::BadName(name.to_string()));
        }
        // Looked up through a socket of this process's network namespace, not
        // sysfs: a jailer's chroot has no /sys, and a process that joined a
        // namespace with setns(2) still sees the host's sysfs. An interface
        // that does not exist must not be created by TUNSETIFF below.
        let cname = std::ffi::CString::new(name).map_err(|_| Error::BadName(name.to_string()))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string, which lives
        // until the call returns.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(Error::Missing(name.to_string()));
        }
        let attach = |err| Error::Attach {
            name: name.to_string(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(attach)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq matches in
        // layout and size (16-byte name, flags, padding to 40 bytes).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let err = std::io::Error::last_os_error();
            // An existing interface that is not a TAP (a TUN, or not a tun/tap
            // device at all) is refused with EINVAL.
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Err(Error::NotTap(name.to_string()));
            }
            return Err(attach(err));
        }
        let hdr_size = NET_HDR_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_size) } < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn supports_offloads(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, acked: u64) -> std::io::Result<()> {
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        let mut flags: libc::c_uint = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_and_missing_or_non_tap_interfaces_are_refused() {
        assert!(matches!(Tap::open(""), Err(Error::BadName(_))));
        assert!(matches!(Tap::open("a/b"), Err(Error::BadName(_))));
        assert!(matches!(
            Tap::open("sixteen-chars-xx"),
            Err(Error::BadName(_))
        ));
        assert!(matches!(Tap::open("vmmnosuchtap0"), Err(Error::Missing(_))));
        // The loopback interface exists everywhere and is not a TAP device.
        assert!(matches!(Tap::open("lo"), Err(Error::NotTap(_))));
        let e = Tap::open("vmmnosuchtap0").err().unwrap().to_string();
        assert!(
            e.contains("ip tuntap add dev vmmnosuchtap0 mode tap"),
            "{e}"
        );
    }
}
