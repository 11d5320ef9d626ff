//! EXEC: run a command and stream its stdio over the connection.
//!
//! One thread serves one command with a poll(2) loop over the connection,
//! the command's three pipes and a pidfd. Nothing is read without room to put
//! it: the command's output is read only when the previous frame has gone to
//! the host, and the connection only when the previous STDIN chunk has gone
//! to the command. So the agent holds at most one outgoing frame per output
//! pipe (64 KiB each) and one STDIN frame (at most 1 MiB) per connection.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use vmm_agent::protocol::{Decoded, FrameDecoder, ProtocolError, Reply, Request, CHUNK_SIZE};
use vmm_agent::{ExecRequest, ExitStatus};

use super::{send, sys, ConnectionError};

/// The command search path when neither the agent nor the request has one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How often the loop looks for the command's exit when the kernel has no
/// pidfd (before Linux 5.3).
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Runs the command of `request`, streaming until it ends and its EXIT is
/// sent. The command runs in a process group of its own; if the connection
/// fails first, the whole group is killed.
pub fn run(conn: &mut File, request: ExecRequest) -> Result<(), ConnectionError> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err(ProtocolError::EmptyArgv.into());
    };
    if let Some(cwd) = &request.cwd {
        if let Err(e) = check_dir(cwd) {
            let message = format!("cannot use {cwd} as the working directory: {e}");
            return send(conn, &Reply::Error(message));
        }
    }
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .stdin(if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if std::env::var_os("PATH").is_none() && !request.env.iter().any(|(k, _)| k == "PATH") {
        command.env("PATH", DEFAULT_PATH);
    }
    if let Some(cwd) = &request.cwd {
        command.current_dir(cwd);
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return report_spawn_failure(conn, program, &e),
    };
    let mut session = Session::new(conn, child, request.stdin);
    session.start()?;
    session.run()
}

fn check_dir(path: &str) -> io::Result<()> {
    if fs::metadata(path)?.is_dir() {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::ENOTDIR))
    }
}

/// Reports a command that cannot start the way a shell does: 127 when it is
/// not found, 126 when it cannot be executed, with a line on stderr. Other
/// failures are an ERROR.
fn report_spawn_failure(
    conn: &mut File,
    program: &str,
    error: &io::Error,
) -> Result<(), ConnectionError> {
    let (code, what) = match (error.kind(), error.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => (127, "not found"),
        (io::ErrorKind::PermissionDenied, _) => (126, "Permission denied"),
        (_, Some(libc::ENOEXEC)) => (126, "Exec format error"),
        _ => {
            return send(
                conn,
                &Reply::Error(format!("cannot run {program}: {error}")),
            )
        }
    };
    let line = format!("vmm-agent: {program}: {what}\n");
    send(conn, &Reply::Stderr(line.into_bytes()))?;
    send(conn, &Reply::Exit(ExitStatus::Code(code)))
}

/// Frames waiting to go to the host.
#[derive(Default)]
struct OutBuf {
    buf: Vec<u8>,
    sent: usize,
}

impl OutBuf {
    fn is_empty(&self) -> bool {
        self.sent == self.buf.len()
    }

    fn push(&mut self, reply: &Reply) -> Result<(), ConnectionError> {
        if self.is_empty() {
            self.buf.clear();
            self.sent = 0;
        }
        reply
            .encode_into(&mut self.buf)
            .map_err(ConnectionError::Send)
    }

    /// Writes what the non-blocking `conn` takes now.
    fn flush(&mut self, conn: &mut File) -> Result<(), ConnectionError> {
        while !self.is_empty() {
            match conn.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(ConnectionError::Send(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnectionError::Send(e)),
            }
        }
        Ok(())
    }
}

/// What one read of an output pipe gave.
enum PipeRead {
    Data(usize),
    Empty,
    Closed,
}

fn read_pipe(pipe: &mut impl Read, buf: &mut [u8]) -> PipeRead {
    loop {
        match pipe.read(buf) {
            Ok(0) => return PipeRead::Closed,
            Ok(n) => return PipeRead::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return PipeRead::Empty,
            // A pipe that fails to read is treated as closed.
            Err(_) => return PipeRead::Closed,
        }
    }
}

