//! The memory balloon (`balloon`).

use devices::virtio::balloon::Balloon;
use devices::virtio::VirtioDevice;

use super::{DeviceKind, Error, NamedDevice, Opening, Reopening};
use crate::device_manager::VirtioKind;
use crate::snapshot::{self, VirtioDeviceState};

/// Balloon pages (4 KiB) in a MiB.
pub const MIB_PAGES: u32 = 256;

/// The balloon.
pub struct BalloonKind;

impl DeviceKind for BalloonKind {
    fn kind(&self) -> VirtioKind {
        VirtioKind::Balloon
    }

    fn open(&self, o: &mut Opening) -> Result<Vec<NamedDevice>, Error> {
        Ok(o.config
            .balloon
            .iter()
            .map(|b| -> NamedDevice {
                let balloon = Balloon::new(
                    b.amount_mib.saturating_mul(MIB_PAGES),
                    b.deflate_on_oom,
                    b.stats_polling_interval_s,
                );
                (names(snapshot::BALLOON_ID), Box::new(balloon))
            })
            .collect())
    }

    fn save(&self, device: &mut dyn VirtioDevice) -> Option<VirtioDeviceState> {
        let b = device.as_any_mut().downcast_mut::<Balloon>()?;
        Some(VirtioDeviceState::Balloon(b.save()))
    }

    /// Its target and the size the guest reported, as saved.
    fn reopen(
        &self,
        _: &Reopening,
        id: &str,
        saved: &VirtioDeviceState,
    ) -> Option<Result<(NamedDevice, bool), Error>> {
        let VirtioDeviceState::Balloon(b) = saved else {
            return None;
        };
        let named: NamedDevice = (names(id), Box::new(Balloon::restore(b)));
        Some(Ok((named, false)))
    }
}

fn names(id: &str) -> (String, VirtioKind, String) {
    (id.to_string(), VirtioKind::Balloon, "balloon".to_string())
}
