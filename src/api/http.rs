//! The HTTP/1.1 server of the control API: one thread, one epoll set, non-blocking
//! Unix domain sockets.
//!
//! It frames requests (RFC 9112: request line, header fields, a body framed by
//! `Content-Length` only), hands each complete request to a handler, and writes the
//! handler's [`Response`] back in order. It never waits on a client: input and
//! output are buffered per connection, and a connection that misbehaves (malformed
//! request, oversized payload, unread output past a cap) is answered if possible and
//! closed, while every other connection is served.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Most header fields accepted in one request.
const MAX_HEADERS: usize = 32;
/// Unsent output a connection may hold when another response is due; past it the
/// client is not reading, and the connection is closed.
const OUTPUT_CAP: usize = 64 * 1024;
/// Bytes read from a connection per `read` call.
const READ_CHUNK: usize = 16 * 1024;
/// `read` calls per readiness event, so that one busy client cannot starve the rest.
const READS_PER_EVENT: usize = 4;
/// Connections accepted per readiness event of the listener.
const ACCEPTS_PER_EVENT: usize = 64;
/// How long accepting pauses after `accept` failed for lack of resources.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Epoll tokens: the listener, the shutdown event, then one per connection.
const LISTENER: u64 = 0;
const SHUTDOWN: u64 = 1;
const FIRST_CONNECTION: u64 = 2;
/// The fault message for a request that uses `Transfer-Encoding`.
const NO_CHUNKED: &str = "chunked transfer encoding is not supported; send Content-Length";

/// Errors of the API server itself (a client's errors are answered, not returned).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path is taken; the server never removes what it did not create.
    #[error("Failed to open the API socket at: {}. Check that it is not already used. Remove it or choose another path.", .0.display())]
    PathExists(PathBuf),
    /// Creating or configuring the listening socket failed.
    #[error("Could not create the API socket {}: {source}.", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Creating or using the epoll set failed.
    #[error("The API server's event loop failed: {0}.")]
    Epoll(io::Error),
}

/// A request method. Methods are case-sensitive: `get` is `Other("get")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// `DELETE`.
    Delete,
    /// Any other method token, e.g. `POST`.
    Other(String),
}

/// A complete, well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The request target as sent (not percent-decoded), valid UTF-8.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// A response to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code. Codes outside 200..=599 are replaced by a 500 fault.
    pub status: u16,
    /// A JSON body. Never sent with status 204.
    pub body: Option<Vec<u8>>,
    /// Sends `Deprecation: true`: the request used a deprecated field or
    /// endpoint (as Firecracker marks them).
    pub deprecation: bool,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            deprecation: false,
        }
    }

    /// A response with a JSON body.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            body: Some(body),
            deprecation: false,
        }
    }

    /// A response whose body is `{"fault_message": message}`.
    pub fn fault(status: u16, message: &str) -> Self {
        let body = format!("{{\"fault_message\": {}}}", json_string(message));
        Response::json(status, body.into_bytes())
    }
}

/// Limits of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Largest accepted `Content-Length`.
    pub max_payload: usize,
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Largest request line plus header section, in bytes.
    pub max_header_bytes: usize,
    /// Longest request target, in bytes.
    pub max_path_len: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_payload: 51200,
            max_connections: 256,
            max_header_bytes: 8192,
            max_path_len: 1024,
        }
    }
}

/// An HTTP/1.1 server listening on a Unix domain socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, to remove only our own on drop.
    id: (u64, u64),
    opts: ServerOptions,
}

