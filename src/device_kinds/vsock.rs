//! The vsock device (`vsock`): host programs reach the guest through a Unix
//! socket.

use devices::persist::Persist;
use devices::virtio::vsock::muxer::Muxer;
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;

use super::{configured, DeviceKind, Error, NamedDevice, Opening, Reopening};
use crate::config::VsockConfig;
use crate::device_manager::VirtioKind;
use crate::snapshot::{self, VirtioDeviceState};

/// The vsock device.
pub struct VsockKind;

impl DeviceKind for VsockKind {
    fn kind(&self) -> VirtioKind {
        VirtioKind::Vsock
    }

    /// Binds the socket (or takes the one already bound for it).
    fn open(&self, o: &mut Opening) -> Result<Vec<NamedDevice>, Error> {
        let Some(v) = &o.config.vsock else {
            return Ok(Vec::new());
        };
        let cid = u64::from(v.guest_cid);
        let muxer = match o.vsock.take() {
            Some(m) if m.bound_to() == (cid, v.uds_path.as_path()) => m,
            _ => Muxer::new(cid, &v.uds_path)?,
        };
        let names = (snapshot::VSOCK_ID.to_string(), self.kind(), label(v));
        Ok(vec![(names, Box::new(Vsock::new(muxer)))])
    }

    fn save(&self, device: &mut dyn VirtioDevice) -> Option<VirtioDeviceState> {
        let v = device.as_any_mut().downcast_mut::<Vsock>()?;
        Some(VirtioDeviceState::Vsock(v.save()))
    }

    /// Connections are not carried over (their host sockets belonged to the
    /// old process): the guest is told the ones it had are gone.
    fn after_restore(&self, device: &mut dyn VirtioDevice) {
        let told = device
            .as_any_mut()
            .downcast_mut::<Vsock>()
            .is_some_and(|v| v.reset_after_restore());
        if !told {
            log::warn!("vsock: the driver left no event buffer; its connections were not reset");
        }
    }

    /// Binds the configured socket (after `vsock_override`).
    fn reopen(
        &self,
        r: &Reopening,
        id: &str,
        saved: &VirtioDeviceState,
    ) -> Option<Result<(NamedDevice, bool), Error>> {
        let VirtioDeviceState::Vsock(vs) = saved else {
            return None;
        };
        Some((|| {
            let cfg = configured(r.state.config.vsock.as_ref(), "its vsock device")?;
            let muxer = Muxer::new(vs.guest_cid, &cfg.uds_path)?;
            let Ok(vsock) = Vsock::restore(muxer, vs);
            let named: NamedDevice = ((id.to_string(), self.kind(), label(cfg)), Box::new(vsock));
            Ok((named, false))
        })())
    }
}

/// How the log names the vsock device.
fn label(v: &VsockConfig) -> String {
    format!("vsock cid {} ({})", v.guest_cid, v.uds_path.display())
}
