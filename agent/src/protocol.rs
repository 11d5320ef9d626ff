//! The wire protocol between the host and the guest agent.
//!
//! A connection carries frames: a 5-byte header, `[u32 little-endian payload
//! length][u8 type]`, then the payload. A payload is at most [`MAX_PAYLOAD`]
//! bytes; the reader checks the length and the type in the header before it
//! allocates anything, so a peer cannot make the other side allocate more
//! than one bounded payload per frame. Bytes from the peer are untrusted:
//! every malformation is a [`ProtocolError`], never a panic.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on unless told otherwise.
pub const DEFAULT_PORT: u32 = 52;

/// The largest payload a frame may carry (1 MiB). A longer one is a protocol
/// error that ends the connection.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The most bytes either side puts in one STDIN, STDOUT, STDERR or DATA frame
/// (64 KiB). Receivers accept up to [`MAX_PAYLOAD`].
pub const CHUNK_SIZE: usize = 64 << 10;

/// Length of a frame header: the payload length (u32 LE) and the type (u8).
pub const HEADER_LEN: usize = 5;

/// The type byte of a frame. Host-to-agent types are below 0x80, agent-to-host
/// types from 0x80; DATA (0x06) goes both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Host: run a command (JSON [`ExecRequest`]).
    Exec = 0x01,
    /// Host: bytes for the command's stdin; empty means end of stdin.
    Stdin = 0x02,
    /// Host: send a signal (u32 LE) to the command.
    Signal = 0x03,
    /// Host: write a file (JSON [`PutFileRequest`]); its bytes follow as DATA.
    PutFile = 0x04,
    /// Host: read a file (JSON [`GetFileRequest`]); the agent answers with DATA.
    GetFile = 0x05,
    /// Both: file contents; an empty DATA frame ends the file.
    Data = 0x06,
    /// Agent: the command started, with this pid (u32 LE).
    Started = 0x81,
    /// Agent: bytes the command wrote to stdout.
    Stdout = 0x82,
    /// Agent: bytes the command wrote to stderr.
    Stderr = 0x83,
    /// Agent: the command ended (JSON [`ExitStatus`]); the last frame of an EXEC.
    Exit = 0x84,
    /// Agent: the request failed (UTF-8 text); the last frame of its request.
    Error = 0x85,
    /// Agent: a PUT_FILE succeeded.
    Ok = 0x86,
}

impl FrameType {
    /// The type with this byte, if there is one.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::Exec,
            0x02 => Self::Stdin,
            0x03 => Self::Signal,
            0x04 => Self::PutFile,
            0x05 => Self::GetFile,
            0x06 => Self::Data,
            0x81 => Self::Started,
            0x82 => Self::Stdout,
            0x83 => Self::Stderr,
            0x84 => Self::Exit,
            0x85 => Self::Error,
            0x86 => Self::Ok,
            _ => return None,
        })
    }

    /// The name docs/AGENT.md uses for the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Exec => "EXEC",
            Self::Stdin => "STDIN",
            Self::Signal => "SIGNAL",
            Self::PutFile => "PUT_FILE",
            Self::GetFile => "GET_FILE",
            Self::Data => "DATA",
            Self::Started => "STARTED",
            Self::Stdout => "STDOUT",
            Self::Stderr => "STDERR",
            Self::Exit => "EXIT",
            Self::Error => "ERROR",
            Self::Ok => "OK",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with the bytes the peer sent. Each ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading from the connection failed.
    #[error("reading from the connection failed")]
    Io(#[from] io::Error),
    /// The connection ended inside a frame.
    #[error("the connection ended in the middle of a frame")]
    Truncated,
    /// The header announced a payload longer than [`MAX_PAYLOAD`].
    #[error("a frame announces {0} payload bytes, more than the {MAX_PAYLOAD} allowed")]
    TooLong(u32),
    /// The header's type byte is not a [`FrameType`].
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A JSON payload did not parse as the type's message.
    #[error("the {kind} frame's JSON payload is malformed")]
    BadJson {
        /// The frame's type.
        kind: FrameType,
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
    /// A fixed-size payload has the wrong size.
    #[error("the {kind} frame's payload is {len} bytes, not 4")]
    BadLength {
        /// The frame's type.
        kind: FrameType,
        /// The payload's length.
        len: usize,
    },
    /// An ERROR payload is not UTF-8.
    #[error("the {0} frame's text is not UTF-8")]
    BadUtf8(FrameType),
    /// An EXEC request names no program.
    #[error("the EXEC request's argv is empty")]
    EmptyArgv,
    /// A SIGNAL frame carries a number that is no signal.
    #[error("signal {0} is not a signal number (1 to 64)")]
    BadSignal(u32),
    /// A well-formed frame arrived where the protocol does not allow it.
    #[error("a {kind} frame is not allowed {state}")]
    Unexpected {
        /// The frame's type.
        kind: FrameType,
        /// Where the connection was, as a phrase ("while a command runs").
        state: &'static str,
    },
}

/// One frame: its type and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The type byte.
    pub kind: FrameType,
    /// The payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

/// Appends the frame `kind` + `payload` to `out`.
///
/// Fails (InvalidInput) when `payload` is longer than [`MAX_PAYLOAD`].
pub fn encode_frame(kind: FrameType, payload: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let len = checked_len(payload)?;
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    Ok(())
}

/// Writes one frame to `w` (header and payload; no flush).
///
/// Fails (InvalidInput) when `payload` is longer than [`MAX_PAYLOAD`].
pub fn write_frame(w: &mut impl Write, kind: FrameType, payload: &[u8]) -> io::Result<()> {
    let len = checked_len(payload)?;
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4] = kind as u8;
    w.write_all(&header)?;
    w.write_all(payload)
}

