//! The KVM-backed state of a VM: guest memory, the VM file descriptor, vCPUs.
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
