//! The host side: a blocking client for one agent connection.
//!
//! An [`AgentClient`] owns the two halves of one connection (a reader and a
//! writer, e.g. two handles of one Unix socket) and makes one request on it:
//! the agent serves one request per connection. [`AgentClient::exec`] runs a
//! command and streams its stdin, stdout and stderr both ways at once;
//! [`AgentClient::start`] does the same in two steps, giving a [`Signaller`]
//! to forward signals meanwhile.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread;

use crate::protocol::{
    read_frame, ExecRequest, ExitStatus, FrameType, GetFileRequest, ProtocolError, PutFileRequest,
    Reply, Request, CHUNK_SIZE,
};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing to the agent failed.
    #[error("writing to the agent failed")]
    Send(#[source] io::Error),
    /// The agent sent something the protocol does not allow.
    #[error("the agent broke the protocol")]
    Protocol(#[from] ProtocolError),
    /// The agent closed the connection before the request's last frame.
    #[error("the agent closed the connection before answering the request")]
    Closed,
    /// The agent answered with ERROR.
    #[error("the agent reported: {0}")]
    Agent(String),
    /// Writing the command's output or the fetched file locally failed.
    #[error("writing the received bytes failed")]
    Output(#[source] io::Error),
    /// Reading the file to send failed.
    #[error("reading the file to send failed")]
    Input(#[source] io::Error),
    /// A thread could not be started.
    #[error("starting a thread failed")]
    Thread(#[source] io::Error),
    /// The command has already ended: the signal was not sent.
    #[error("the command has already ended")]
    Ended,
}

/// The result of a client call.
pub type Result<T> = std::result::Result<T, Error>;

/// One connection to the agent, for one request.
pub struct AgentClient<R, W> {
    reader: R,
    writer: W,
}

impl AgentClient<UnixStream, UnixStream> {
    /// Connects to an agent listening on the Unix socket `path` (the agent's
    /// `--listen-unix`).
    pub fn connect_unix(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_unix(UnixStream::connect(path)?)
    }

    /// Uses an established Unix stream connection, e.g. one forwarded to the
    /// guest's vsock port.
    pub fn from_unix(stream: UnixStream) -> io::Result<Self> {
        Ok(Self::new(stream.try_clone()?, stream))
    }
}

impl<R: Read, W: Write + Send> AgentClient<R, W> {
    /// A client on a connection given as its reading and writing halves.
    pub fn new(reader: R, writer: W) -> Self {
        Self { reader, writer }
    }

    /// Runs a command: sends `stdin` to it if `request.stdin` is set (it is
    /// not read otherwise), copies its output to `stdout` and `stderr` as it
    /// arrives, and returns how it ended.
    ///
    /// `stdin` is read on a thread of its own, which is left behind if the
    /// command ends while a read of `stdin` blocks (it ends at that read's
    /// return). A failure to read `stdin` ends the command's stdin.
    pub fn exec(
        self,
        request: &ExecRequest,
        stdin: impl Read + Send + 'static,
        stdout: impl Write,
        stderr: impl Write,
    ) -> Result<ExitStatus> {
        self.start(request)?.wait(stdin, stdout, stderr)
    }

    /// Sends the EXEC request and returns the running command, to be waited
    /// for with [`Execution::wait`].
    pub fn start(mut self, request: &ExecRequest) -> Result<Execution<R, W>> {
        send(&mut self.writer, &Request::Exec(request.clone()))?;
        let (control_tx, control_rx) = mpsc::sync_channel(CONTROL_QUEUE);
        Ok(Execution {
            reader: self.reader,
            writer: self.writer,
            control_tx,
            control_rx,
            stdin: request.stdin,
        })
    }

    /// Writes `data` to the file `path` in the guest (created or truncated,
    /// with permission bits `mode`). Returns the number of bytes written.
    pub fn put_file(mut self, path: &str, mode: u32, mut data: impl Read) -> Result<u64> {
        let request = Request::PutFile(PutFileRequest {
            path: path.to_owned(),
            mode,
        });
        send(&mut self.writer, &request)?;
        let mut buf = vec![0; CHUNK_SIZE];
        let mut total = 0u64;
        loop {
            let n = match data.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Input(e)),
            };
            send(&mut self.writer, &Request::Data(buf[..n].to_vec()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        match next_reply(&mut self.reader)? {
            Reply::Ok => Ok(total),
            Reply::Error(message) => Err(Error::Agent(message)),
            other => Err(unexpected(other.kind(), "in answer to PUT_FILE")),
        }
    }

    /// Copies the file `path` of the guest to `out`. Returns its length.
    pub fn get_file(mut self, path: &str, mut out: impl Write) -> Result<u64> {
        let request = Request::GetFile(GetFileRequest {
            path: path.to_owned(),
        });
        send(&mut self.writer, &request)?;
        let mut total = 0u64;
        loop {
            match next_reply(&mut self.reader)? {
                Reply::Data(bytes) if bytes.is_empty() => break,
                Reply::Data(bytes) => {
                    out.write_all(&bytes).map_err(Error::Output)?;
                    total += bytes.len() as u64;
                }
                Reply::Error(message) => return Err(Error::Agent(message)),
                other => return Err(unexpected(other.kind(), "in answer to GET_FILE")),
            }
        }
        out.flush().map_err(Error::Output)?;
        Ok(total)
    }
}

/// How many chunks of stdin or signals wait between the threads of an
/// [`Execution`]: with 64 KiB chunks, at most 256 KiB of stdin is read ahead.
const CONTROL_QUEUE: usize = 4;

/// What the writing side of an execution sends to the agent.
enum Control {
    Stdin(Vec<u8>),
    StdinEnd,
    Signal(u32),
    Stop,
}

/// A command the agent was asked to run.
pub struct Execution<R, W> {
    reader: R,
    writer: W,
    control_tx: SyncSender<Control>,
    control_rx: Receiver<Control>,
    stdin: bool,
}

/// Sends signals to a running command from any thread.
#[derive(Clone)]
pub struct Signaller {
    control: SyncSender<Control>,
}

impl Signaller {
    /// Sends signal number `signal` (1 to 64; others are refused here) to
    /// the command. Signals queue behind the stdin already read for it.
    pub fn signal(&self, signal: u32) -> Result<()> {
        if !(1..=64).contains(&signal) {
            // The agent would end the connection, and the command with it.
            return Err(Error::Protocol(ProtocolError::BadSignal(signal)));
        }
        self.control
            .send(Control::Signal(signal))
            .map_err(|_| Error::Ended)
    }
}

impl<R: Read, W: Write + Send> Execution<R, W> {
    /// A handle that sends signals to the command while [`Self::wait`] runs.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            control: self.control_tx.clone(),
        }
    }

    /// Streams `stdin` to the command (if its request asked for stdin) and
    /// its output to `stdout` and `stderr` until it ends; see
    /// [`AgentClient::exec`].
    pub fn wait(
        self,
        stdin: impl Read + Send + 'static,
        mut stdout: impl Write,
        mut stderr: impl Write,
    ) -> Result<ExitStatus> {
        let Execution {
            mut reader,
            mut writer,
            control_tx,
            control_rx,
            stdin: wants_stdin,
        } = self;
        if wants_stdin {
            let tx = control_tx.clone();
            thread::Builder::new()
                .name("vmm-agent-stdin".into())
                .spawn(move || pump_stdin(stdin, tx))
                .map_err(Error::Thread)?;
        }
        thread::scope(|scope| {
            let sender = thread::Builder::new()
                .name("vmm-agent-send".into())
                .spawn_scoped(scope, || send_controls(&mut writer, control_rx))
                .map_err(Error::Thread)?;
            let status = receive_output(&mut reader, &mut stdout, &mut stderr);
            // Ends the sending thread: at once if it waits for work, after its
            // current write otherwise (which fails once the agent has closed).
            let _ = control_tx.send(Control::Stop);
            drop(control_tx);
            let sent = sender.join();
            match (status, sent) {
                (Ok(status), _) => Ok(status),
                // The agent closed early because a write of ours failed:
                // that is the more telling error.
                (Err(Error::Closed), Ok(Err(e))) => Err(e),
                (Err(e), _) => Err(e),
            }
        })
    }
}

/// Reads the caller's stdin in chunks and queues them for the agent; the
/// bounded queue makes this thread read only as fast as the agent takes it.
fn pump_stdin(mut stdin: impl Read, tx: SyncSender<Control>) {
    let mut buf = vec![0; CHUNK_SIZE];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Documented: a failed read ends the command's stdin.
            Err(_) => 0,
        };
        let message = if n == 0 {
            Control::StdinEnd
        } else {
            Control::Stdin(buf[..n].to_vec())
        };
        if tx.send(message).is_err() || n == 0 {
            return;
        }
    }
}

fn send_controls(writer: &mut impl Write, rx: Receiver<Control>) -> Result<()> {
    for control in rx {
        let request = match control {
            Control::Stdin(bytes) => Request::Stdin(bytes),
            Control::StdinEnd => Request::Stdin(Vec::new()),
            Control::Signal(signal) => Request::Signal(signal),
            Control::Stop => break,
        };
        send(writer, &request)?;
    }
    Ok(())
}

fn receive_output(
    reader: &mut impl Read,
    stdout: &mut impl Write,
    stderr: &mut impl Write,
) -> Result<ExitStatus> {
    loop {
        match next_reply(reader)? {
            Reply::Started(_) => {}
            Reply::Stdout(bytes) => write_flush(stdout, &bytes)?,
            Reply::Stderr(bytes) => write_flush(stderr, &bytes)?,
            Reply::Exit(status) => {
                stdout.flush().map_err(Error::Output)?;
                stderr.flush().map_err(Error::Output)?;
                return Ok(status);
            }
            Reply::Error(message) => return Err(Error::Agent(message)),
            other => return Err(unexpected(other.kind(), "in answer to EXEC")),
        }
    }
}

fn write_flush(out: &mut impl Write, bytes: &[u8]) -> Result<()> {
    out.write_all(bytes).map_err(Error::Output)?;
    out.flush().map_err(Error::Output)
}

fn send(writer: &mut impl Write, request: &Request) -> Result<()> {
    request.write_to(writer).map_err(Error::Send)?;
    writer.flush().map_err(Error::Send)
}

fn next_reply(reader: &mut impl Read) -> Result<Reply> {
    let frame = read_frame(reader)?.ok_or(Error::Closed)?;
    Ok(Reply::decode(frame)?)
}

fn unexpected(kind: FrameType, state: &'static str) -> Error {
    Error::Protocol(ProtocolError::Unexpected { kind, state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::write_frame;
    use std::io::Cursor;

    /// Runs `exec` against a fake agent that answers with `wire`, whatever
    /// it is sent.
    fn exec_against(wire: Vec<u8>) -> (Result<ExitStatus>, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let client = AgentClient::new(Cursor::new(wire), io::sink());
        let result = client.exec(&ExecRequest::new(["x"]), io::empty(), &mut out, &mut err);
        (result, out, err)
    }

    fn frames(list: &[(FrameType, &[u8])]) -> Vec<u8> {
        let mut wire = Vec::new();
        for (kind, payload) in list {
            write_frame(&mut wire, *kind, payload).unwrap();
        }
        wire
    }

    #[test]
    fn exec_collects_output_and_status() {
        let wire = frames(&[
            (FrameType::Started, &5u32.to_le_bytes()),
            (FrameType::Stdout, b"out"),
            (FrameType::Stderr, b"err"),
            (FrameType::Exit, br#"{"signal":9}"#),
        ]);
        let (result, out, err) = exec_against(wire);
        assert_eq!(result.unwrap(), ExitStatus::Signal(9));
        assert_eq!((out.as_slice(), err.as_slice()), (&b"out"[..], &b"err"[..]));
    }

    #[test]
    fn exec_without_exit_is_closed() {
        let wire = frames(&[(FrameType::Stdout, b"out")]);
        assert!(matches!(exec_against(wire).0, Err(Error::Closed)));
    }

    #[test]
    fn exec_rejects_frames_out_of_place() {
        for wire in [
            frames(&[(FrameType::Data, b"x")]),
            frames(&[(FrameType::Ok, b"")]),
            frames(&[(FrameType::Exec, br#"{"argv":["x"]}"#)]),
            frames(&[(FrameType::Exit, b"7")]),
            vec![0xff, 0xff, 0xff, 0x7f, 0x84],
            vec![1, 0, 0, 0, 0x42, 0],
        ] {
            assert!(
                matches!(exec_against(wire.clone()).0, Err(Error::Protocol(_))),
                "{wire:?}"
            );
        }
    }

    #[test]
    fn exec_reports_the_agents_error() {
        let wire = frames(&[(FrameType::Error, b"no such directory")]);
        match exec_against(wire).0 {
            Err(Error::Agent(message)) => assert_eq!(message, "no such directory"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signal_numbers_out_of_range_are_refused() {
        let execution = AgentClient::new(io::empty(), io::sink())
            .start(&ExecRequest::new(["x"]))
            .unwrap();
        let signaller = execution.signaller();
        assert!(signaller.signal(0).is_err());
        assert!(signaller.signal(65).is_err());
        assert!(signaller.signal(9).is_ok());
    }

    #[test]
    fn get_file_rejects_output_frames() {
        let wire = frames(&[(FrameType::Data, b"abc"), (FrameType::Stdout, b"x")]);
        let client = AgentClient::new(Cursor::new(wire), io::sink());
        assert!(matches!(
            client.get_file("/f", Vec::new()),
            Err(Error::Protocol(ProtocolError::Unexpected { .. }))
        ));
    }

    #[test]
    fn put_file_sends_chunks_and_an_end() {
        let reply = frames(&[(FrameType::Ok, b"")]);
        let mut sent = Vec::new();
        let data = vec![7u8; CHUNK_SIZE + 1];
        let client = AgentClient::new(Cursor::new(reply), &mut sent);
        assert_eq!(
            client.put_file("/f", 0o600, data.as_slice()).unwrap(),
            data.len() as u64
        );
        let mut r = Cursor::new(sent);
        let mut kinds = Vec::new();
        while let Some(frame) = read_frame(&mut r).unwrap() {
            kinds.push((frame.kind, frame.payload.len()));
        }
        assert_eq!(
            kinds[1..],
            [
                (FrameType::Data, CHUNK_SIZE),
                (FrameType::Data, 1),
                (FrameType::Data, 0)
            ]
        );
    }
}
