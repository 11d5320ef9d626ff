//! Snapshots (groundwork for issue 9): the versioned, checksummed file that
//! holds a paused VM's state. The guest memory goes to a separate file.

pub mod format;
