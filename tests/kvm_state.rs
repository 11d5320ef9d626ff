//! vCPU and VM state through KVM on this host (groundwork for snapshots): a
//! running test guest is paused, every vCPU's state is saved on its own
//! thread, and the state is restored into a fresh KVM VM, whose saved state
//! must then match. What this host's KVM cannot save is printed, by name.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guest, host};
use vmm::config::VmConfig;
use vmm::exit::ExitSignal;
use vmm::runtime::{EventLoop, RunOptions};
use vmm::vmm::Vmm;
use vmm::vstate::vcpu::Vcpu;
use vmm::vstate::vm::Vm;

use erased::Ser;

/// MSRs whose value moves with time or with the host: not compared.
const TIME_MSRS: &[u32] = &[0x10, 0x3b, 0x6e0, 0x4b56_4d00, 0x4b56_4d01, 0x11, 0x12];

#[test]
fn a_paused_guest_s_kvm_state_restores_into_a_fresh_vm() {
    let host = host();
    let exit = Arc::new(ExitSignal::new().unwrap());
    let mut el = EventLoop::new(exit.clone(), RunOptions::default()).unwrap();
    let mut config = VmConfig::new(guest("counter"));
    config.machine_config.vcpu_count = 2;
    let mut vmm = Vmm::new(config, exit, Box::new(std::io::sink()), Instant::now());
    vmm.start(&mut el).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vmm.pause().unwrap();
    let (vm_state, vcpus) = vmm.save_kvm_state().unwrap();
    assert_eq!(vcpus.len(), 2);
    let boot = &vcpus[0];
    eprintln!(
        "host {host:?}: saved {} MSRs, RIP {:#x}, unavailable: {:?}",
        boot.msrs.as_slice().len(),
        boot.regs.rip,
        boot.unavailable
    );
    assert!(
        (0x20_0000..0x20_1000).contains(&boot.regs.rip),
        "the boot vCPU is in the counter guest's code: {:#x}",
        boot.regs.rip
    );
    assert!(!boot.msrs.as_slice().is_empty());
    // The application processor was never started: no INIT, no SIPI yet.
    assert_eq!(
        vcpus[1].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED
    );

    // A fresh VM takes the state, and gives back the same.
    let fresh = Vm::new().unwrap();
    fresh.setup_irqchip().unwrap();
    fresh.restore_state(&vm_state, false).unwrap();
    let msr_list = fresh.saveable_msrs().unwrap();
    for saved in &vcpus {
        let vcpu = Vcpu::new(fresh.create_vcpu(saved.index).unwrap(), saved.index);
        vcpu.restore_state(saved).unwrap();
        let again = vcpu.save_state(&msr_list).unwrap();
        assert_eq!(
            again.regs.value(),
            saved.regs.value(),
            "registers of vCPU {}",
            saved.index
        );
        assert_eq!(
            again.sregs.value(),
            saved.sregs.value(),
            "special registers"
        );
        assert_eq!(
            again.debug_regs.value(),
            saved.debug_regs.value(),
            "debug registers"
        );
        assert_eq!(again.mp_state.mp_state, saved.mp_state.mp_state);
        let before: Vec<(u32, u64)> = saved
            .msrs
            .as_slice()
            .iter()
            .map(|m| (m.index, m.data))
            .collect();
        let after: Vec<(u32, u64)> = again
            .msrs
            .as_slice()
            .iter()
            .map(|m| (m.index, m.data))
            .collect();
        assert_eq!(
            before.iter().map(|m| m.0).collect::<Vec<_>>(),
            after.iter().map(|m| m.0).collect::<Vec<_>>(),
            "the same MSRs are readable"
        );
        for (b, a) in before.iter().zip(&after) {
            if !TIME_MSRS.contains(&b.0) {
                assert_eq!(b, a, "MSR {:#x} of vCPU {}", b.0, saved.index);
            }
        }
    }
    let again = fresh.save_state().unwrap();
    assert_eq!(again.ioapic.value(), vm_state.ioapic.value(), "IOAPIC");
    eprintln!("asserting: registers, special and debug registers, MP state, non-time MSRs and the IOAPIC survive save -> restore -> save");
    vmm.resume().unwrap();
    vmm.shutdown();
}

/// Serializing any saved piece, for comparison.
mod erased {
    pub trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}
