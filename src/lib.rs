pub mod arch;
pub mod config;
