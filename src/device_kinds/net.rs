//! Network interfaces: virtio-net devices on TAP devices
//! (`network-interfaces`), with the metadata service in front where the
//! configuration routes it.

use devices::mmds::stack::MmdsStack;
use devices::mmds::SharedMmds;
use devices::persist::Persist;
use devices::virtio::net::{Net, NetBackend};
use devices::virtio::tap::Tap;
use devices::virtio::VirtioDevice;

use super::{configured, DeviceKind, Error, NamedDevice, Opening, Reopening};
use crate::config::{NetworkInterface, VmConfig};
use crate::device_manager::VirtioKind;
use crate::snapshot::VirtioDeviceState;

/// Network interfaces.
pub struct NetKind;

impl DeviceKind for NetKind {
    fn kind(&self) -> VirtioKind {
        VirtioKind::Net
    }

    /// Attaches every TAP device (eth0, ...).
    fn open(&self, o: &mut Opening) -> Result<Vec<NamedDevice>, Error> {
        let mut out: Vec<NamedDevice> = Vec::new();
        for n in &o.config.network_interfaces {
            let mut net =
                Net::new(Tap::open(&n.host_dev_name)?, n.mac()?.0).with_mrg_rxbuf(n.mrg_rxbuf);
            if let Some(mtu) = n.mtu {
                // Validated: 68..=65535.
                net = net.with_mtu(mtu as u16);
            }
            limit(&mut net, n);
            attach_mmds(&mut net, o.config, &n.iface_id, o.mmds);
            out.push(((n.iface_id.clone(), self.kind(), label(n)), Box::new(net)));
        }
        Ok(out)
    }

    fn save(&self, device: &mut dyn VirtioDevice) -> Option<VirtioDeviceState> {
        let n = device.as_any_mut().downcast_mut::<Net<Tap>>()?;
        Some(VirtioDeviceState::Net(n.save()))
    }

    /// Opens the TAP by the configured name (after `network_overrides`).
    fn reopen(
        &self,
        r: &Reopening,
        id: &str,
        saved: &VirtioDeviceState,
    ) -> Option<Result<(NamedDevice, bool), Error>> {
        let VirtioDeviceState::Net(n) = saved else {
            return None;
        };
        Some((|| {
            let config = &r.state.config;
            // check() matched every saved device with a configured one.
            let iface = configured(
                config.network_interfaces.iter().find(|i| i.iface_id == id),
                &format!("network interface '{id}'"),
            )?;
            let Ok(mut net) = Net::restore(Tap::open(&iface.host_dev_name)?, n);
            limit(&mut net, iface);
            attach_mmds(&mut net, config, id, r.mmds);
            let named: NamedDevice = ((id.to_string(), self.kind(), label(iface)), Box::new(net));
            Ok((named, false))
        })())
    }
}

/// How the log names an interface.
fn label(n: &NetworkInterface) -> String {
    format!("net {} ({})", n.iface_id, n.host_dev_name)
}

/// Puts the metadata service in front of interface `id`'s TAP if the
/// configuration routes the service through it, and sets the store's version.
fn attach_mmds<B: NetBackend>(net: &mut Net<B>, config: &VmConfig, id: &str, mmds: &SharedMmds) {
    let Some(m) = &config.mmds_config else { return };
    if m.network_interfaces.iter().any(|i| i == id) {
        mmds.lock()
            .unwrap_or_else(|e| e.into_inner())
            .configure(m.version, m.imds_compat);
        net.set_mmds(Some(MmdsStack::new(m.ipv4_address.octets(), mmds.clone())));
    }
}

/// Applies an interface's configured rate limiters to its device.
fn limit<B: NetBackend>(net: &mut Net<B>, n: &NetworkInterface) {
    net.update_rate_limiters(
        n.rx_rate_limiter.as_ref().map(|l| l.buckets()),
        n.tx_rate_limiter.as_ref().map(|l| l.buckets()),
    );
}
