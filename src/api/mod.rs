//! The control API: Firecracker's REST API over a Unix socket.
//!
//! The API thread serves HTTP ([`http`]), parses each request ([`request`])
//! and answers malformed ones itself; a well-formed request goes to the VMM
//! thread through a channel plus an eventfd that wakes its event loop, and the
//! API thread waits for the answer. The API thread never touches VM state, and
//! no vCPU ever waits for it.

pub mod controller;
pub mod http;
pub mod request;

use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use self::http::{Response, Server, ServerOptions};
use self::request::ApiRequest;
use crate::metrics::METRICS;

/// A request on its way to the VMM thread, with where its answer goes.
type Envelope = (ApiRequest, Sender<Response>);

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket cannot be served.
    #[error(transparent)]
    Http(#[from] http::Error),
    /// An eventfd cannot be created.
    #[error("Cannot create an eventfd for the API: {0}.")]
    EventFd(std::io::Error),
    /// The thread cannot be started.
    #[error("Cannot start the API thread: {0}.")]
    Spawn(std::io::Error),
    /// The thread's seccomp filter cannot be installed.
    #[error(transparent)]
    Seccomp(crate::seccomp::Error),
}

/// The running API thread.
pub struct ApiThread {
    shutdown: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ApiThread {
    /// Stops serving, closes every connection and removes the socket.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.shutdown.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ApiThread {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// The VMM thread's end: requests to serve, and the eventfd that announces them.
pub struct ApiEndpoint {
    requests: Receiver<Envelope>,
    wake: Arc<EventFd>,
}

impl ApiEndpoint {
    /// The subscriber that wakes the event loop when requests arrive.
    pub fn waker(&self) -> ApiWaker {
        ApiWaker(self.wake.clone())
    }

    /// Serves every request waiting, in order, with `handle`.
    pub fn serve(&self, mut handle: impl FnMut(ApiRequest) -> Response) {
        while let Ok((req, answer)) = self.requests.try_recv() {
            // The client may be gone; the request was still carried out.
            let _ = answer.send(handle(req));
        }
    }
}

/// Wakes the event loop for the API (the requests themselves are served
/// between rounds of events, where the VMM can be changed freely).
pub struct ApiWaker(Arc<EventFd>);

impl MutEventSubscriber for ApiWaker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
            log::error!("cannot watch the API channel: {e:?}");
        }
    }
}

/// Binds `path` (refused if it exists) and starts the API thread.
pub fn start(path: &Path, opts: ServerOptions) -> Result<(ApiThread, ApiEndpoint), Error> {
    let mut server = Server::bind(path, opts)?;
    let shutdown = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
    let (tx, rx) = mpsc::channel::<Envelope>();
    let thread_shutdown = shutdown.clone();
    let thread_wake = wake.clone();
    let (filtered_tx, filtered_rx) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || {
            // Before the first request byte is read.
            let filtered = crate::seccomp::apply(crate::seccomp::Role::Api);
            let failed = filtered.is_err();
            let _ = filtered_tx.send(filtered);
            if failed {
                return;
            }
            let mut handler = |req: http::Request| -> Response {
                let received = std::time::Instant::now();
                log_request(&req);
                let deprecated = request::deprecated(&req);
                if let Some(warning) = &deprecated {
                    log::warn!("{warning}");
                }
                let mut resp = match request::parse(&req) {
                    Ok(api_req) => forward(&tx, &thread_wake, api_req),
                    Err(resp) => {
                        count_parse_failure(&req);
                        resp
                    }
                };
                resp.deprecation = deprecated.is_some();
                log_response(&resp, received);
                resp
            };
            if let Err(e) = server.run(&mut handler, &thread_shutdown) {
                log::error!("the API server stopped: {e}");
            }
        })
        .map_err(Error::Spawn)?;
    match filtered_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(Error::Seccomp(e));
        }
        Err(_) => {
            let _ = thread.join();
            return Err(Error::Spawn(std::io::Error::other("the API thread ended")));
        }
    }
    Ok((
        ApiThread {
            shutdown,
            thread: Some(thread),
        },
        ApiEndpoint { requests: rx, wake },
    ))
}

/// Logs a request as Firecracker does (clients and Firecracker's test
/// framework read these lines): the method, the path and, except for the
/// metadata store's contents, the body.
fn log_request(req: &http::Request) {
    let method = match &req.method {
        http::Method::Get => "Get",
        http::Method::Put => "Put",
        http::Method::Patch => "Patch",
        http::Method::Delete => "Delete",
        http::Method::Other(m) => m.as_str(),
    };
    let path = req.path.split('?').next().unwrap_or("");
    if req.body.is_empty() || path.starts_with("/mmds") {
        log::info!("The API server received a {method} request on {path:?}.");
    } else {
        let body = String::from_utf8_lossy(&req.body);
        log::info!("The API server received a {method} request on {path:?} with body {body:?}.");
    }
}

/// Logs how long a request took and, for a failure, its fault message.
fn log_response(resp: &Response, received: std::time::Instant) {
    if resp.status >= 400 {
        let text = resp
            .body
            .as_deref()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
            .unwrap_or_default();
        log::error!(
            "Received Error. Status code: {} {}. Message: {text}",
            resp.status,
            http::reason(resp.status)
        );
    }
    log::debug!(
        "Total previous API call duration: {} us.",
        received.elapsed().as_micros()
    );
}

/// Hands a request to the VMM thread and waits for its answer.
fn forward(tx: &Sender<Envelope>, wake: &EventFd, req: ApiRequest) -> Response {
    let (answer_tx, answer_rx) = mpsc::channel();
    if tx.send((req, answer_tx)).is_err() || wake.write(1).is_err() {
        return Response::fault(500, "The VMM is shutting down.");
    }
    answer_rx
        .recv()
        .unwrap_or_else(|_| Response::fault(500, "The VMM is shutting down."))
}

/// Counts a PUT or PATCH the API thread refused, under its endpoint's group.
fn count_parse_failure(req: &http::Request) {
    let m = &METRICS;
    let first = req.path.split('/').nth(1).unwrap_or("");
    match (&req.method, first) {
        (http::Method::Put, "actions") => m.put_api_requests.actions_fails.inc(),
        (http::Method::Put, "boot-source") => m.put_api_requests.boot_source_fails.inc(),
        (http::Method::Put, "drives") => m.put_api_requests.drive_fails.inc(),
        (http::Method::Put, "logger") => m.put_api_requests.logger_fails.inc(),
        (http::Method::Put, "machine-config") => m.put_api_requests.machine_cfg_fails.inc(),
        (http::Method::Put, "metrics") => m.put_api_requests.metrics_fails.inc(),
        (http::Method::Put, "network-interfaces") => m.put_api_requests.network_fails.inc(),
        (http::Method::Patch, "drives") => m.patch_api_requests.drive_fails.inc(),
        (http::Method::Patch, "network-interfaces") => m.patch_api_requests.network_fails.inc(),
        (http::Method::Patch, "machine-config") => m.patch_api_requests.machine_cfg_fails.inc(),
        _ => {}
    }
}
