#!/usr/bin/env python3
"""Snapshot benchmark: vmm against Firecracker on Full snapshot create, restore
and page sharing between clones, in one run, side by side.

Guest: the project's Linux kernel and test initramfs (`vmm.test=wait`: /init
prints "VMM-TEST: waiting" and sleeps), 1 vCPU, no drives, no network. Each VMM
boots its own guest and loads only its own snapshots (the formats differ).

1. Snapshot create: boot over the API, wait for the marker on the console,
   PATCH /vm Paused, then time PUT /snapshot/create (Full); the VMM is killed.
   One sample per VMM and memory size (--sizes). The sizes of the two files
   are shown beside it (the memory file as allocated on disk).
2. Restore -> running, N times (--runs): spawn a fresh VMM with --api-sock,
   wait until GET /machine-config is answered, PUT /snapshot/load (File memory
   backend, resume_vm); (a) the load request (sent -> 204) and (b) process
   spawn -> 204, median and min-max. The memory file is in the page cache
   (just written); both VMMs map it privately. After the first restore of each
   size the guest is sent Ctrl-Alt-Del: the kernel reboots (reboot=k) and the
   VMM exits, which shows the restored guest runs.
3. Page sharing, from the smallest snapshot: one clone alone (RSS and PSS
   from /proc/PID/smaps_rollup after ~3 s), then 10 clones running at once:
   their summed RSS and PSS against 10 x the RSS of the clone alone.

Whatever fails for one VMM is shown as "n/a (reason)" and explained under the
table; the other figures are still measured. Every spawned VMM is killed on
exit, error or SIGINT/SIGTERM, and the temporary directory (snapshot memory
files are large) is removed unless --keep-tmp.

With --pci each VMM also runs with --enable-pci (two more columns), and every
VM gets an entropy device and a read-only 1 MiB drive, so that the restore
has virtio devices to bring back on either transport.

Usage: tools/bench-snapshot.py [--runs 20] [--vmm PATH] [--firecracker PATH] [--sizes 128,1024]
                               [--clones 10] [--skip-fc] [--pci] [--keep-tmp]
Needs: cargo build --release (or --vmm), resources/build-kernel.sh and
build-initramfs.sh (run by the script; cached).
"""
import argparse, os, shutil, signal, statistics, subprocess, sys, tempfile, time

import benchlib
from benchlib import ROOT, VMM, PVM_PARAMS, call, guest_kernel, host_line, on_pvm, wait_for

DEFAULT_FC = os.path.normpath(os.path.join(ROOT, "..", "shared", "peers", "firecracker"))
MILESTONE = "VMM-TEST: waiting"
MIB = 1024 * 1024


class Procs:
    """Every VMM process the benchmark started, so that none outlives it."""

    def __init__(self):
        self.live = []

    def spawn(self, cmd, out):
        # Signals held while the child is created and recorded: an interrupt
        # cannot leave an unrecorded process behind.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            self.live.append(p)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return p

    def kill(self, p):
        if p.poll() is None:
            p.kill()
        p.wait()
        if p in self.live:
            self.live.remove(p)

    def kill_all(self):
        for p in list(self.live):
            self.kill(p)


PROCS = Procs()


class Failed(Exception):
    """A step failed for one VMM: `short` goes into the table, `detail` under it."""

    def __init__(self, short, detail=""):
        super().__init__(short)
        self.short, self.detail = short, detail


def log_tail(path, n=600):
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return data[-n:].decode(errors="replace").strip()


class Peer:
    """One VMM binary, its snapshots and its results (label -> cell text)."""

    def __init__(self, name, binary, tmp, extra=()):
        self.name, self.binary, self.extra = name, binary, list(extra)
        self.dir = os.path.join(tmp, "-".join(name.lower().replace("-", " ").split()))
        os.makedirs(self.dir)
        self.snaps = {}      # size -> (state path, memory path)
        self.cells = {}      # row label -> text
        self.notes = []      # full failure reports
        self.samples = {}    # row label -> list of seconds
        self.nspawn = 0

    def cmd(self, sock):
        # Error level: Firecracker logs to stdout, where the console goes.
        return [self.binary, "--api-sock", sock, "--level", "Error"] + self.extra

    def new_log(self, what):
        self.nspawn += 1
        return os.path.join(self.dir, f"{self.nspawn:03d}-{what}.log")

    def fail(self, labels, e):
        if isinstance(e, Failed):
            short, detail = e.short, e.detail
        else:
            short, detail = f"{type(e).__name__}: {e}".splitlines()[0][:200], ""
        self.notes.append(f"{short}" + (f"\n    {detail}" if detail else ""))
        for label in labels:
            self.cells.setdefault(label, f"n/a ({short[:90]}; note {len(self.notes)})")