impl Server {
    /// Binds and listens on `path`. Refuses (error naming the path) if the path
    /// already exists — never unlinks it.
    pub fn bind(path: &Path, opts: ServerOptions) -> Result<Server, Error> {
        if path.symlink_metadata().is_ok() {
            return Err(Error::PathExists(path.to_path_buf()));
        }
        let bind_error = |source| Error::Bind {
            path: path.to_path_buf(),
            source,
        };
        // Bound and listening under a temporary name first, then linked into
        // place: the path appears only once connections are accepted (clients
        // poll for it and connect at once), and linking never replaces a path
        // that appeared meanwhile.
        if path.as_os_str().len() >= 108 {
            return Err(bind_error(io::Error::other(
                "a Unix socket path holds at most 107 bytes; give a shorter path",
            )));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = dir.join(format!(".vmm-{}.sock", std::process::id()));
        // sun_path holds 107 bytes: a temporary name that does not fit (the
        // path itself may) falls back to binding in place.
        let listener = if tmp.as_os_str().len() < 108 {
            let _ = std::fs::remove_file(&tmp);
            let listener = UnixListener::bind(&tmp).map_err(bind_error)?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => listener,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    return Err(Error::PathExists(path.to_path_buf()))
                }
                Err(e) => return Err(bind_error(e)),
            }
        } else {
            match UnixListener::bind(path) {
                Ok(l) => l,
                Err(e) if e.kind() == ErrorKind::AddrInUse => {
                    return Err(Error::PathExists(path.to_path_buf()))
                }
                Err(e) => return Err(bind_error(e)),
            }
        };
        let meta = path.symlink_metadata().map_err(bind_error)?;
        let server = Server {
            listener,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
            opts,
        };
        server.listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(server)
    }

    /// Serves until `shutdown` (an EventFd) becomes readable; then closes every
    /// connection and returns. The event's counter is left as it is.
    ///
    /// Calls `handler` once per complete, well-formed request, on this thread, in
    /// order of arrival per connection.
    pub fn run(
        &mut self,
        handler: &mut dyn FnMut(Request) -> Response,
        shutdown: &EventFd,
    ) -> Result<(), Error> {
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let listener_fd = self.listener.as_raw_fd();
        let add = |fd, token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(listener_fd, LISTENER).map_err(Error::Epoll)?;
        add(shutdown.as_raw_fd(), SHUTDOWN).map_err(Error::Epoll)?;

        let mut conns: HashMap<u64, Connection> = HashMap::new();
        let mut next_id = FIRST_CONNECTION;
        let mut paused_until: Option<Instant> = None;
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let timeout = paused_until.map_or(-1, |t| {
                let ms = t.saturating_duration_since(Instant::now()).as_millis();
                i32::try_from(ms).unwrap_or(i32::MAX)
            });
            let count = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Epoll(e)),
            };
            if paused_until.is_some_and(|t| Instant::now() >= t) {
                add(listener_fd, LISTENER).map_err(Error::Epoll)?;
                paused_until = None;
            }
            for event in &events[..count] {
                match event.data() {
                    SHUTDOWN => return Ok(()),
                    LISTENER => {
                        if !self.accept(&epoll, &mut conns, &mut next_id) {
                            let none = EpollEvent::default();
                            epoll
                                .ctl(ControlOperation::Delete, listener_fd, none)
                                .map_err(Error::Epoll)?;
                            paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                        }
                    }
                    id => {
                        let Some(conn) = conns.get_mut(&id) else {
                            continue;
                        };
                        let open = conn.on_event(event.event_set(), handler, &self.opts);
                        let wanted = conn.interest();
                        if open && !wanted.is_empty() {
                            if wanted != conn.registered {
                                let ev = EpollEvent::new(wanted, id);
                                let fd = conn.stream.as_raw_fd();
                                epoll
                                    .ctl(ControlOperation::Modify, fd, ev)
                                    .map_err(Error::Epoll)?;
                                conn.registered = wanted;
                            }
                        } else if let Some(conn) = conns.remove(&id) {
                            let fd = conn.stream.as_raw_fd();
                            // Closing the socket removes it too; failure here is harmless.
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        }
                    }
                }
            }
        }
    }

    /// Accepts pending connections. Returns false if accepting must pause (out of
    /// descriptors or memory), as the listener would otherwise stay ready forever.
    fn accept(
        &self,
        epoll: &Epoll,
        conns: &mut HashMap<u64, Connection>,
        next_id: &mut u64,
    ) -> bool {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    warn!("API server: cannot accept a connection ({e}); pausing for {ACCEPT_PAUSE:?}.");
                    return false;
                }
            };
            if conns.len() >= self.opts.max_connections {
                let mut refusal = Vec::new();
                let message = format!(
                    "Too many connections: the limit is {}.",
                    self.opts.max_connections
                );
                serialize(&Response::fault(503, &message), false, &mut refusal);
                // Best effort: the stream is closed right after, whatever was sent.
                let _ = send(stream.as_raw_fd(), &refusal);
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("API server: cannot make a connection non-blocking ({e}); closing it.");
                continue;
            }
            let id = *next_id;
            *next_id += 1;
            let event = EpollEvent::new(EventSet::IN, id);
            if let Err(e) = epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), event) {
                warn!("API server: cannot watch a connection ({e}); closing it.");
                continue;
            }
            conns.insert(id, Connection::new(stream));
        }
        true
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Ok(meta) = self.path.symlink_metadata() else {
            return;
        };
        if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == self.id {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!("API server: cannot remove {}: {e}.", self.path.display());
            }
        }
    }
}

/// `send(2)` without blocking and without SIGPIPE for a peer that is gone.
fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, initialized slice of `buf.len()` bytes, only read by send.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The parts of a request head the server acts on.
struct Head {
    method: Method,
    path: String,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
}

