//! PCI: a function's configuration space, MSI-X, and bus 0 with its host
//! bridge behind configuration mechanism #1 and ECAM. The virtio PCI
//! transport (issue 19, part 2) is built on these; like every device here
//! they build and are tested without KVM, and every guest-given offset,
//! width and value is checked.

pub mod config;
pub mod msix;
pub mod root;