fn checked_len(payload: &[u8]) -> io::Result<u32> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a payload of {} bytes is longer than the {MAX_PAYLOAD} a frame may carry",
                payload.len()
            ),
        ));
    }
    // MAX_PAYLOAD fits in u32, so this cannot truncate.
    Ok(payload.len() as u32)
}

/// Reads one frame from a blocking reader. `Ok(None)` is a clean end of the
/// connection (between frames); an end inside a frame is
/// [`ProtocolError::Truncated`].
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    let mut decoder = FrameDecoder::new();
    loop {
        match decoder.read_from(r)? {
            Decoded::Frame(frame) => return Ok(Some(frame)),
            Decoded::End => return Ok(None),
            Decoded::Partial => {}
            // A read timeout on a blocking reader.
            Decoded::Blocked => return Err(io::Error::from(io::ErrorKind::WouldBlock).into()),
        }
    }
}

/// What one [`FrameDecoder::read_from`] call achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame arrived.
    Frame(Frame),
    /// Part of a frame arrived.
    Partial,
    /// The reader would block (or timed out): nothing arrived.
    Blocked,
    /// The peer closed the connection between two frames.
    End,
}

/// Assembles frames from a reader that may return short reads or
/// `WouldBlock` (a non-blocking socket). It never reads past the end of the
/// current frame, so the caller can stop reading at a frame boundary, and it
/// holds at most one header and one payload of at most [`MAX_PAYLOAD`] bytes.
#[derive(Debug)]
pub struct FrameDecoder {
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// The current frame's type, valid once its header is complete.
    kind: FrameType,
    /// The current frame's payload length, set once its header is complete
    /// and valid.
    current_len: Option<usize>,
    /// The current frame's payload, allocated at its full length.
    payload: Vec<u8>,
    /// How much of `payload` has arrived.
    filled: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder at a frame boundary.
    pub fn new() -> Self {
        Self {
            header: [0; HEADER_LEN],
            header_len: 0,
            kind: FrameType::Data,
            current_len: None,
            payload: Vec::new(),
            filled: 0,
        }
    }