/// A running command and its connection.
struct Session<'a> {
    conn: &'a mut File,
    decoder: FrameDecoder,
    out: OutBuf,
    child: Child,
    pidfd: Option<OwnedFd>,
    /// Whether the host streams stdin (else STDIN frames are errors).
    stdin_wanted: bool,
    /// The command's stdin, until the host ends it or the command closes it.
    stdin: Option<ChildStdin>,
    /// The STDIN chunk being written to the command, and how much of it is.
    stdin_buf: Vec<u8>,
    stdin_written: usize,
    /// The host sent the end of stdin.
    stdin_ended: bool,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// Set once the command has exited (and been reaped).
    status: Option<ExitStatus>,
    scratch: Vec<u8>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if self.status.is_none() {
            // The connection failed while the command runs: end its whole
            // process group and reap it.
            let _ = sys::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl<'a> Session<'a> {
    fn new(conn: &'a mut File, mut child: Child, stdin_wanted: bool) -> Self {
        Session {
            conn,
            decoder: FrameDecoder::new(),
            out: OutBuf::default(),
            // Without a pidfd, the loop polls for the exit instead.
            pidfd: sys::pidfd_open(child.id()).ok(),
            stdin_wanted,
            stdin: child.stdin.take(),
            stdin_buf: Vec::new(),
            stdin_written: 0,
            stdin_ended: false,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            status: None,
            scratch: vec![0; CHUNK_SIZE],
        }
    }

    /// Sends STARTED and makes every descriptor non-blocking.
    fn start(&mut self) -> Result<(), ConnectionError> {
        send(self.conn, &Reply::Started(self.child.id()))?;
        let watch = ConnectionError::Watch;
        sys::set_nonblocking(self.conn, true).map_err(ConnectionError::Send)?;
        if let Some(stdin) = &self.stdin {
            sys::set_nonblocking(stdin, true).map_err(watch)?;
        }
        if let Some(stdout) = &self.stdout {
            sys::set_nonblocking(stdout, true).map_err(watch)?;
        }
        if let Some(stderr) = &self.stderr {
            sys::set_nonblocking(stderr, true).map_err(watch)?;
        }
        Ok(())
    }

    /// Whether the last STDIN chunk has gone to the command (so the next
    /// frame may be read).
    fn stdin_idle(&self) -> bool {
        self.stdin_written == self.stdin_buf.len()
    }

    fn run(&mut self) -> Result<(), ConnectionError> {
        let mut fds = Vec::with_capacity(5);
        loop {
            if let Some(status) = self.status {
                if self.out.is_empty() {
                    if !self.drain_output()? {
                        self.out.push(&Reply::Exit(status))?;
                        return self.flush_all();
                    }
                    // Drain on, or wait below for the host to take the chunk.
                    continue;
                }
            }
            let running = self.status.is_none();
            let read_output = running && self.out.is_empty();

            fds.clear();
            let mut conn_events = 0;
            if !self.out.is_empty() {
                conn_events |= libc::POLLOUT;
            }
            if running && self.stdin_idle() {
                conn_events |= libc::POLLIN;
            }
            fds.push(sys::pollfd(self.conn, conn_events));
            let stdin_at = push_if(
                &mut fds,
                self.stdin.as_ref(),
                !self.stdin_idle(),
                libc::POLLOUT,
            );
            let stdout_at = push_if(&mut fds, self.stdout.as_ref(), read_output, libc::POLLIN);
            let stderr_at = push_if(&mut fds, self.stderr.as_ref(), read_output, libc::POLLIN);
            let pidfd_at = push_if(&mut fds, self.pidfd.as_ref(), running, libc::POLLIN);
            let timeout = (running && self.pidfd.is_none()).then_some(EXIT_POLL);

            sys::poll(&mut fds, timeout).map_err(ConnectionError::Watch)?;
            let ready = |at: Option<usize>| at.is_some_and(|i| fds[i].revents != 0);

            let conn_revents = fds[0].revents;
            if conn_revents & libc::POLLOUT != 0 {
                self.out.flush(self.conn)?;
            }
            if conn_revents & libc::POLLIN != 0 {
                self.read_request()?;
            } else if conn_revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(ConnectionError::HostGone);
            }
            if ready(stdin_at) {
                self.write_stdin();
            }
            if ready(stdout_at) {
                self.read_output(false)?;
            }
            if ready(stderr_at) {
                self.read_output(true)?;
            }
            if running && (ready(pidfd_at) || self.pidfd.is_none()) {
                self.check_exit()?;
            }
        }
    }

    /// Reads (part of) the next frame from the host and acts on it.
    fn read_request(&mut self) -> Result<(), ConnectionError> {
        let frame = match self.decoder.read_from(self.conn)? {
            Decoded::Frame(frame) => frame,
            Decoded::Partial | Decoded::Blocked => return Ok(()),
            Decoded::End => return Err(ConnectionError::HostGone),
        };
        match Request::decode(frame)? {
            Request::Stdin(bytes) => {
                let state = if !self.stdin_wanted {
                    "for a command started without stdin"
                } else if self.stdin_ended {
                    "after the end of stdin"
                } else {
                    ""
                };
                if !state.is_empty() {
                    let kind = vmm_agent::FrameType::Stdin;
                    return Err(ProtocolError::Unexpected { kind, state }.into());
                }
                if bytes.is_empty() {
                    self.stdin_ended = true;
                    self.stdin = None;
                } else if self.stdin.is_some() {
                    self.stdin_buf = bytes;
                    self.stdin_written = 0;
                }
                // Else the command closed its stdin: the bytes have nowhere
                // to go and are dropped.
            }
            Request::Signal(signal) => {
                // It fails only if the command is gone, which EXIT will say.
                let _ = sys::kill(self.child.id() as libc::pid_t, signal as libc::c_int);
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    kind: other.kind(),
                    state: "while a command runs",
                }
                .into())
            }
        }
        Ok(())
    }

    /// Writes what the command takes of the current STDIN chunk.
    fn write_stdin(&mut self) {
        let Some(stdin) = &mut self.stdin else {
            return;
        };
        match stdin.write(&self.stdin_buf[self.stdin_written..]) {
            Ok(n) => self.stdin_written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EPIPE: the command closed its stdin; later chunks are dropped.
            Err(_) => self.stdin = None,
        }
        if self.stdin.is_none() || self.stdin_idle() {
            self.stdin_buf = Vec::new();
            self.stdin_written = 0;
        }
    }

    /// One read of the command's stdout (or stderr) into `scratch`; None if
    /// that pipe is closed already.
    fn read_from(&mut self, stderr: bool) -> Option<PipeRead> {
        if stderr {
            self.stderr
                .as_mut()
                .map(|p| read_pipe(p, &mut self.scratch))
        } else {
            self.stdout
                .as_mut()
                .map(|p| read_pipe(p, &mut self.scratch))
        }
    }

    /// Reads one chunk of the command's stdout (or stderr) into a frame.
    fn read_output(&mut self, stderr: bool) -> Result<(), ConnectionError> {
        match self.read_from(stderr) {
            Some(PipeRead::Data(n)) => self.push_output(stderr, n)?,
            Some(PipeRead::Closed) => self.close_output(stderr),
            Some(PipeRead::Empty) | None => {}
        }
        Ok(())
    }

    fn push_output(&mut self, stderr: bool, n: usize) -> Result<(), ConnectionError> {
        let bytes = self.scratch[..n].to_vec();
        let reply = if stderr {
            Reply::Stderr(bytes)
        } else {
            Reply::Stdout(bytes)
        };
        self.out.push(&reply)?;
        self.out.flush(self.conn)
    }

    fn close_output(&mut self, stderr: bool) {
        if stderr {
            self.stderr = None;
        } else {
            self.stdout = None;
        }
    }

    /// After the command's exit: moves one more chunk of what it left in its
    /// pipes into a frame. Returns false once both pipes are empty. A pipe
    /// still open but empty (held by a process the command left behind) is
    /// not waited for.
    fn drain_output(&mut self) -> Result<bool, ConnectionError> {
        for stderr in [false, true] {
            match self.read_from(stderr) {
                Some(PipeRead::Data(n)) => {
                    self.push_output(stderr, n)?;
                    return Ok(true);
                }
                Some(PipeRead::Empty | PipeRead::Closed) => self.close_output(stderr),
                None => {}
            }
        }
        Ok(false)
    }

    fn check_exit(&mut self) -> Result<(), ConnectionError> {
        let Some(status) = self.child.try_wait().map_err(ConnectionError::Watch)? else {
            return Ok(());
        };
        self.status = Some(match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(signal)) => ExitStatus::Signal(signal),
            // waitpid() without WUNTRACED reports only exits and kills.
            (None, None) => ExitStatus::Code(-1),
        });
        // The host's further stdin has no reader.
        self.stdin = None;
        Ok(())
    }

    /// Sends everything queued, waiting for the host to take it.
    fn flush_all(&mut self) -> Result<(), ConnectionError> {
        loop {
            self.out.flush(self.conn)?;
            if self.out.is_empty() {
                return Ok(());
            }
            let mut fds = [sys::pollfd(self.conn, libc::POLLOUT)];
            sys::poll(&mut fds, None).map_err(ConnectionError::Send)?;
        }
    }
}

fn push_if(
    fds: &mut Vec<libc::pollfd>,
    fd: Option<&impl std::os::fd::AsRawFd>,
    wanted: bool,
    events: libc::c_short,
) -> Option<usize> {
    let fd = fd.filter(|_| wanted)?;
    fds.push(sys::pollfd(fd, events));
    Some(fds.len() - 1)
}
