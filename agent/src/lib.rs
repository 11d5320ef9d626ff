//! The guest agent of the `vmm` microVM monitor: its wire protocol and the
//! host's client.
//!
//! The agent (the `vmm-agent` binary of this crate) runs inside the guest and
//! executes commands for the host over a stream connection: AF_VSOCK port
//! [`DEFAULT_PORT`] in a guest, or a Unix socket in tests. Each connection
//! carries one request: run a command (streaming stdin, stdout and stderr
//! with back-pressure, forwarding signals, ending with its exit status), put a
//! file or get a file. docs/AGENT.md describes the protocol byte by byte.
//!
//! - [`protocol`]: frames, their types, and the decoded messages of both sides.
//! - [`client`]: [`AgentClient`], the blocking host side.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod client;
pub mod protocol;

pub use client::{AgentClient, Error, Execution, Signaller};
pub use protocol::{
    ExecRequest, ExitStatus, FrameType, GetFileRequest, ProtocolError, PutFileRequest, Reply,
    Request, CHUNK_SIZE, DEFAULT_PORT, MAX_PAYLOAD,
};
