//! Drives: virtio-blk devices on disk images (`drives` in the configuration).

use devices::persist::Persist;
use devices::virtio::block::Block;
use devices::virtio::VirtioDevice;

use super::{DeviceKind, Error, NamedDevice, Opening, Reopening};
use crate::config::Drive;
use crate::device_manager::VirtioKind;
use crate::snapshot::VirtioDeviceState;

/// Drives.
pub struct BlockKind;

impl DeviceKind for BlockKind {
    fn kind(&self) -> VirtioKind {
        VirtioKind::Block
    }

    /// Opens (and locks) every disk image, the root device first (vda, vdb, ...).
    fn open(&self, o: &mut Opening) -> Result<Vec<NamedDevice>, Error> {
        let mut out: Vec<NamedDevice> = Vec::new();
        for d in o.config.ordered_drives() {
            log_not_enforced(&d.drive_id, d);
            let mut block =
                Block::open(&d.path_on_host, d.is_read_only, Some(d.effective_serial()))?;
            limit(&mut block, d);
            out.push(((d.drive_id.clone(), self.kind(), label(d)), Box::new(block)));
        }
        Ok(out)
    }

    fn save(&self, device: &mut dyn VirtioDevice) -> Option<VirtioDeviceState> {
        let b = device.as_any_mut().downcast_mut::<Block>()?;
        Some(VirtioDeviceState::Block(b.save()))
    }

    /// Reopens the image by path, locked as at boot (a writable image
    /// another VM holds is refused); says whether its size changed.
    fn reopen(
        &self,
        r: &Reopening,
        id: &str,
        saved: &VirtioDeviceState,
    ) -> Option<Result<(NamedDevice, bool), Error>> {
        let VirtioDeviceState::Block(b) = saved else {
            return None;
        };
        Some((|| {
            let mut block = Block::restore((), b)?;
            let drive = r.state.config.drives.iter().find(|d| d.drive_id == id);
            if let Some(d) = drive {
                limit(&mut block, d);
            }
            let resized = block.capacity() != b.capacity;
            let label = format!("disk {id} ({})", b.path.display());
            let named: NamedDevice = ((id.to_string(), self.kind(), label), Box::new(block));
            Ok((named, resized))
        })())
    }
}

/// How the log names a drive.
fn label(d: &Drive) -> String {
    format!("disk {} ({})", d.drive_id, d.path_on_host.display())
}

/// Applies a drive's configured rate limiter to its device.
fn limit(block: &mut Block, d: &Drive) {
    if let Some(l) = &d.rate_limiter {
        let (bandwidth, ops) = l.buckets();
        block.update_rate_limiter(bandwidth, ops);
    }
}

/// Logs, once per drive, the accepted fields that change nothing yet.
fn log_not_enforced(id: &str, d: &Drive) {
    if d.io_engine == crate::config::IoEngine::Async {
        log::warn!("drive '{id}': io_engine Async is stored; I/O is served synchronously");
    }
    if d.cache_type == crate::config::CacheType::Writeback {
        log::info!("drive '{id}': cache_type Writeback: flushes are honoured, as always");
    }
}
