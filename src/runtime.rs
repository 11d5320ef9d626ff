//! Running a built VM: vCPU threads in KVM_RUN, and one event loop on the calling
//! thread for console input, host signals and the VM's end.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::legacy::serial::SerialDevice;
use devices::virtio::mmio::QueueEvents;
use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::builder::MicroVm;
use crate::device_manager::DeviceManager;
use crate::exit::{ExitSignal, VmExit};
use crate::vmm::Vmm;

/// Ctrl-A: the console escape prefix; Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A.
pub const ESCAPE_PREFIX: u8 = 0x01;
/// The key that quits after the escape prefix.
pub const ESCAPE_QUIT: u8 = b'x';

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event loop failed.
    #[error("The VMM event loop failed: {0:?}.")]
    EventLoop(event_manager::Error),
    /// Host signals cannot be routed to the event loop.
    #[error("Cannot set up host signal handling: {0}.")]
    Signals(std::io::Error),
    /// A device or timer cannot be watched by the event loop.
    #[error("Cannot watch the {what} in the event loop: {err}.")]
    Watch {
        what: &'static str,
        err: std::io::Error,
    },
    /// The VM failed to start.
    #[error(transparent)]
    Start(Box<crate::vmm::Error>),
    /// A vCPU or device failed while the guest ran.
    #[error("{0}")]
    Failed(String),
}

/// How the VM's run interacts with the host process.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Console input (e.g. stdin); `None` for no input.
    pub console_in: Option<RawFd>,
    /// Whether `console_in` is an interactive terminal: enables the Ctrl-A x escape.
    pub console_is_terminal: bool,
    /// Route SIGTERM, SIGINT and SIGHUP to an orderly stop. Blocks them in the
    /// calling thread (and so in the vCPU threads it starts).
    pub handle_signals: bool,
}

/// Stops a running VM from another thread.
#[derive(Clone)]
pub struct StopHandle(Arc<ExitSignal>);

impl StopHandle {
    /// Asks the VM to stop; `run` then returns `VmExit::Stopped`.
    pub fn stop(&self) {
        self.0.raise(Ok(VmExit::Stopped));
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Console input set up to reach the serial port once the VM starts.
#[derive(Clone, Copy)]
struct ConsoleSpec {
    fd: RawFd,
    escapes: bool,
}

/// The VMM thread's event loop: host signals, the VM's end, console input,
/// device queues and backends, and whatever the embedder adds (the API).
pub struct EventLoop {
    em: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    console: Option<ConsoleSpec>,
}

impl EventLoop {
    /// A loop that ends when `exit` is raised, set up as `opts` says.
    pub fn new(exit: Arc<ExitSignal>, opts: RunOptions) -> Result<Self, Error> {
        let mut em: EventManager<Subscriber> = EventManager::new().map_err(Error::EventLoop)?;
        if opts.handle_signals {
            let sigfd = block_and_signalfd().map_err(Error::Signals)?;
            em.add_subscriber(Arc::new(Mutex::new(SignalWatch {
                fd: sigfd,
                exit: exit.clone(),
            })));
        }
        em.add_subscriber(Arc::new(Mutex::new(ExitWatch(exit.clone()))));
        Ok(EventLoop {
            em,
            exit,
            console: opts.console_in.map(|fd| ConsoleSpec {
                fd,
                escapes: opts.console_is_terminal,
            }),
        })
    }

    /// Adds a subscriber.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.em.add_subscriber(subscriber);
    }

    /// Watches a started VM's devices: console input to its serial port, and
    /// each virtio device's queues and backend (left alone while `paused`).
    pub fn watch_devices(
        &mut self,
        devices: &mut DeviceManager,
        paused: Arc<AtomicBool>,
    ) -> Result<(), Error> {
        // Everything that can fail comes first: a failed start leaves no
        // device registered (holding its disk lock or TAP).
        let queue_events = devices
            .virtio
            .iter()
            .map(|entry| queue_events(entry, paused.clone()))
            .collect::<Result<Vec<_>, Error>>()?;
        if let Some(c) = self.console {
            self.em.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
                fd: c.fd,
                serial: devices.serial.clone(),
                exit: self.exit.clone(),
                escapes: c.escapes,
                saw_prefix: false,
            })));
        }
        for (entry, events) in devices.virtio.iter_mut().zip(queue_events) {
            entry.watch = Some(self.em.add_subscriber(Arc::new(Mutex::new(events))));
        }
        Ok(())
    }

    /// Watches the queues of one device added while the VM runs.
    pub fn watch_device(
        &mut self,
        entry: &mut crate::device_manager::VirtioEntry,
        paused: Arc<AtomicBool>,
    ) -> Result<(), Error> {
        let events = queue_events(entry, paused)?;
        entry.watch = Some(self.em.add_subscriber(Arc::new(Mutex::new(events))));
        Ok(())
    }

    /// Stops watching a device's queues (it is being removed).
    pub fn unwatch(&mut self, id: SubscriberId) {
        if let Err(e) = self.em.remove_subscriber(id) {
            log::warn!("cannot stop watching a removed device: {e:?}");
        }
    }

    /// Wakes the loop every `period` (for periodic work done between rounds).
    pub fn add_periodic_wakeup(&mut self, period: std::time::Duration) -> Result<(), Error> {
        let watch = |e: vmm_sys_util::errno::Error| Error::Watch {
            what: "periodic timer",
            err: e.into(),
        };
        let mut timer = TimerFd::new().map_err(watch)?;
        timer.reset(period, Some(period)).map_err(watch)?;
        self.em
            .add_subscriber(Arc::new(Mutex::new(TimerWake(timer))));
        Ok(())
    }

    /// Waits for events and dispatches them once.
    pub fn run_once(&mut self) -> Result<(), Error> {
        self.em.run().map(|_| ()).map_err(Error::EventLoop)
    }
}

