//! Saving and restoring device state, for snapshots.
//!
//! A device's state is plain serde data: what the guest programmed into it
//! and what is in flight inside it, never a host resource. Restoring takes the
//! state plus the host resources the device needs anew (interrupt lines, the
//! console writer, the exit requester, an opened disk image or TAP), so a
//! restored device reopens nothing behind the VMM's back. A saved state is
//! checked on restore as anything else from outside is: a state the device
//! cannot be in is an error, never a panic. Saving, restoring and saving
//! again gives the same state.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device whose state can be saved and restored.
pub trait Persist: Sized {
    /// The saved state.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug;
    /// The host resources a restored device needs.
    type Resources;
    /// Why a state cannot be restored (`Infallible` where any state is fine).
    type Error: std::error::Error;

    /// The device's state now.
    fn save(&self) -> Self::State;
    /// A device in `state`, using `resources`.
    fn restore(resources: Self::Resources, state: &Self::State) -> Result<Self, Self::Error>;
}
