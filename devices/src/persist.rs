//! Saving and restoring device state (groundwork for snapshots, issue 9).
//!
//! A device's state is plain serde data: what the guest programmed into it
//! and what is in flight inside it, never a host resource. Restoring takes the
//! state plus the host resources the device needs anew (interrupt lines, the
//! console writer, the exit requester), so a restored device reopens nothing
//! behind the VMM's back. Saving, restoring and saving again gives the same
//! state.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device whose state can be saved and restored.
pub trait Persist: Sized {
    /// The saved state.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug;
    /// The host resources a restored device needs.
    type Resources;

    /// The device's state now.
    fn save(&self) -> Self::State;
    /// A device in `state`, using `resources`.
    fn restore(resources: Self::Resources, state: &Self::State) -> Self;
}
