//! virtio-pmem devices: host files mapped into guest-physical memory
//! (`pmem` in the configuration), /dev/pmem0, /dev/pmem1, ... in order.

use devices::persist::Persist;
use devices::virtio::pmem::Pmem;
use devices::virtio::VirtioDevice;

use super::{DeviceKind, Error, NamedDevice, Opening, Reopening};
use crate::config::PmemConfig;
use crate::device_manager::VirtioKind;
use crate::snapshot::VirtioDeviceState;

/// virtio-pmem devices.
pub struct PmemKind;

impl DeviceKind for PmemKind {
    fn kind(&self) -> VirtioKind {
        VirtioKind::Pmem
    }

    /// Opens, locks and maps every backing file, in the configuration's order.
    fn open(&self, o: &mut Opening) -> Result<Vec<NamedDevice>, Error> {
        let mut out: Vec<NamedDevice> = Vec::new();
        for p in &o.config.pmem {
            let mut pmem = Pmem::open(&p.path_on_host, p.read_only)?;
            limit(&mut pmem, p);
            out.push(((p.id.clone(), self.kind(), label(p)), Box::new(pmem)));
        }
        Ok(out)
    }

    fn save(&self, device: &mut dyn VirtioDevice) -> Option<VirtioDeviceState> {
        let p = device.as_any_mut().downcast_mut::<Pmem>()?;
        Some(VirtioDeviceState::Pmem(p.save()))
    }

    /// Reopens and maps the file by path, at the snapshot's address.
    fn reopen(
        &self,
        r: &Reopening,
        id: &str,
        saved: &VirtioDeviceState,
    ) -> Option<Result<(NamedDevice, bool), Error>> {
        let VirtioDeviceState::Pmem(state) = saved else {
            return None;
        };
        Some((|| {
            let mut pmem = Pmem::restore((), state)?;
            if let Some(p) = r.state.config.pmem.iter().find(|p| p.id == id) {
                limit(&mut pmem, p);
            }
            let label = format!("pmem {id} ({})", state.path.display());
            let named: NamedDevice = ((id.to_string(), self.kind(), label), Box::new(pmem));
            Ok((named, false))
        })())
    }
}

/// How the log names a pmem device.
fn label(p: &PmemConfig) -> String {
    format!("pmem {} ({})", p.id, p.path_on_host.display())
}

/// Applies a device's configured rate limiter.
fn limit(pmem: &mut Pmem, p: &PmemConfig) {
    if let Some(l) = &p.rate_limiter {
        let (bandwidth, ops) = l.buckets();
        pmem.update_rate_limiter(bandwidth, ops);
    }
}
