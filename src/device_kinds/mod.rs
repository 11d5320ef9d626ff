//! What the VMM knows of each kind of virtio device, one file per kind:
//! how the configuration's entries become devices with their host side
//! opened (a disk image, a TAP, a socket), how a device is saved in a
//! snapshot, and how a saved one is reopened. The builder, the device
//! manager and the snapshot code go through [`KINDS`] and never name a
//! kind's device type; adding a kind is its devices/ folder, its file here
//! and one line in [`KINDS`] (docs/ADDING-A-DEVICE.md).

pub mod balloon;
pub mod block;
pub mod entropy;
pub mod net;
pub mod pmem;
pub mod vsock;

use devices::mmds::SharedMmds;
use devices::virtio::vsock::muxer::Muxer;
use devices::virtio::VirtioDevice;

use crate::config::VmConfig;
use crate::device_manager::VirtioKind;
use crate::snapshot::{self, MicrovmState, VirtioDeviceState};

/// Errors opening a device's host side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::Error),
    /// A TAP device cannot be used.
    #[error(transparent)]
    Tap(#[from] devices::virtio::tap::Error),
    /// A pmem backing file cannot be used.
    #[error(transparent)]
    Pmem(#[from] devices::virtio::pmem::Error),
    /// The vsock socket cannot be set up.
    #[error(transparent)]
    Vsock(#[from] devices::virtio::vsock::muxer::Error),
    /// A saved device does not match the snapshot's configuration.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
}

impl Error {
    /// Whether the error is in what the user gave.
    pub fn is_usage_error(&self) -> bool {
        !matches!(
            self,
            Error::Vsock(m) if !matches!(m, devices::virtio::vsock::muxer::Error::Bind { .. })
        )
    }
}

/// A device ready to attach: its ID, kind and log label, and the device.
pub type NamedDevice = ((String, VirtioKind, String), Box<dyn VirtioDevice>);

/// What opening devices from a configuration needs.
pub struct Opening<'a> {
    /// The VM's configuration.
    pub config: &'a VmConfig,
    /// The metadata service, for interfaces that route to it.
    pub mmds: &'a SharedMmds,
    /// A vsock socket already bound for this configuration, to take.
    pub vsock: Option<Muxer>,
}

/// What reopening saved devices needs.
pub struct Reopening<'a> {
    /// The snapshot (its configuration names each device's host side).
    pub state: &'a MicrovmState,
    /// The metadata service.
    pub mmds: &'a SharedMmds,
}

/// One kind of virtio device, as the VMM handles it.
pub trait DeviceKind: Sync {
    /// Which kind.
    fn kind(&self) -> VirtioKind;
    /// The devices of this kind the configuration asks for, their host
    /// side opened, in attachment order.
    fn open(&self, o: &mut Opening) -> Result<Vec<NamedDevice>, Error>;
    /// The state of `device`, a device of this kind, for a snapshot (None if
    /// it is not of this kind).
    fn save(&self, device: &mut dyn VirtioDevice) -> Option<VirtioDeviceState>;
    /// The device `saved` describes with its host side reopened, and
    /// whether it changed since the snapshot (a disk's size); None if
    /// `saved` is not of this kind.
    fn reopen(
        &self,
        r: &Reopening,
        id: &str,
        saved: &VirtioDeviceState,
    ) -> Option<Result<(NamedDevice, bool), Error>>;
    /// After a restore, before the vCPUs run: what a restored device of
    /// this kind must tell its driver.
    fn after_restore(&self, _device: &mut dyn VirtioDevice) {}
}

/// Every kind, in attachment order: drives (the root device first),
/// network interfaces, vsock, entropy, balloon, pmem.
pub static KINDS: &[&dyn DeviceKind] = &[
    &block::BlockKind,
    &net::NetKind,
    &vsock::VsockKind,
    &entropy::EntropyKind,
    &balloon::BalloonKind,
    &pmem::PmemKind,
];

/// The handling of `kind` (every VirtioKind is in KINDS: a unit test walks
/// them all).
pub fn of(kind: VirtioKind) -> Option<&'static dyn DeviceKind> {
    KINDS.iter().copied().find(|k| k.kind() == kind)
}

/// Every device the configuration asks for, in attachment order.
pub fn open_all(o: &mut Opening) -> Result<Vec<NamedDevice>, Error> {
    let mut out = Vec::new();
    for k in KINDS {
        out.extend(k.open(o)?);
    }
    Ok(out)
}

/// Every saved device with its host side reopened, in the snapshot's order,
/// each with whether it changed since.
pub fn reopen_all(r: &Reopening) -> Result<Vec<(NamedDevice, bool)>, Error> {
    r.state
        .virtio
        .iter()
        .map(|v| {
            KINDS
                .iter()
                .find_map(|k| k.reopen(r, &v.id, &v.device))
                .unwrap_or_else(|| {
                    Err(Error::Snapshot(snapshot::Error::State(format!(
                        "Virtio device '{}' is of no kind this VMM has.",
                        v.id
                    ))))
                })
        })
        .collect()
}

/// The configuration's entry `what` the snapshot's device needs, or the
/// error that says it is missing.
fn configured<'a, T>(found: Option<&'a T>, what: &str) -> Result<&'a T, Error> {
    found.ok_or_else(|| {
        Error::Snapshot(snapshot::Error::State(format!(
            "The snapshot has no configuration for {what}."
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_handled_once() {
        let all = [
            VirtioKind::Block,
            VirtioKind::Net,
            VirtioKind::Vsock,
            VirtioKind::Entropy,
            VirtioKind::Balloon,
            VirtioKind::Pmem,
        ];
        for k in all {
            assert_eq!(KINDS.iter().filter(|h| h.kind() == k).count(), 1, "{k:?}");
            assert_eq!(of(k).map(|h| h.kind()), Some(k));
        }
        assert_eq!(KINDS.len(), all.len());
    }
}
