pub mod arch;
pub mod config;
pub mod loader;