    /// Whether the decoder is between frames (nothing of a frame read yet).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.current_len.is_none()
    }

    /// Reads what the current frame still lacks (one `read` call) from `r`.
    /// Without a header yet, it reads no more than the header; then no more
    /// than the payload.
    pub fn read_from(&mut self, r: &mut impl Read) -> Result<Decoded, ProtocolError> {
        let Some(len) = self.current_len else {
            let n = match retry(|| r.read(&mut self.header[self.header_len..]))? {
                None => return Ok(Decoded::Blocked),
                Some(0) if self.header_len == 0 => return Ok(Decoded::End),
                Some(0) => return Err(ProtocolError::Truncated),
                Some(n) => n,
            };
            self.header_len += n;
            if self.header_len < HEADER_LEN {
                return Ok(Decoded::Partial);
            }
            let (kind, len) = parse_header(&self.header)?;
            self.kind = kind;
            self.current_len = Some(len);
            // Bounded by MAX_PAYLOAD, checked in parse_header.
            self.payload = vec![0; len];
            self.filled = 0;
            return Ok(self.finish_if_complete(len));
        };
        let n = match retry(|| r.read(&mut self.payload[self.filled..]))? {
            None => return Ok(Decoded::Blocked),
            Some(0) => return Err(ProtocolError::Truncated),
            Some(n) => n,
        };
        self.filled += n;
        Ok(self.finish_if_complete(len))
    }

    fn finish_if_complete(&mut self, len: usize) -> Decoded {
        if self.filled < len {
            return Decoded::Partial;
        }
        self.current_len = None;
        self.header_len = 0;
        self.filled = 0;
        Decoded::Frame(Frame {
            kind: self.kind,
            payload: std::mem::take(&mut self.payload),
        })
    }
}

/// One `read`, retried on EINTR; `None` for `WouldBlock`.
fn retry(mut f: impl FnMut() -> io::Result<usize>) -> io::Result<Option<usize>> {
    loop {
        match f() {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(FrameType, usize), ProtocolError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if len as usize > MAX_PAYLOAD {
        return Err(ProtocolError::TooLong(len));
    }
    let kind = FrameType::from_u8(header[4]).ok_or(ProtocolError::UnknownType(header[4]))?;
    Ok((kind, len as usize))
}

/// A command to run in the guest: the payload of EXEC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program and its arguments; the program is looked up in `PATH`
    /// unless it contains a `/`. Never empty.
    pub argv: Vec<String>,
    /// Environment variables set for the command on top of the agent's own.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The command's working directory; the agent's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Whether the host sends stdin (STDIN frames ending with an empty one);
    /// without it the command's stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
}

impl ExecRequest {
    /// A request to run `argv` with the agent's environment and no stdin.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Adds the variable `key`=`value` to the command's environment.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the command's working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets whether the host streams stdin to the command.
    pub fn with_stdin(mut self, stdin: bool) -> Self {
        self.stdin = stdin;
        self
    }
}

/// The file mode PUT_FILE uses when the request gives none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

fn default_mode() -> u32 {
    DEFAULT_FILE_MODE
}

/// A file to write in the guest: the payload of PUT_FILE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFileRequest {
    /// Where to write (created or truncated).
    pub path: String,
    /// Its permission bits (`mode & 0o7777`), applied regardless of umask.
    #[serde(default = "default_mode")]
    pub mode: u32,
}

/// A file to read from the guest: the payload of GET_FILE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFileRequest {
    /// The file to read.
    pub path: String,
}

/// How a command ended: the payload of EXIT, `{"code":N}` or `{"signal":N}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(code) => code,
            Self::Signal(signal) => 128 + signal,
        }
    }

    /// Whether the command exited with code 0.
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit code {code}"),
            Self::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// A frame the host sends, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// EXEC.
    Exec(ExecRequest),
    /// STDIN; empty is the end of stdin.
    Stdin(Vec<u8>),
    /// SIGNAL, a number from 1 to 64.
    Signal(u32),
    /// PUT_FILE.
    PutFile(PutFileRequest),
    /// GET_FILE.
    GetFile(GetFileRequest),
    /// DATA (a file's bytes); empty is the end of the file.
    Data(Vec<u8>),
}

impl Request {
    /// The frame type that carries this request.
    pub fn kind(&self) -> FrameType {
        match self {
            Self::Exec(_) => FrameType::Exec,
            Self::Stdin(_) => FrameType::Stdin,
            Self::Signal(_) => FrameType::Signal,
            Self::PutFile(_) => FrameType::PutFile,
            Self::GetFile(_) => FrameType::GetFile,
            Self::Data(_) => FrameType::Data,
        }
    }