/// One client connection and its buffers.
struct Connection {
    stream: UnixStream,
    /// Received bytes not yet consumed by a request.
    input: Vec<u8>,
    /// Response bytes not yet sent.
    output: Vec<u8>,
    /// A request head whose body has not fully arrived.
    waiting: Option<Head>,
    /// No more requests are read; the connection closes once `output` is sent.
    closing: bool,
    /// The events the connection is registered for.
    registered: EventSet,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            waiting: None,
            closing: false,
            registered: EventSet::IN,
        }
    }

    /// The events to wait for; none means the connection is done.
    fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.closing {
            set |= EventSet::IN;
        }
        if !self.output.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Handles readiness; returns false if the connection must be closed now.
    fn on_event(
        &mut self,
        events: EventSet,
        handler: &mut dyn FnMut(Request) -> Response,
        opts: &ServerOptions,
    ) -> bool {
        if events.contains(EventSet::ERROR) {
            return false;
        }
        if !self.closing && events.intersects(EventSet::IN | EventSet::HANG_UP) {
            if !self.read_and_serve(handler, opts) {
                return false;
            }
        } else if events.contains(EventSet::HANG_UP) {
            return false; // The peer cannot read what is left.
        }
        if self.flush().is_err() {
            return false;
        }
        !(self.closing && self.output.is_empty())
    }

    /// Reads what has arrived and answers every complete request in it. Returns
    /// false on a read error.
    fn read_and_serve(
        &mut self,
        handler: &mut dyn FnMut(Request) -> Response,
        opts: &ServerOptions,
    ) -> bool {
        let mut chunk = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_EVENT {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    // End of input: complete requests were answered; a partial one is dropped.
                    self.closing = true;
                    return true;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    self.serve(handler, opts);
                    if self.closing {
                        return true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Answers the complete requests at the front of `input`.
    fn serve(&mut self, handler: &mut dyn FnMut(Request) -> Response, opts: &ServerOptions) {
        while !self.closing {
            let head = match self.waiting.take() {
                Some(head) => head,
                None => match parse_head(&self.input, opts) {
                    Ok(None) => return,
                    Ok(Some((head, len))) => {
                        self.input.drain(..len);
                        if head.expect_continue && self.input.len() < head.content_length {
                            self.output
                                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        }
                        head
                    }
                    Err(message) => {
                        debug!("API server: rejecting a request: {message}");
                        match too_large_answer(&message) {
                            // Firecracker's exact bytes, which its clients
                            // and suite compare (then the connection closes).
                            Some(raw) => {
                                self.output.extend_from_slice(raw.as_bytes());
                                self.closing = true;
                                self.input.clear();
                                if self.flush().is_err() {
                                    self.output.clear();
                                }
                            }
                            None => self.respond(&Response::fault(400, &message), false),
                        }
                        return;
                    }
                },
            };
            if self.input.len() < head.content_length {
                self.waiting = Some(head);
                return;
            }
            let body = self.input.drain(..head.content_length).collect();
            let response = handler(Request {
                method: head.method,
                path: head.path,
                body,
            });
            self.respond(&response, head.keep_alive);
        }
    }

    /// Queues a response and tries to send it; closes a connection whose client
    /// has left more than `OUTPUT_CAP` bytes unread.
    fn respond(&mut self, response: &Response, keep_alive: bool) {
        if self.output.len() > OUTPUT_CAP {
            debug!("API server: closing a connection whose client does not read its responses.");
            self.output.clear();
            self.closing = true;
            return;
        }
        serialize(response, keep_alive, &mut self.output);
        if !keep_alive {
            self.closing = true;
            self.input.clear();
        }
        if self.flush().is_err() {
            self.output.clear();
            self.closing = true;
        }
    }

    /// Sends as much pending output as the socket takes.
    fn flush(&mut self) -> io::Result<()> {
        let mut sent = 0;
        let result = loop {
            if sent == self.output.len() {
                break Ok(());
            }
            match send(self.stream.as_raw_fd(), &self.output[sent..]) {
                Ok(0) => break Err(ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.output.drain(..sent);
        result
    }
}

/// How the refusal of an oversized body starts (Firecracker's wording).
const TOO_LARGE_PREFIX: &str = "Request payload with size ";

/// The response Firecracker's HTTP server sends for a body over the limit,
/// byte for byte (no reason phrase, its `error` field, the message's line
/// break unescaped): clients and Firecracker's suite compare it whole.
fn too_large_answer(message: &str) -> Option<String> {
    if !message.starts_with(TOO_LARGE_PREFIX) {
        return None;
    }
    let body = format!("{{ \"error\": \"{message}\" }}");
    Some(format!(
        "HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// Parses the request head at the front of `input`: `Ok(None)` until it is
/// complete, then the head and its length; `Err` holds a fault message for a 400.
fn parse_head(input: &[u8], opts: &ServerOptions) -> Result<Option<(Head, usize)>, String> {
    let too_large = || {
        format!(
            "The request header section is larger than the limit of {} bytes.",
            opts.max_header_bytes
        )
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(input) {
        Ok(httparse::Status::Partial) if input.len() > opts.max_header_bytes => {
            return Err(too_large())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!(
                "The request has more than {MAX_HEADERS} header fields."
            ))
        }
        Err(httparse::Error::Token) if target_is_not_utf8(input) => {
            return Err("The request target is not valid UTF-8.".to_string())
        }
        Err(e) => {
            return Err(format!(
                "The request line or a header field is malformed: {e}."
            ))
        }
    };
    if len > opts.max_header_bytes {
        return Err(too_large());
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err("The request line is incomplete.".to_string());
    };
    if path.len() > opts.max_path_len {
        return Err(format!(
            "The request target is {} bytes long, more than the limit of {} bytes.",
            path.len(),
            opts.max_path_len
        ));
    }
    let (mut content_length, mut close, mut keep_alive, mut expect_continue) =
        (None, false, false, false);
    for header in req.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(NO_CHUNKED.to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            for item in header.value.split(|&b| b == b',') {
                let n = parse_decimal(trim(item))
                    .ok_or_else(|| "The Content-Length header has an invalid value.".to_string())?;
                if content_length.is_some_and(|m| m != n) {
                    return Err(
                        "The request has Content-Length headers with different values.".to_string(),
                    );
                }
                content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',').map(trim) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            // RFC 9110: no 100 (Continue) to an HTTP/1.0 client.
            expect_continue =
                version == 1 && trim(header.value).eq_ignore_ascii_case(b"100-continue");
        }
    }
    let content_length = content_length.unwrap_or(0);
    let content_length = match usize::try_from(content_length) {
        Ok(n) if n <= opts.max_payload => n,
        _ => {
            return Err(format!(
                "{TOO_LARGE_PREFIX}{content_length} is larger than the limit of {} allowed by server.\n\
                 All previous unanswered requests will be dropped.",
                opts.max_payload
            ))
        }
    };
    let method = match method {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "PATCH" => Method::Patch,
        "DELETE" => Method::Delete,
        other => Method::Other(other.to_string()),
    };
    let keep_alive = !close && (version == 1 || keep_alive);
    let head = Head {
        method,
        path: path.to_string(),
        content_length,
        keep_alive,
        expect_continue,
    };
    Ok(Some((head, len)))
}

/// Whether the second word of the request line (the target) is not UTF-8.
fn target_is_not_utf8(input: &[u8]) -> bool {
    let mut lines = input.split(|&b| b == b'\n');
    let line = lines
        .find(|l| !l.is_empty() && *l != b"\r")
        .unwrap_or_default();
    line.split(|&b| b == b' ')
        .nth(1)
        .is_some_and(|t| std::str::from_utf8(t).is_err())
}

/// A non-negative decimal number of at most 19 digits (so it fits a u64).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// `bytes` without leading and trailing spaces and tabs.
fn trim(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// `s` as a JSON string literal, quotes included.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' || c == '\u{7f}' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The reason phrase for `status`; empty (allowed by RFC 9112) if unknown.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Appends `response` to `out` as an HTTP/1.1 message.
fn serialize(response: &Response, keep_alive: bool, out: &mut Vec<u8>) {
    let replaced;
    let response = if (200..=599).contains(&response.status) {
        response
    } else {
        let message = format!(
            "The API handler returned the invalid status code {}.",
            response.status
        );
        replaced = Response::fault(500, &message);
        &replaced
    };
    let status = response.status;
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nServer: vmm API\r\n",
        reason(status)
    );
    let body = if status == 204 {
        None
    } else {
        response.body.as_deref()
    };
    if response.deprecation {
        head.push_str("Deprecation: true\r\n");
    }
    if let Some(body) = body {
        head.push_str("Content-Type: application/json\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    } else if status != 204 {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body.unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::Shutdown;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::{self, JoinHandle};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A server running on its own thread, in a fresh directory.
    struct Harness {
        dir: PathBuf,
        sock: PathBuf,
        shutdown: EventFd,
        thread: Option<JoinHandle<()>>,
        seen: Arc<Mutex<Vec<String>>>,
    }

    fn temp_dir() -> PathBuf {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-http-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Answers `/empty` with 204, `/big` with 16 KiB, anything else with what it got.
    fn handler(seen: Arc<Mutex<Vec<String>>>) -> impl FnMut(Request) -> Response {
        move |req| {
            let method = match &req.method {
                Method::Get => "GET",
                Method::Put => "PUT",
                Method::Patch => "PATCH",
                Method::Delete => "DELETE",
                Method::Other(m) => m.as_str(),
            };
            seen.lock().unwrap().push(format!("{method} {}", req.path));
            match req.path.as_str() {
                "/empty" => Response::no_content(),
                "/big" => {
                    Response::json(200, format!("\"{}\"", "x".repeat(16 * 1024)).into_bytes())
                }
                "/bogus" => Response::json(100, b"{}".to_vec()),
                path => {
                    let body = format!(
                        "{{\"method\":\"{method}\",\"path\":\"{path}\",\"body_len\":{}}}",
                        req.body.len()
                    );
                    Response::json(200, body.into_bytes())
                }
            }
        }
    }

    impl Harness {
        fn start(opts: ServerOptions) -> Harness {
            let dir = temp_dir();
            let sock = dir.join("api.sock");
            let mut server = Server::bind(&sock, opts).unwrap();
            let shutdown = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let stop = shutdown.try_clone().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let mut handler = handler(seen.clone());
            let thread = thread::spawn(move || server.run(&mut handler, &stop).unwrap());
            Harness {
                dir,
                sock,
                shutdown,
                thread: Some(thread),
                seen,
            }
        }

        fn connect(&self) -> UnixStream {
            let stream = UnixStream::connect(&self.sock).unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            stream.set_write_timeout(Some(TIMEOUT)).unwrap();
            stream
        }

        /// Sends `raw` on a new connection and reads one response.
        fn exchange(&self, raw: &[u8]) -> Reply {
            let mut stream = self.connect();
            stream.write_all(raw).unwrap();
            read_response(&mut stream, &mut Vec::new()).expect("no response")
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.shutdown.write(1).unwrap();
            if let Some(thread) = self.thread.take() {
                let result = thread.join();
                if !thread::panicking() {
                    result.unwrap();
                }
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    /// Reads one response, keeping what follows it in `buf`; None on EOF, reset or timeout.
    fn read_response(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Option<Reply> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut parsed = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = parsed.parse(buf) {
                let length = parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"));
                let length = length.map_or(0, |h| {
                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                });
                if buf.len() >= n + length {
                    let status = parsed.code.unwrap();
                    let head = String::from_utf8(buf[..n].to_vec()).unwrap();
                    let body = String::from_utf8(buf[n..n + length].to_vec()).unwrap();
                    buf.drain(..n + length);
                    return Some(Reply { status, head, body });
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    }

    /// Whether the server closed the connection (EOF or reset, not a timeout).
    fn closed(stream: &mut UnixStream) -> bool {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    fn assert_fault(reply: &Reply, status: u16, fragment: &str) {
        assert_eq!(reply.status, status, "{reply:?}");
        assert!(
            reply.body.starts_with("{\"fault_message\": \""),
            "{reply:?}"
        );
        assert!(
            reply.body.contains(fragment),
            "{reply:?} lacks {fragment:?}"
        );
    }

    #[test]
    fn fault_messages_are_escaped_json() {
        let fault = Response::fault(400, "a \"b\" \\ c\n\t\u{1}é");
        assert_eq!(fault.status, 400);
        let body = String::from_utf8(fault.body.unwrap()).unwrap();
        assert_eq!(body, r#"{"fault_message": "a \"b\" \\ c\n\t\u0001é"}"#);
        assert_eq!(
            Response::no_content(),
            Response {
                status: 204,
                body: None,
                deprecation: false,
            }
        );
    }

    #[test]
    fn bind_refuses_existing_path_and_drop_removes_only_its_socket() {
        let dir = temp_dir();
        let taken = dir.join("taken");
        std::fs::write(&taken, b"keep").unwrap();
        let err = Server::bind(&taken, ServerOptions::default()).unwrap_err();
        assert!(err.to_string().contains(&*taken.to_string_lossy()), "{err}");
        assert_eq!(std::fs::read(&taken).unwrap(), b"keep");

        let sock = dir.join("api.sock");
        drop(Server::bind(&sock, ServerOptions::default()).unwrap());
        assert!(!sock.exists());
        let server = Server::bind(&sock, ServerOptions::default()).unwrap();
        std::fs::remove_file(&sock).unwrap();
        std::fs::write(&sock, b"other").unwrap();
        drop(server);
        assert_eq!(std::fs::read(&sock).unwrap(), b"other");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn methods_paths_and_bodies_reach_the_handler() {
        let h = Harness::start(ServerOptions::default());
        let reply = h.exchange(b"GET /machine-config HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (
                200,
                r#"{"method":"GET","path":"/machine-config","body_len":0}"#
            )
        );
        let reply = h.exchange(b"PUT /drives/a%20b?x=1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert!(
            reply
                .body
                .contains(r#""method":"PUT","path":"/drives/a%20b?x=1","body_len":5"#),
            "{reply:?}"
        );
        let reply = h
            .exchange(b"PATCH /vm HTTP/1.1\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\n{}");
        assert!(
            reply
                .body
                .contains(r#""method":"PATCH","path":"/vm","body_len":2"#),
            "{reply:?}"
        );
        let reply = h.exchange(b"POST /x HTTP/1.1\r\n\r\n");
        assert!(reply.body.contains(r#""method":"POST""#), "{reply:?}");
        assert_eq!(h.seen.lock().unwrap().len(), 4);
    }

    #[test]
    fn responses_are_formatted() {
        let h = Harness::start(ServerOptions::default());
        let reply = h.exchange(b"GET /x HTTP/1.1\r\n\r\n");
        assert_eq!(reply.body, r#"{"method":"GET","path":"/x","body_len":0}"#);
        let expected = "HTTP/1.1 200 OK\r\nServer: vmm API\r\nContent-Type: application/json\r\n\
                        Content-Length: 41\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(reply.head, expected);
        let reply = h.exchange(b"GET /empty HTTP/1.1\r\n\r\n");
        assert_eq!(
            reply.head,
            "HTTP/1.1 204 No Content\r\nServer: vmm API\r\nConnection: keep-alive\r\n\r\n"
        );
        let reply = h.exchange(b"GET /bogus HTTP/1.1\r\n\r\n");
        assert_fault(&reply, 500, "invalid status code 100");
    }

    #[test]
    fn keep_alive_by_default_and_close_on_request() {
        let h = Harness::start(ServerOptions::default());
        let mut s = h.connect();
        let mut buf = Vec::new();
        for _ in 0..3 {
            s.write_all(b"GET /a HTTP/1.1\r\n\r\n").unwrap();
            let reply = read_response(&mut s, &mut buf).unwrap();
            assert!(reply.head.contains("Connection: keep-alive\r\n"));
        }
        s.write_all(b"GET /a HTTP/1.1\r\nConnection: foo, Close\r\n\r\n")
            .unwrap();
        assert!(read_response(&mut s, &mut buf)
            .unwrap()
            .head
            .contains("Connection: close\r\n"));
        assert!(closed(&mut s));

        let mut s = h.connect();
        s.write_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        assert!(read_response(&mut s, &mut buf)
            .unwrap()
            .head
            .contains("Connection: keep-alive\r\n"));
        s.write_all(b"GET /a HTTP/1.0\r\n\r\n").unwrap();
        assert!(read_response(&mut s, &mut buf)
            .unwrap()
            .head
            .contains("Connection: close\r\n"));
        assert!(closed(&mut s));
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let h = Harness::start(ServerOptions::default());
        let mut s = h.connect();
        s.write_all(b"GET /1 HTTP/1.1\r\n\r\nPUT /2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /empty HTTP/1.1\r\n\r\nGET /4 HTTP/1.1\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let replies: Vec<Reply> = (0..4)
            .map(|_| read_response(&mut s, &mut buf).unwrap())
            .collect();
        assert!(replies[0].body.contains("\"/1\""));
        assert!(replies[1].body.contains("\"/2\",\"body_len\":3"));
        assert_eq!(replies[2].status, 204);
        assert!(replies[3].body.contains("\"/4\""));
    }

    #[test]
    fn stalled_clients_do_not_stall_others() {
        let h = Harness::start(ServerOptions::default());
        let mut stalled: Vec<UnixStream> = (0..20).map(|_| h.connect()).collect();
        for s in &mut stalled {
            s.write_all(b"GET /half HTTP/1.1\r\nHost: loc").unwrap();
        }
        let start = Instant::now();
        assert_eq!(h.exchange(b"GET /x HTTP/1.1\r\n\r\n").status, 200);
        assert!(start.elapsed() < Duration::from_secs(2));
        stalled[7].write_all(b"alhost\r\n\r\n").unwrap();
        assert!(read_response(&mut stalled[7], &mut Vec::new())
            .unwrap()
            .body
            .contains("/half"));
    }

    #[test]
    fn clients_that_never_read_are_closed_and_others_served() {
        let h = Harness::start(ServerOptions::default());
        let mut flooder = h.connect();
        let flood = thread::spawn(move || {
            // Each request asks for 16 KiB; the server closes once 64 KiB pile up unread.
            (0..10_000).find_map(|_| flooder.write_all(b"GET /big HTTP/1.1\r\n\r\n").err())
        });
        let mut s = h.connect();
        let mut buf = Vec::new();
        for _ in 0..20 {
            s.write_all(b"GET /x HTTP/1.1\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut s, &mut buf).unwrap().status, 200);
        }
        let error = flood
            .join()
            .unwrap()
            .expect("the flooding client was never closed");
        assert!(
            matches!(
                error.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
            ),
            "{error}"
        );
        assert_eq!(h.exchange(b"GET /x HTTP/1.1\r\n\r\n").status, 200);
    }

    #[test]
    fn clients_leaving_mid_request_or_mid_body_are_forgotten() {
        let h = Harness::start(ServerOptions::default());
        h.connect()
            .write_all(b"PUT /head HTTP/1.1\r\nContent-Len")
            .unwrap();
        h.connect()
            .write_all(b"PUT /body HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123456789")
            .unwrap();
        let mut s = h.connect();
        s.write_all(b"PUT /half HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
            .unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert!(closed(&mut s));
        assert_eq!(h.exchange(b"GET /after HTTP/1.1\r\n\r\n").status, 200);
        assert_eq!(*h.seen.lock().unwrap(), ["GET /after"]);
    }

    #[test]
    fn transfer_encoding_and_bad_content_length_are_rejected() {
        let h = Harness::start(ServerOptions::default());
        let mut s = h.connect();
        s.write_all(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .unwrap();
        assert_fault(
            &read_response(&mut s, &mut Vec::new()).unwrap(),
            400,
            NO_CHUNKED,
        );
        assert!(closed(&mut s));
        for value in [
            "abc",
            "-1",
            "+1",
            "1 2",
            "",
            "0x10",
            "99999999999999999999999",
            "5,",
        ] {
            let raw = format!("PUT /x HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert_fault(
                &h.exchange(raw.as_bytes()),
                400,
                "Content-Length header has an invalid value",
            );
        }
        let reply =
            h.exchange(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!");
        assert_fault(&reply, 400, "different values");
        assert!(h.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn oversized_payload_is_refused_unread() {
        let h = Harness::start(ServerOptions::default());
        let mut s = h.connect();
        s.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n")
            .unwrap();
        let mut writer = s.try_clone().unwrap();
        let body = thread::spawn(move || writer.write_all(&vec![b'a'; 10_000_000]));
        let reply = read_response(&mut s, &mut Vec::new()).unwrap();
        // Firecracker's answer byte for byte (its suite compares it whole).
        let message = "Request payload with size 10000000 is larger than the limit of 51200 allowed by server.\n\
                       All previous unanswered requests will be dropped.";
        assert_eq!(reply.body, format!("{{ \"error\": \"{message}\" }}"));
        assert_eq!(
            reply.head,
            "HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: 152\r\n\r\n"
        );
        assert!(
            body.join().unwrap().is_err(),
            "the server read the whole 10 MB body"
        );
        assert!(h.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn expect_100_continue_is_answered_before_the_body() {
        let h = Harness::start(ServerOptions::default());
        let mut s = h.connect();
        s.write_all(b"PUT /drive HTTP/1.1\r\nContent-Length: 2000\r\nExpect: 100-continue\r\n\r\n")
            .unwrap();
        let mut interim = [0u8; 25];
        s.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(&[b'x'; 2000]).unwrap();
        assert!(read_response(&mut s, &mut Vec::new())
            .unwrap()
            .body
            .contains("\"body_len\":2000"));
    }

    #[test]
    fn malformed_requests_get_400_and_are_closed() {
        let opts = ServerOptions::default();
        let h = Harness::start(opts);
        let long_path = format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(opts.max_path_len));
        let big_header = format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "b".repeat(opts.max_header_bytes)
        );
        let many_headers = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        let cases: [(&[u8], &str); 8] = [
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                "malformed",
            ),
            (b"GET\r\n\r\n", "malformed"),
            (
                b"GET /x HTTP/2.0\r\n\r\n",
                "malformed: invalid HTTP version",
            ),
            (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", "not valid UTF-8"),
            (long_path.as_bytes(), "request target is 1025 bytes long"),
            (
                big_header.as_bytes(),
                "header section is larger than the limit of 8192 bytes",
            ),
            (
                big_header.as_bytes().split_at(8200).0,
                "header section is larger",
            ),
            (many_headers.as_bytes(), "more than 32 header fields"),
        ];
        for (raw, fragment) in cases {
            let mut s = h.connect();
            s.write_all(raw).unwrap();
            let reply = read_response(&mut s, &mut Vec::new()).unwrap();
            assert_fault(&reply, 400, fragment);
            assert!(reply.head.contains("Connection: close\r\n"));
            assert!(closed(&mut s));
        }
        assert!(h.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn connections_over_the_limit_are_refused() {
        let h = Harness::start(ServerOptions {
            max_connections: 4,
            ..Default::default()
        });
        let mut open: Vec<UnixStream> = (0..4).map(|_| h.connect()).collect();
        for s in &mut open {
            s.write_all(b"GET /x HTTP/1.1\r\n\r\n").unwrap();
            assert_eq!(read_response(s, &mut Vec::new()).unwrap().status, 200);
        }
        let mut extra = h.connect();
        assert_fault(
            &read_response(&mut extra, &mut Vec::new()).unwrap(),
            503,
            "Too many connections",
        );
        assert!(closed(&mut extra));
        drop(open.pop());
        let served = (0..100).any(|_| {
            thread::sleep(Duration::from_millis(10));
            let mut s = h.connect();
            s.write_all(b"GET /x HTTP/1.1\r\n\r\n").is_ok()
                && read_response(&mut s, &mut Vec::new()).is_some_and(|r| r.status == 200)
        });
        assert!(served, "a freed slot was never reused");
    }

    #[test]
    fn shutdown_closes_connections() {
        let mut h = Harness::start(ServerOptions::default());
        let mut idle = h.connect();
        let mut half = h.connect();
        half.write_all(b"GET /x HTTP/1.1\r\n").unwrap();
        h.shutdown.write(1).unwrap();
        h.thread.take().unwrap().join().unwrap();
        assert!(closed(&mut idle));
        assert!(closed(&mut half));
    }

    /// A client of one of the kinds above, chosen by `i`.
    fn visit(h: &Harness, i: usize) {
        let mut s = h.connect();
        let mut buf = Vec::new();
        let _ = match i % 10 {
            0 => {
                s.write_all(b"GET /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\nConnection: close\r\n\r\n")
            }
            1 => s.write_all(b"GET /half HTTP/1.1\r\nHo"),
            2 => s.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort"),
            3 => s.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            4 => s.write_all(b"\x00\x01garbage\r\n\r\n"),
            5 => s.write_all(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            6 => {
                s.write_all(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n")
            }
            7 if i % 100 == 7 => {
                (0..40).try_for_each(|_| s.write_all(b"GET /big HTTP/1.1\r\n\r\n"))
            }
            8 => s
                .write_all(b"GET /x HTTP/1.1\r\n\r\n")
                .map(|_| drop(read_response(&mut s, &mut buf))),
            _ => Ok(()),
        };
    }

    /// Runs `descriptor_count_check` in a process of its own, where no other test opens
    /// descriptors while it counts them.
    #[test]
    fn no_descriptor_leaks_after_500_connections() {
        let tests = module_path!().split_once("::").unwrap().1;
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("{tests}::descriptor_count_check")])
            .args(["--ignored", "--test-threads=1"])
            .env(LEAK_CHECK_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{stdout}\n{stderr}"
        );
    }

    const LEAK_CHECK_ENV: &str = "VMM_HTTP_DESCRIPTOR_CHECK";

    #[test]
    #[ignore = "run alone in a child process by no_descriptor_leaks_after_500_connections"]
    fn descriptor_count_check() {
        if std::env::var_os(LEAK_CHECK_ENV).is_none() {
            return; // Other tests of this process would skew the count.
        }
        let before = open_fds();
        let h = Harness::start(ServerOptions::default());
        // Count once the server has its epoll set and has closed its end of this connection.
        let mut s = h.connect();
        s.write_all(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut s, &mut Vec::new()).unwrap().status, 200);
        assert!(closed(&mut s));
        drop(s);
        let running = open_fds();
        for i in 0..500 {
            visit(&h, i);
        }
        let deadline = Instant::now() + TIMEOUT;
        while open_fds() != running && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(open_fds(), running, "connections left open by the server");
        drop(h);
        assert_eq!(open_fds(), before);
    }

    /// A deterministic linear congruential generator.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as usize % below
        }
    }

    fn fuzz_input(rng: &mut Lcg) -> Vec<u8> {
        let valid = b"PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody".to_vec();
        let lengths = [
            "-1",
            "x",
            "4, 5",
            "",
            "18446744073709551616",
            "4\t",
            "0004",
            "1e3",
            "4 4",
        ];
        match rng.next(6) {
            0 => (0..rng.next(300)).map(|_| rng.next(256) as u8).collect(),
            1 => valid[..rng.next(valid.len())].to_vec(),
            2 => format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(rng.next(20_000))).into_bytes(),
            3 => format!(
                "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\nbody",
                lengths[rng.next(lengths.len())]
            )
            .into_bytes(),
            4 => {
                let mut v = valid;
                for _ in 0..=rng.next(4) {
                    let at = rng.next(v.len());
                    v[at] = rng.next(256) as u8;
                }
                v
            }
            _ => {
                let mut v = valid;
                let at = rng.next(v.len());
                v.splice(at..at, (0..rng.next(50)).map(|_| b"\r\n :\0"[rng.next(5)]));
                v
            }
        }
    }

    #[test]
    fn fuzzed_requests_do_not_break_the_server() {
        let h = Harness::start(ServerOptions::default());
        let mut rng = Lcg(0x5eed);
        for _ in 0..500 {
            let input = fuzz_input(&mut rng);
            let mut s = h.connect();
            let _ = s
                .write_all(&input)
                .and_then(|_| s.shutdown(Shutdown::Write));
            // Every connection ends: answered and closed, or just closed.
            let mut rest = Vec::new();
            let end = s.read_to_end(&mut rest);
            assert!(
                end.is_ok()
                    || end
                        .as_ref()
                        .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
                "{end:?} for {input:?}"
            );
            assert!(
                rest.is_empty() || rest.starts_with(b"HTTP/1.1 "),
                "{input:?}"
            );
        }
        assert_eq!(h.exchange(b"GET /after HTTP/1.1\r\n\r\n").status, 200);
    }
}
