//! x86_64 specifics: memory layout, boot tables, CPU register and CPUID setup.
pub mod acpi;
pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;