    /// The frame's payload.
    pub fn payload(&self) -> Cow<'_, [u8]> {
        match self {
            Self::Exec(req) => Cow::Owned(to_json(req)),
            Self::Stdin(bytes) | Self::Data(bytes) => Cow::Borrowed(bytes),
            Self::Signal(signal) => Cow::Owned(signal.to_le_bytes().to_vec()),
            Self::PutFile(req) => Cow::Owned(to_json(req)),
            Self::GetFile(req) => Cow::Owned(to_json(req)),
        }
    }

    /// Writes the request as one frame.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        write_frame(w, self.kind(), &self.payload())
    }

    /// Decodes a frame the host sent; agent-to-host types are errors.
    pub fn decode(frame: Frame) -> Result<Self, ProtocolError> {
        let Frame { kind, payload } = frame;
        Ok(match kind {
            FrameType::Exec => {
                let req: ExecRequest = from_json(kind, &payload)?;
                if req.argv.is_empty() {
                    return Err(ProtocolError::EmptyArgv);
                }
                Self::Exec(req)
            }
            FrameType::Stdin => Self::Stdin(payload),
            FrameType::Signal => {
                let signal = u32_payload(kind, &payload)?;
                if !(1..=64).contains(&signal) {
                    return Err(ProtocolError::BadSignal(signal));
                }
                Self::Signal(signal)
            }
            FrameType::PutFile => Self::PutFile(from_json(kind, &payload)?),
            FrameType::GetFile => Self::GetFile(from_json(kind, &payload)?),
            FrameType::Data => Self::Data(payload),
            FrameType::Started
            | FrameType::Stdout
            | FrameType::Stderr
            | FrameType::Exit
            | FrameType::Error
            | FrameType::Ok => {
                return Err(ProtocolError::Unexpected {
                    kind,
                    state: "from the host",
                })
            }
        })
    }
}

/// A frame the agent sends, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// STARTED, with the command's pid.
    Started(u32),
    /// STDOUT.
    Stdout(Vec<u8>),
    /// STDERR.
    Stderr(Vec<u8>),
    /// EXIT.
    Exit(ExitStatus),
    /// ERROR, with a sentence saying what failed.
    Error(String),
    /// DATA (a file's bytes); empty is the end of the file.
    Data(Vec<u8>),
    /// OK.
    Ok,
}

impl Reply {
    /// The frame type that carries this reply.
    pub fn kind(&self) -> FrameType {
        match self {
            Self::Started(_) => FrameType::Started,
            Self::Stdout(_) => FrameType::Stdout,
            Self::Stderr(_) => FrameType::Stderr,
            Self::Exit(_) => FrameType::Exit,
            Self::Error(_) => FrameType::Error,
            Self::Data(_) => FrameType::Data,
            Self::Ok => FrameType::Ok,
        }
    }

    /// The frame's payload. An ERROR text longer than [`MAX_PAYLOAD`] is cut
    /// (at a character boundary) so that it always fits.
    pub fn payload(&self) -> Cow<'_, [u8]> {
        match self {
            Self::Started(pid) => Cow::Owned(pid.to_le_bytes().to_vec()),
            Self::Stdout(bytes) | Self::Stderr(bytes) | Self::Data(bytes) => Cow::Borrowed(bytes),
            Self::Exit(status) => Cow::Owned(to_json(status)),
            Self::Error(text) => {
                let mut end = text.len().min(MAX_PAYLOAD);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                Cow::Borrowed(&text.as_bytes()[..end])
            }
            Self::Ok => Cow::Borrowed(&[]),
        }
    }

    /// Writes the reply as one frame.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        write_frame(w, self.kind(), &self.payload())
    }

    /// Appends the reply as one frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> io::Result<()> {
        encode_frame(self.kind(), &self.payload(), out)
    }

    /// Decodes a frame the agent sent; host-to-agent types (but DATA) are
    /// errors.
    pub fn decode(frame: Frame) -> Result<Self, ProtocolError> {
        let Frame { kind, payload } = frame;
        Ok(match kind {
            FrameType::Started => Self::Started(u32_payload(kind, &payload)?),
            FrameType::Stdout => Self::Stdout(payload),
            FrameType::Stderr => Self::Stderr(payload),
            FrameType::Exit => Self::Exit(from_json(kind, &payload)?),
            FrameType::Error => {
                Self::Error(String::from_utf8(payload).map_err(|_| ProtocolError::BadUtf8(kind))?)
            }
            FrameType::Data => Self::Data(payload),
            FrameType::Ok => Self::Ok,
            FrameType::Exec
            | FrameType::Stdin
            | FrameType::Signal
            | FrameType::PutFile
            | FrameType::GetFile => {
                return Err(ProtocolError::Unexpected {
                    kind,
                    state: "from the agent",
                })
            }
        })
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // The messages are structs of strings and integers and enums of integers:
    // serde_json cannot fail on them.
    serde_json::to_vec(value).expect("serializing a protocol message to JSON cannot fail")
}