def wait_api(sock, p, log, timeout=10):
    """Until the API answers GET /machine-config (Firecracker's socket file
    exists before it listens: a connect right then is refused)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call(sock, "GET", "/machine-config")
            return
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            if p.poll() is not None:
                raise Failed(f"exited (status {p.returncode}) before its API answered", log_tail(log))
            if time.monotonic() > deadline:
                raise Failed(f"no API on the socket after {timeout} s", log_tail(log))
            time.sleep(0.0005)


def unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- 1. boot and snapshot -------------------------------------------------------

def boot_and_snapshot(peer, size, kernel, initrd, cmdline, timeout, drive=None):
    d = os.path.join(peer.dir, f"{size}M")
    os.makedirs(d, exist_ok=True)
    sock, state, mem = os.path.join(d, "boot.sock"), os.path.join(d, "state"), os.path.join(d, "mem")
    for attempt in (1, 2):
        unlink(sock)
        p = PROCS.spawn(peer.cmd(sock), subprocess.PIPE)
        try:
            wait_api(sock, p, None)
            call(sock, "PUT", "/boot-source", {"kernel_image_path": kernel, "initrd_path": initrd, "boot_args": cmdline})
            call(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": size})
            if drive:
                call(sock, "PUT", "/entropy", {})
                call(sock, "PUT", "/drives/data", {"drive_id": "data", "path_on_host": drive,
                                                   "is_root_device": False, "is_read_only": True})
            t0 = time.monotonic()
            call(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
            try:
                wait_for(p, MILESTONE, timeout)
            except RuntimeError as e:
                # On PVM a boot can die in the instruction emulator at a
                # timing-dependent point (HOST-KVM.md): once more.
                if attempt == 1 and "exited before" in str(e):
                    print(f"  {peer.name} {size} MiB: the guest stopped before {MILESTONE!r}; retrying once",
                          file=sys.stderr)
                    continue
                raise Failed(f"boot: {str(e).splitlines()[0][:60]}", str(e))
            boot_s = time.monotonic() - t0
            call(sock, "PATCH", "/vm", {"state": "Paused"})
            t0 = time.monotonic()
            call(sock, "PUT", "/snapshot/create",
                 {"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem}, timeout=600)
            create_s = time.monotonic() - t0
        finally:
            PROCS.kill(p)
        peer.snaps[size] = (state, mem)
        return boot_s, create_s, os.stat(state).st_size, os.stat(mem).st_blocks * 512, os.stat(mem).st_size
    raise AssertionError("unreachable")


# --- 2. restore -----------------------------------------------------------------

def load_body(state, mem):
    return {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": True}


def restore(peer, size, sock, what):
    """Spawns a VMM and restores the snapshot of `size` into it, resumed.
    Returns (process, log, load seconds, spawn -> 204 seconds)."""
    state, mem = peer.snaps[size]
    unlink(sock)
    log = peer.new_log(what)
    with open(log, "wb") as out:
        t0 = time.monotonic()
        p = PROCS.spawn(peer.cmd(sock), out)
    try:
        wait_api(sock, p, log)
        t1 = time.monotonic()
        try:
            call(sock, "PUT", "/snapshot/load", load_body(state, mem), timeout=120)
        except (RuntimeError, OSError) as e:
            raise Failed(f"load: {e}", log_tail(log))
        t2 = time.monotonic()
        if p.poll() is not None:
            raise Failed(f"exited (status {p.returncode}) right after the load", log_tail(log))
        return p, log, t2 - t1, t2 - t0
    except BaseException:
        PROCS.kill(p)
        raise


def reboot_seconds(p, sock, log, timeout=120):
    """Sends Ctrl-Alt-Del; seconds until the VMM exits (the guest rebooted)."""
    t0 = time.monotonic()
    call(sock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"still running {timeout} s after Ctrl-Alt-Del", log_tail(log))
    return time.monotonic() - t0


def restore_runs(peers, size, runs):
    live = [q for q in peers if size in q.snaps]
    for i in range(runs):
        for peer in list(live):
            sock = os.path.join(peer.dir, "load.sock")
            try:
                p, log, load_s, spawn_s = restore(peer, size, sock, f"load-{size}M")
            except Exception as e:
                peer.fail([f"load{size}", f"spawn{size}", f"alive{size}"], e)
                live.remove(peer)
                continue
            try:
                if i == 0:
                    peer.cells[f"alive{size}"] = f"{reboot_seconds(p, sock, log):.1f}"
            except Exception as e:
                peer.fail([f"alive{size}"], e)
            finally:
                PROCS.kill(p)
            peer.samples.setdefault(f"load{size}", []).append(load_s)
            peer.samples.setdefault(f"spawn{size}", []).append(spawn_s)


# --- 3. page sharing ------------------------------------------------------------

def rollup_kib(pid):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


SHARING_ROWS = ["one", "ten_x", "sum_rss", "sum_pss", "anon", "ratio", "clones_alive"]


def page_sharing(peer, size, clones, settle):
    rows = SHARING_ROWS
    try:
        sock = os.path.join(peer.dir, "clone.sock")
        p, log, _, _ = restore(peer, size, sock, "clone-alone")
        try:
            time.sleep(settle)
            if p.poll() is not None:
                raise Failed(f"the clone exited (status {p.returncode}) while running alone", log_tail(log))
            one = rollup_kib(p.pid)
        finally:
            PROCS.kill(p)
        running = []
        try:
            for i in range(clones):
                sock = os.path.join(peer.dir, f"clone{i}.sock")
                p, log, _, _ = restore(peer, size, sock, f"clone{i}")
                running.append((p, sock, log))
            time.sleep(settle)
            gone = [(p, log) for p, _, log in running if p.poll() is not None]
            if gone:
                raise Failed(f"{len(gone)} of {clones} clones exited while running together "
                             f"(first status {gone[0][0].returncode})", log_tail(gone[0][1]))
            each = [rollup_kib(p.pid) for p, _, _ in running]
            # All still run: each reboots on Ctrl-Alt-Del.
            for p, sock, _ in running:
                call(sock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
            deadline = time.monotonic() + 180
            for p, _, _ in running:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            rebooted = sum(1 for p, _, _ in running if p.poll() is not None)
        finally:
            for p, _, _ in running:
                PROCS.kill(p)
    except Exception as e:
        peer.fail(rows, e)
        return
    sum_rss, sum_pss = sum(e["Rss"] for e in each), sum(e["Pss"] for e in each)
    mib = lambda kib: f"{kib / 1024:.1f}"
    peer.cells.update({
        "one": f"{mib(one['Rss'])} / {mib(one['Pss'])}",
        "ten_x": mib(clones * one["Rss"]),
        "sum_rss": f"{mib(sum_rss)} (per clone {mib(min(e['Rss'] for e in each))}–{mib(max(e['Rss'] for e in each))})",
        "sum_pss": f"{mib(sum_pss)} (per clone {mib(min(e['Pss'] for e in each))}–{mib(max(e['Pss'] for e in each))})",
        "anon": f"{mib(one['Anonymous'])} / {mib(sum(e['Anonymous'] for e in each) / clones)}",
        "ratio": f"{sum_pss / (clones * one['Rss']):.2f}",
        "clones_alive": f"{rebooted}/{clones}",
    })


# --- report ---------------------------------------------------------------------

def stat_ms(xs):
    return f"{statistics.median(xs) * 1000:.2f} ({min(xs) * 1000:.2f}–{max(xs) * 1000:.2f})"


def report(peers, sizes, runs, clones, share_size, settle, devices):
    for peer in peers:
        for key, xs in peer.samples.items():
            peer.cells.setdefault(key, stat_ms(xs))
    rows = []
    for s in sizes:
        rows += [
            (f"boot{s}", f"{s} MiB: boot over the API → {MILESTONE!r} (s)"),
            (f"create{s}", f"{s} MiB: PUT /snapshot/create, Full (ms, 1 sample)"),
            (f"files{s}", f"{s} MiB: state file KiB / memory file MiB allocated (of MiB)"),
            (f"load{s}", f"{s} MiB: PUT /snapshot/load sent → 204, resumed (ms, median (min–max) of {runs})"),
            (f"spawn{s}", f"{s} MiB: process spawn → load 204 (ms, median (min–max) of {runs})"),
            (f"alive{s}", f"{s} MiB: restored guest, Ctrl-Alt-Del → VMM exit (s)"),
        ]
    if share_size:
        pre = f"{share_size} MiB clones, ~{settle:g} s"
        rows += [
            ("one", f"{pre}: one clone alone, RSS / PSS (MiB)"),
            ("ten_x", f"{pre}: {clones} × RSS of the clone alone (MiB)"),
            ("sum_rss", f"{pre}: {clones} clones at once, summed RSS (MiB)"),
            ("sum_pss", f"{pre}: {clones} clones at once, summed PSS (MiB)"),
            ("anon", f"{pre}: anonymous memory (VMM heap + guest pages written), alone / mean of {clones} (MiB)"),
            ("ratio", f"{pre}: summed PSS / ({clones} × RSS alone)"),
            ("clones_alive", f"{pre}: clones that then rebooted on Ctrl-Alt-Del"),
        ]
    print(f"## Snapshot create / restore, Linux 1 vCPU, {devices}\n")
    print("| | " + " | ".join(q.name for q in peers) + " |")
    print("|---|" + "---|" * len(peers))
    for key, label in rows:
        print(f"| {label} | " + " | ".join(q.cells.get(key, "n/a (not measured)") for q in peers) + " |")
    print()
    for peer in peers:
        for i, note in enumerate(peer.notes, 1):
            print(f"- {peer.name} note {i}: {note}")
    if any(q.notes for q in peers):
        print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--vmm", default=VMM)
    ap.add_argument("--firecracker", default=DEFAULT_FC if os.path.exists(DEFAULT_FC) else None)
    ap.add_argument("--skip-fc", action="store_true")
    ap.add_argument("--sizes", default="128,1024", help="guest memory sizes in MiB, comma-separated")
    ap.add_argument("--clones", type=int, default=10)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds clones run before their memory is read")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a boot may take to reach the marker")
    ap.add_argument("--pci", action="store_true",
                    help="also each VMM with --enable-pci; every VM gets an entropy device and a drive")
    ap.add_argument("--keep-tmp", action="store_true")
    a = benchlib.parse_args(ap)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    if not os.path.exists(a.vmm):
        sys.exit(f"{a.vmm} does not exist: cargo build --release, or give --vmm")
    fc = None if a.skip_fc else a.firecracker
    if fc and not os.path.exists(fc):
        sys.exit(f"{fc} does not exist (or give --skip-fc)")

    def on_signal(sig, _frame):
        raise SystemExit(128 + sig)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    kernel = os.path.join(guest_kernel(), "vmlinux")
    initrd = subprocess.run(["bash", os.path.join(ROOT, "resources/build-initramfs.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cmdline = "console=ttyS0 reboot=k panic=-1 vmm.test=wait"
    if on_pvm():
        cmdline += " " + PVM_PARAMS

    tmp = tempfile.mkdtemp(prefix="bench-snapshot-", dir="/tmp")
    try:
        peers = [Peer("vmm", a.vmm, tmp)]
        if a.pci:
            peers.append(Peer("vmm --enable-pci", a.vmm, tmp, ["--enable-pci"]))
        if fc:
            peers.append(Peer("Firecracker", fc, tmp))
            if a.pci:
                peers.append(Peer("Firecracker --enable-pci", fc, tmp, ["--enable-pci"]))
        drive = None
        if a.pci:
            drive = os.path.join(tmp, "drive.img")
            with open(drive, "wb") as f:
                f.write(b"\x5a" * MIB)
        print(host_line())
        print(f"vmm: {a.vmm}; Firecracker: {fc or 'not run'}; kernel: {kernel}; initramfs: {initrd}")
        print(f"guest command line: {cmdline}\n")
        for s in sizes:
            for peer in peers:
                print(f"booting {peer.name}, {s} MiB ...", file=sys.stderr, flush=True)
                try:
                    boot_s, create_s, state_b, mem_alloc, mem_size = \
                        boot_and_snapshot(peer, s, kernel, initrd, cmdline, a.timeout, drive)
                except Exception as e:
                    peer.fail([f"boot{s}", f"create{s}", f"files{s}", f"load{s}", f"spawn{s}", f"alive{s}"], e)
                    continue
                peer.cells[f"boot{s}"] = f"{boot_s:.1f}"
                peer.cells[f"create{s}"] = f"{create_s * 1000:.1f}"
                peer.cells[f"files{s}"] = f"{state_b / 1024:.1f} / {mem_alloc / MIB:.1f} (of {mem_size / MIB:.0f})"
        for s in sizes:
            print(f"restoring {s} MiB x {a.runs} ...", file=sys.stderr, flush=True)
            restore_runs(peers, s, a.runs)
        share = min(sizes) if sizes and a.clones > 0 else None
        if share:
            for peer in peers:
                print(f"{peer.name}: {a.clones} clones of {share} MiB ...", file=sys.stderr, flush=True)
                if share in peer.snaps:
                    page_sharing(peer, share, a.clones, a.settle)
                else:
                    for key in SHARING_ROWS:
                        peer.cells[key] = f"n/a (no {share} MiB snapshot)"
        devices = "an entropy device and a read-only drive" if a.pci else "no devices"
        report(peers, sizes, a.runs, a.clones, share, a.settle, devices)
    finally:
        PROCS.kill_all()
        if a.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
