//! x86_64 specifics: memory layout, boot tables, CPU register and CPUID setup.
pub mod layout;