fn from_json<'a, T: Deserialize<'a>>(
    kind: FrameType,
    payload: &'a [u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|source| ProtocolError::BadJson { kind, source })
}

fn u32_payload(kind: FrameType, payload: &[u8]) -> Result<u32, ProtocolError> {
    let bytes: [u8; 4] = payload.try_into().map_err(|_| ProtocolError::BadLength {
        kind,
        len: payload.len(),
    })?;
    Ok(u32::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn frame_bytes(kind: FrameType, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(kind, payload, &mut out).unwrap();
        out
    }

    /// A reader that returns one byte per call and `WouldBlock` every other call.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        block_next: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.block_next = !self.block_next;
            if !self.block_next {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if self.pos == self.data.len() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.data[self.pos];
            self.pos += 1;
            Ok(1)
        }
    }

    #[test]
    fn frame_round_trips() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameType::Stdout, b"hello").unwrap();
        write_frame(&mut wire, FrameType::Data, b"").unwrap();
        assert_eq!(&wire[..5], &[5, 0, 0, 0, 0x82]);
        let mut r = Cursor::new(wire);
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some(Frame {
                kind: FrameType::Stdout,
                payload: b"hello".to_vec()
            })
        );
        assert_eq!(read_frame(&mut r).unwrap().unwrap().payload, b"");
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn frame_of_max_payload_round_trips() {
        let payload = vec![0xa5; MAX_PAYLOAD];
        let wire = frame_bytes(FrameType::Stdin, &payload);
        let frame = read_frame(&mut Cursor::new(wire)).unwrap().unwrap();
        assert_eq!(frame.payload, payload);
    }

    #[test]
    fn oversize_payload_is_refused_on_write() {
        let payload = vec![0; MAX_PAYLOAD + 1];
        let err = write_frame(&mut Vec::new(), FrameType::Data, &payload).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(encode_frame(FrameType::Data, &payload, &mut Vec::new()).is_err());
    }

    #[test]
    fn oversize_length_is_an_error_before_the_payload() {
        // Only the header is there: the reader must fail without waiting for
        // (or allocating) 4 GiB.
        let wire = [0xff, 0xff, 0xff, 0xff, FrameType::Data as u8];
        let err = read_frame(&mut Cursor::new(wire)).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLong(u32::MAX)), "{err:?}");
        let just_over = ((MAX_PAYLOAD + 1) as u32).to_le_bytes();
        let wire = [just_over[0], just_over[1], just_over[2], just_over[3], 0x02];
        assert!(matches!(
            read_frame(&mut Cursor::new(wire)),
            Err(ProtocolError::TooLong(_))
        ));
    }

    #[test]
    fn unknown_type_is_an_error() {
        let wire = [0, 0, 0, 0, 0x7f];
        assert!(matches!(
            read_frame(&mut Cursor::new(wire)),
            Err(ProtocolError::UnknownType(0x7f))
        ));
    }

    #[test]
    fn truncated_header_and_payload_are_errors() {
        let wire = frame_bytes(FrameType::Stdout, b"hello");
        for cut in 1..wire.len() {
            let err = read_frame(&mut Cursor::new(&wire[..cut])).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Truncated),
                "cut {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn decoder_assembles_frames_from_short_and_blocked_reads() {
        let mut data = frame_bytes(FrameType::Stdin, b"abc");
        data.extend(frame_bytes(FrameType::Signal, &9u32.to_le_bytes()));
        let mut r = Trickle {
            data,
            pos: 0,
            block_next: false,
        };
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        for _ in 0..100 {
            match decoder.read_from(&mut r).unwrap() {
                Decoded::Frame(f) => frames.push(f),
                Decoded::Partial | Decoded::Blocked => {}
                Decoded::End => break,
            }
        }
        assert!(decoder.at_boundary());
        assert_eq!(
            frames,
            vec![
                Frame {
                    kind: FrameType::Stdin,
                    payload: b"abc".to_vec()
                },
                Frame {
                    kind: FrameType::Signal,
                    payload: 9u32.to_le_bytes().to_vec()
                }
            ]
        );
    }

    #[test]
    fn decoder_never_reads_past_the_frame() {
        let mut data = frame_bytes(FrameType::Stdin, b"abc");
        data.extend(b"rest");
        let mut r = Cursor::new(data);
        let mut decoder = FrameDecoder::new();
        while !matches!(decoder.read_from(&mut r).unwrap(), Decoded::Frame(_)) {}
        assert_eq!(r.position(), 8);
    }

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Exec(
                ExecRequest::new(["sh", "-c", "echo hi"])
                    .env("A", "b")
                    .cwd("/tmp")
                    .with_stdin(true),
            ),
            Request::Stdin(b"in".to_vec()),
            Request::Signal(15),
            Request::PutFile(PutFileRequest {
                path: "/f".into(),
                mode: 0o755,
            }),
            Request::GetFile(GetFileRequest { path: "/f".into() }),
            Request::Data(vec![]),
        ];
        for request in requests {
            let mut wire = Vec::new();
            request.write_to(&mut wire).unwrap();
            let frame = read_frame(&mut Cursor::new(wire)).unwrap().unwrap();
            assert_eq!(Request::decode(frame).unwrap(), request);
        }
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Started(42),
            Reply::Stdout(b"o".to_vec()),
            Reply::Stderr(b"e".to_vec()),
            Reply::Exit(ExitStatus::Code(7)),
            Reply::Exit(ExitStatus::Signal(9)),
            Reply::Error("it failed".into()),
            Reply::Data(b"d".to_vec()),
            Reply::Ok,
        ];
        for reply in replies {
            let mut wire = Vec::new();
            reply.encode_into(&mut wire).unwrap();
            let frame = read_frame(&mut Cursor::new(wire)).unwrap().unwrap();
            assert_eq!(Reply::decode(frame).unwrap(), reply);
        }
    }

    #[test]
    fn json_forms_are_the_documented_ones() {
        assert_eq!(to_json(&ExitStatus::Code(7)), br#"{"code":7}"#);
        assert_eq!(to_json(&ExitStatus::Signal(9)), br#"{"signal":9}"#);
        let req: ExecRequest =
            serde_json::from_slice(br#"{"argv":["ls","-l"],"env":[["K","V"]]}"#).unwrap();
        assert_eq!(req, ExecRequest::new(["ls", "-l"]).env("K", "V"));
        let put: PutFileRequest = serde_json::from_slice(br#"{"path":"/x"}"#).unwrap();
        assert_eq!(put.mode, DEFAULT_FILE_MODE);
    }

    #[test]
    fn malformed_requests_are_errors() {
        let frame = |kind, payload: &[u8]| Frame {
            kind,
            payload: payload.to_vec(),
        };
        let cases = [
            frame(FrameType::Exec, b"{"),
            frame(FrameType::Exec, br#"{"argv":[]}"#),
            frame(FrameType::Exec, br#"{"argv":"sh"}"#),
            frame(FrameType::Exec, br#"{"argv":["sh"],"env":[["only-key"]]}"#),
            frame(FrameType::Signal, &[9]),
            frame(FrameType::Signal, &0u32.to_le_bytes()),
            frame(FrameType::Signal, &65u32.to_le_bytes()),
            frame(FrameType::PutFile, b"null"),
            frame(FrameType::GetFile, &[0xff, 0xfe]),
            frame(FrameType::Exit, br#"{"code":0}"#),
            frame(FrameType::Ok, b""),
        ];
        for case in cases {
            assert!(Request::decode(case.clone()).is_err(), "{case:?}");
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        let frame = |kind, payload: &[u8]| Frame {
            kind,
            payload: payload.to_vec(),
        };
        let cases = [
            frame(FrameType::Started, b"12"),
            frame(FrameType::Exit, br#"{"code":"7"}"#),
            frame(FrameType::Exit, br#"{"status":7}"#),
            frame(FrameType::Error, &[0xc3]),
            frame(FrameType::Exec, br#"{"argv":["sh"]}"#),
        ];
        for case in cases {
            assert!(Reply::decode(case.clone()).is_err(), "{case:?}");
        }
    }

    #[test]
    fn long_error_text_is_cut_to_fit_a_frame() {
        let reply = Reply::Error("é".repeat(MAX_PAYLOAD));
        let mut wire = Vec::new();
        reply.encode_into(&mut wire).unwrap();
        assert_eq!(wire.len(), HEADER_LEN + MAX_PAYLOAD);
    }

    #[test]
    fn shell_code_of_a_signal_is_128_plus_it() {
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
    }
}
