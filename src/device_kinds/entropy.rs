//! The entropy device (`entropy`): virtio-rng from the host's getrandom,
//! under its optional rate limiter.

use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;

use super::{configured, DeviceKind, Error, NamedDevice, Opening, Reopening};
use crate::config::EntropyConfig;
use crate::device_manager::VirtioKind;
use crate::snapshot::{self, VirtioDeviceState};

/// The entropy device.
pub struct EntropyKind;

impl DeviceKind for EntropyKind {
    fn kind(&self) -> VirtioKind {
        VirtioKind::Entropy
    }

    fn open(&self, o: &mut Opening) -> Result<Vec<NamedDevice>, Error> {
        Ok(o.config
            .entropy
            .iter()
            .map(|e| -> NamedDevice { (names(), Box::new(device(e))) })
            .collect())
    }

    /// Nothing of its own beyond the transport.
    fn save(&self, device: &mut dyn VirtioDevice) -> Option<VirtioDeviceState> {
        device.as_any_mut().downcast_mut::<Rng>()?;
        Some(VirtioDeviceState::Entropy)
    }

    fn reopen(
        &self,
        r: &Reopening,
        _: &str,
        saved: &VirtioDeviceState,
    ) -> Option<Result<(NamedDevice, bool), Error>> {
        let VirtioDeviceState::Entropy = saved else {
            return None;
        };
        Some(
            configured(r.state.config.entropy.as_ref(), "its entropy device")
                .map(|e| -> (NamedDevice, bool) { ((names(), Box::new(device(e))), false) }),
        )
    }
}

fn names() -> (String, VirtioKind, String) {
    (
        snapshot::ENTROPY_ID.to_string(),
        VirtioKind::Entropy,
        "entropy".to_string(),
    )
}

/// The entropy device as configured.
fn device(e: &EntropyConfig) -> Rng {
    let (bandwidth, ops) = e
        .rate_limiter
        .as_ref()
        .map(|l| l.buckets())
        .unwrap_or_default();
    Rng::new().with_rate_limiter(bandwidth, ops)
}
