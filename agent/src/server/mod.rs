//! The agent's side of a connection: read the request, serve it, close.

mod exec;
pub mod sys;

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::{Duration, Instant};

use vmm_agent::protocol::{read_frame, ProtocolError, Reply, Request, CHUNK_SIZE};
use vmm_agent::{GetFileRequest, PutFileRequest};

/// How long a closing connection waits for the host to close its end, so
/// that the last frames are not lost to a reset (see [`close`]).
const LINGER: Duration = Duration::from_secs(2);

/// Why a connection ended early. Logged, and sent to the host as ERROR when
/// the connection still works.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The host broke the protocol.
    #[error("the host broke the protocol")]
    Protocol(#[from] ProtocolError),
    /// Writing to the host failed.
    #[error("writing to the host failed")]
    Send(#[source] io::Error),
    /// The host closed the connection before the request's end.
    #[error("the host closed the connection in the middle of a request")]
    HostGone,
    /// Waiting for the command or its pipes failed.
    #[error("watching the command failed")]
    Watch(#[source] io::Error),
}

/// Serves the one request of the connection `conn`, then closes it.
pub fn serve(mut conn: File) -> Result<(), ConnectionError> {
    let result = serve_request(&mut conn);
    if let Err(ConnectionError::Protocol(e)) = &result {
        // Best effort, without blocking on a host that does not read: tell
        // it what was wrong before closing.
        let _ = sys::set_nonblocking(&conn, true);
        let _ = Reply::Error(error_chain(e)).write_to(&mut conn);
    }
    close(conn);
    result
}

fn serve_request(conn: &mut File) -> Result<(), ConnectionError> {
    let Some(frame) = read_frame(conn)? else {
        return Ok(());
    };
    match Request::decode(frame)? {
        Request::Exec(request) => exec::run(conn, request),
        Request::PutFile(request) => put_file(conn, &request),
        Request::GetFile(request) => get_file(conn, &request),
        other => Err(ProtocolError::Unexpected {
            kind: other.kind(),
            state: "at the start of a connection",
        }
        .into()),
    }
}

fn send(conn: &mut File, reply: &Reply) -> Result<(), ConnectionError> {
    reply.write_to(conn).map_err(ConnectionError::Send)
}

/// Writes the file, then answers OK or ERROR once the host has sent its end:
/// the agent reads (and drops) the rest of the data after a write failure, so
/// that the host, which does not read while it sends, is never stuck.
fn put_file(conn: &mut File, request: &PutFileRequest) -> Result<(), ConnectionError> {
    let mode = request.mode & 0o7777;
    let opened = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&request.path)
        // The mode of open() is filtered by the umask; the request's is not.
        .and_then(|file| {
            file.set_permissions(Permissions::from_mode(mode))
                .map(|()| file)
        });
    let (mut file, mut failure) = match opened {
        Ok(file) => (Some(file), None),
        Err(e) => (None, Some(format!("cannot write {}: {e}", request.path))),
    };
    let received = receive_file(conn, &mut file, &mut failure, &request.path);
    if received.is_err() && file.is_some() {
        // The host went away or broke the protocol: no half-written file.
        let _ = fs::remove_file(&request.path);
    }
    received?;
    match failure {
        None => send(conn, &Reply::Ok),
        Some(message) => send(conn, &Reply::Error(message)),
    }
}

fn receive_file(
    conn: &mut File,
    file: &mut Option<File>,
    failure: &mut Option<String>,
    path: &str,
) -> Result<(), ConnectionError> {
    loop {
        let frame = read_frame(conn)?.ok_or(ConnectionError::HostGone)?;
        match Request::decode(frame)? {
            Request::Data(bytes) if bytes.is_empty() => return Ok(()),
            Request::Data(bytes) => {
                if let Some(f) = file {
                    if let Err(e) = f.write_all(&bytes) {
                        *failure = Some(format!("cannot write {path}: {e}"));
                        *file = None;
                    }
                }
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    kind: other.kind(),
                    state: "during PUT_FILE",
                }
                .into())
            }
        }
    }
}

fn get_file(conn: &mut File, request: &GetFileRequest) -> Result<(), ConnectionError> {
    let path = &request.path;
    let opened = File::open(path).and_then(|file| {
        if file.metadata()?.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        Ok(file)
    });
    let mut file = match opened {
        Ok(file) => file,
        Err(e) => return send(conn, &Reply::Error(format!("cannot read {path}: {e}"))),
    };
    let mut buf = vec![0; CHUNK_SIZE];
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return send(conn, &Reply::Error(format!("cannot read {path}: {e}"))),
        };
        send(conn, &Reply::Data(buf[..n].to_vec()))?;
        if n == 0 {
            return Ok(());
        }
    }
}

/// Closes a connection gracefully: ends our direction, then reads and drops
/// what the host still sends until it closes its end or [`LINGER`] passes.
/// Closing a socket with unread bytes in it may reset the connection, which
/// can destroy our last frames before the host reads them.
fn close(conn: File) {
    if sys::shutdown_write(&conn).is_err() || sys::set_nonblocking(&conn, true).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut buf = vec![0; CHUNK_SIZE];
    let mut conn = conn;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fds = [sys::pollfd(&conn, libc::POLLIN)];
        match sys::poll(&mut fds, Some(left)) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// An error and its sources as one line: "a: b: c".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
