pub mod arch;
pub mod config;
pub mod exit;
pub mod loader;