/// The event-loop side of a virtio device: its queues, backend and timer.
fn queue_events(
    entry: &crate::device_manager::VirtioEntry,
    paused: Arc<AtomicBool>,
) -> Result<QueueEvents, Error> {
    QueueEvents::new(entry.transport.clone(), paused).map_err(|err| Error::Watch {
        what: "virtio device queues",
        err,
    })
}

/// Runs the event loop until the VM must end, calling `between` after each
/// round of events (where the embedder serves its requests), and returns how
/// it ended. The VM still exists (its devices can be read, e.g. for a last
/// metrics line): the caller shuts it down with [`Vmm::shutdown`] (dropping
/// the Vmm does too).
pub fn run(
    vmm: &mut Vmm,
    el: &mut EventLoop,
    mut between: impl FnMut(&mut Vmm, &mut EventLoop),
) -> Result<VmExit, Error> {
    let mut result = Ok(());
    while !vmm.exit_signal().is_raised() {
        if let Err(e) = el.run_once() {
            result = Err(e);
            break;
        }
        between(vmm, el);
    }
    result?;
    match vmm.exit_signal().outcome() {
        Some(Ok(exit)) => Ok(exit),
        Some(Err(msg)) => Err(Error::Failed(msg)),
        None => Err(Error::Failed("The VM stopped without a reason.".into())),
    }
}

impl MicroVm {
    /// A handle to stop the VM while it runs.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.exit.clone())
    }

    /// Runs the VM until the guest powers off, resets or crashes, a handled signal
    /// arrives, or a [`StopHandle`] is used. Every vCPU thread is joined before it returns.
    pub fn run(self, opts: RunOptions) -> Result<VmExit, Error> {
        let exit = self.exit.clone();
        let mut el = EventLoop::new(exit.clone(), opts)?;
        let mut vmm = Vmm::new(
            self.config.clone(),
            exit,
            Box::new(std::io::sink()),
            self.started,
        );
        vmm.start_built(self, &mut el)
            .map_err(|e| Error::Start(Box::new(e)))?;
        let result = run(&mut vmm, &mut el, |_, _| {});
        vmm.shutdown();
        result
    }
}

