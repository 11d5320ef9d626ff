//! `vmm-agent`: the guest agent. Listens on a vsock port (or, for tests, a
//! Unix socket) and serves each connection on a thread of its own: one
//! request per connection (run a command, put a file, get a file), as
//! docs/AGENT.md describes.

#![deny(clippy::undocumented_unsafe_blocks)]

mod server;

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use server::sys;
use vmm_agent::DEFAULT_PORT;

const USAGE: &str = "\
usage: vmm-agent [--port N | --listen-unix PATH] [--chroot DIR]
       vmm-agent connect [--cid C] --port N

Runs commands, and puts and gets files, for the host (see docs/AGENT.md).
  --port N            listen on AF_VSOCK port N, any CID (default 52)
  --listen-unix PATH  listen on the Unix socket PATH instead (for tests)
  --chroot DIR        serve inside DIR: once listening, the agent makes DIR its
                      root, so commands, working directories and file paths
                      are those of DIR (e.g. a user's root file system mounted
                      by the guest's init)
connect: copies stdin to a vsock stream to C:N (default C 2, the host) and the
stream to stdout, until both ends are done (as socat - VSOCK-CONNECT:C:N).
";

/// `vmm-agent connect [--cid C] --port N`: stdin to the stream, the stream
/// to stdout; the exit status is 0 when both directions ended cleanly.
fn connect(mut args: impl Iterator<Item = String>) -> ExitCode {
    let (mut cid, mut port) = (2u32, None);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u32>().ok());
        match (arg.as_str(), value) {
            ("--cid", Some(c)) => cid = c,
            ("--port", Some(p)) => port = Some(p),
            _ => {
                eprint!("vmm-agent connect: bad argument {arg:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(port) = port else {
        eprint!("vmm-agent connect: --port is needed\n{USAGE}");
        return ExitCode::from(2);
    };
    let stream = match sys::vsock_connect(cid, port) {
        Ok(fd) => File::from(fd),
        Err(e) => {
            eprintln!("vmm-agent connect: cannot connect to {cid}:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut up, mut down) = match stream.try_clone() {
        Ok(other) => (stream, other),
        Err(e) => {
            eprintln!("vmm-agent connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sender = thread::spawn(move || {
        let copied = io::copy(&mut io::stdin().lock(), &mut up);
        // The host sees the end of our data.
        let _ = sys::shutdown_write(&up);
        copied
    });
    let received = io::copy(&mut down, &mut io::stdout().lock());
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the sending thread died")));
    match (sent, received) {
        (Ok(_), Ok(_)) => ExitCode::SUCCESS,
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmm-agent connect: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the agent listens.
enum Listen {
    Vsock(u32),
    Unix(String),
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<(Listen, Option<String>), String> {
    let mut listen = Listen::Vsock(DEFAULT_PORT);
    let mut root = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let value = args.next().ok_or("--port needs a port number")?;
                let port = value
                    .parse()
                    .map_err(|_| format!("--port: {value:?} is not a port number"))?;
                listen = Listen::Vsock(port);
            }
            "--listen-unix" => {
                listen = Listen::Unix(args.next().ok_or("--listen-unix needs a path")?);
            }
            "--chroot" => root = Some(args.next().ok_or("--chroot needs a directory")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((listen, root))
}

/// A listening socket of either kind.
enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<OwnedFd> {
        match self {
            Self::Vsock(fd) => sys::accept(fd),
            Self::Unix(listener) => Ok(listener.accept()?.0.into()),
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "connect") {
        args.next();
        return connect(args);
    }
    if args.peek().is_some_and(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let (listen, root) = match parse_args(args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprint!("vmm-agent: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (listener, place) = match &listen {
        Listen::Vsock(port) => (
            sys::vsock_listen(*port).map(Listener::Vsock),
            format!("vsock port {port}"),
        ),
        Listen::Unix(path) => (
            UnixListener::bind(path).map(Listener::Unix),
            format!("Unix socket {path}"),
        ),
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("vmm-agent: cannot listen on {place}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = &root {
        // The listening socket stays valid outside the new root.
        if let Err(e) = std::os::unix::fs::chroot(dir).and_then(|()| std::env::set_current_dir("/"))
        {
            eprintln!("vmm-agent: cannot make {dir} the root: {e}");
            return ExitCode::FAILURE;
        }
    }
    eprintln!("vmm-agent: listening on {place}");
    loop {
        let conn = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors or memory, or an aborted connection:
                // wait a little rather than spin, and go on.
                eprintln!("vmm-agent: accepting a connection failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let spawned = thread::Builder::new()
            .name("vmm-agent-conn".into())
            .spawn(move || {
                if let Err(e) = server::serve(File::from(conn)) {
                    eprintln!("vmm-agent: {}", server::error_chain(&e));
                }
            });
        if let Err(e) = spawned {
            eprintln!("vmm-agent: starting a thread for a connection failed: {e}");
        }
    }
}
