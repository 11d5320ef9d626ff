#!/usr/bin/env python3
"""vsock throughput and the VMM's CPU per MB, through the guest agent.

Uses the snapshot `vmm run` caches (run `vmm run -- true` once first, with
the same vmm binary): each measurement restores a clone with its vsock socket,
connects to the agent (CONNECT 52) and runs one command through the agent's
protocol (docs/AGENT.md):
- host -> guest: N bytes to `wc -c` (stdin frames);
- guest -> host: `head -c N /dev/zero` (stdout frames);
- both ways: N bytes through `cat`.
MB/s is N (each way) over the time from EXEC to EXIT; the VMM's CPU is that
of its non-vCPU threads (the event loop, where vsock packets are moved), per
MB moved across the device.

Usage: tools/bench-vsock.py [--mib 1] [--vmm PATH]
"""
import argparse, glob, json, os, struct, sys, tempfile, threading, time

import benchlib
from benchlib import ROOT, cpu_ns, host_line, restore_clone

VMM = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/vmm")
EXEC, STDIN = 0x01, 0x02
STDOUT, EXIT = 0x82, 0x84


def frame(kind, payload=b""):
    return struct.pack("<IB", len(payload), kind) + payload


def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        c = s.recv(n - len(buf))
        if not c:
            sys.exit("the agent closed the connection")
        buf += c
    return buf


def measure(vmm, snap, tmp, argv, stdin_bytes):
    p, s = restore_clone(vmm, snap, os.path.join(tmp, "v.sock"))
    try:
        req = {"argv": argv, "env": [], "stdin": stdin_bytes > 0}
        cpu0, t0 = cpu_ns(p.pid), time.perf_counter()
        s.sendall(frame(EXEC, json.dumps(req).encode()))
        def feed():
            left = stdin_bytes
            chunk = b"\x5a" * 65536
            while left > 0:
                n = min(left, len(chunk))
                s.sendall(frame(STDIN, chunk[:n]))
                left -= n
            if stdin_bytes:
                s.sendall(frame(STDIN))
        feeder = threading.Thread(target=feed)
        feeder.start()
        out = 0
        while True:
            length, kind = struct.unpack("<IB", read_exact(s, 5))
            payload = read_exact(s, length)
            if kind == STDOUT:
                out += length
            elif kind == EXIT:
                break
        secs = time.perf_counter() - t0
        cpu = (cpu_ns(p.pid) - cpu0) / 1e9
        feeder.join()
        return secs, cpu, out
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=1.0)
    ap.add_argument("--vmm", default=VMM)
    a = benchlib.parse_args(ap)
    cache = os.environ.get("VMM_CACHE_DIR", os.path.expanduser("~/.cache/vmm"))
    snaps = sorted(glob.glob(os.path.join(cache, "run-*")), key=os.path.getmtime)
    if not snaps:
        sys.exit("no cached guest: run `vmm run -- true` once with this vmm first")
    snap = snaps[-1]
    n = int(a.mib * (1 << 20))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv, stdin, moved in [
            ("host -> guest (wc -c)", ["wc", "-c"], n, n),
            ("guest -> host (head -c N /dev/zero)", ["head", "-c", str(n), "/dev/zero"], 0, n),
            ("both ways (cat)", ["cat"], n, 2 * n),
        ]:
            secs, cpu, out = measure(a.vmm, snap, tmp, argv, stdin)
            rows.append((name, n / secs / (1 << 20), cpu * 1000 / (moved / (1 << 20))))
    print(host_line())
    print(f"vmm: {a.vmm}; guest: {snap}; {a.mib} MiB each way\n")
    print("| direction | MiB/s (each way) | VMM CPU, non-vCPU threads (ms per MiB moved) |")
    print("|---|---|---|")
    for name, mbs, cpu_per_mb in rows:
        print(f"| {name} | {mbs:.2f} | {cpu_per_mb:.1f} |")


if __name__ == "__main__":
    main()