/// Wakes the loop on a timer.
struct TimerWake(TimerFd);

impl MutEventSubscriber for TimerWake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Readable, so the read does not block.
        let _ = self.0.wait();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch a timer: {e:?}");
        }
    }
}

/// Wakes the loop when the VM must end.
struct ExitWatch(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the exit event: {e:?}");
        }
    }
}

/// Host input to the guest's serial console.
struct ConsoleInput {
    fd: RawFd,
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<ExitSignal>,
    escapes: bool,
    saw_prefix: bool,
}

impl ConsoleInput {
    /// Strips the escape sequences from `input`; returns false if the user quit.
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if !self.escapes {
                out.push(b);
            } else if self.saw_prefix {
                self.saw_prefix = false;
                match b {
                    ESCAPE_QUIT => return false,
                    ESCAPE_PREFIX => out.push(ESCAPE_PREFIX),
                    other => out.extend([ESCAPE_PREFIX, other]),
                }
            } else if b == ESCAPE_PREFIX {
                self.saw_prefix = true;
            } else {
                out.push(b);
            }
        }
        true
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 512];
        // SAFETY: the fd stays open for the VMM's lifetime (it is stdin or owned by
        // the embedder); ManuallyDrop keeps this File from closing it.
        let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(self.fd) });
        let n = if events.event_set().contains(EventSet::IN) {
            match f.read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::Interrupted
                        || e.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    return
                }
                Err(_) => 0,
            }
        } else {
            0
        };
        if n == 0 {
            // End of input or hang-up: the guest keeps running without it.
            let _ = ops.remove(Events::new_raw(self.fd, EventSet::IN));
            return;
        }
        let mut out = Vec::with_capacity(n);
        if !self.filter(&buf[..n], &mut out) {
            self.exit.raise(Ok(VmExit::Stopped));
        }
        if !out.is_empty() {
            self.serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(&out);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or /dev/null cannot be polled: then there is no input.
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            log::debug!("console input is not pollable ({e:?}); the guest gets no input");
        }
    }
}

/// Turns SIGTERM/SIGINT/SIGHUP into an orderly stop.
struct SignalWatch {
    fd: OwnedFd,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for SignalWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n as usize == size {
            if info.ssi_signo == libc::SIGHUP as u32 {
                crate::metrics::METRICS.signals.sighup.set(1);
                crate::signals::log_intercepted(libc::SIGHUP, info.ssi_code);
            }
            self.exit.raise(Ok(VmExit::Signal(info.ssi_signo as i32)));
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch host signals: {e:?}");
        }
    }
}

/// Blocks the stop signals in this thread and returns a signalfd for them.
fn block_and_signalfd() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: -1 asks for a new descriptor; `set` is initialised.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(escapes: bool) -> ConsoleInput {
        ConsoleInput {
            fd: -1,
            serial: Arc::new(Mutex::new(SerialDevice::new(
                Arc::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap()),
                Box::new(std::io::sink()),
            ))),
            exit: Arc::new(ExitSignal::new().unwrap()),
            escapes,
            saw_prefix: false,
        }
    }

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_ctrl_a() {
        let mut c = console(true);
        let mut out = Vec::new();
        assert!(c.filter(b"ls\x01\x01\x01b", &mut out));
        assert_eq!(out, b"ls\x01\x01b");
        assert!(!c.filter(b"\x01x", &mut Vec::new()));
    }

    #[test]
    fn escape_split_across_reads_still_quits() {
        let mut c = console(true);
        assert!(c.filter(b"\x01", &mut Vec::new()));
        assert!(!c.filter(b"x", &mut Vec::new()));
    }

    #[test]
    fn non_terminal_input_passes_through_untouched() {
        let mut c = console(false);
        let mut out = Vec::new();
        assert!(c.filter(b"\x01x", &mut out));
        assert_eq!(out, b"\x01x");
    }
}
