#!/usr/bin/env python3
"""Diff snapshots against Full, vmm beside Firecracker, in one run.

Guest: tests/guests/dirty_bench.S (1 vCPU, 1 GiB, track_dirty_pages on), which
dirties B * 8 MiB of its memory for each byte B typed on its console. Each VMM
boots its own guest over the API and, after a first Full snapshot (which starts
the dirty-page tracking afresh), for each size N (--sizes, MiB): resumes, has
the guest dirty N MiB, pauses, and times PUT /snapshot/create with a Diff, then
with a Full of the same state (which starts the tracking afresh again). Shown:
the create time (from the request to the 204) and the memory file as allocated
on disk (st_blocks), one sample per cell, --runs times (median shown).

Usage: tools/bench-diff.py [--runs 3] [--sizes 8,64,512] [--vmm PATH] [--firecracker PATH] [--skip-fc]
Needs: cargo build --release (or --vmm), GNU as and ld.
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time

import benchlib
from benchlib import ROOT, VMM, build_guest, host_line, stop, wait_for

DEFAULT_FC = os.path.normpath(os.path.join(ROOT, "..", "shared", "peers", "firecracker"))
MIB = 1024 * 1024
MEM_MIB = 1024


def call(sock, method, path, body=None):
    # A Full snapshot of 1 GiB may take seconds: a longer timeout than the default.
    return benchlib.call(sock, method, path, body, timeout=120)


def allocated_mib(path):
    return os.stat(path).st_blocks * 512 / MIB


def snapshot(sock, kind, d, name):
    snap, mem = os.path.join(d, f"{name}.snap"), os.path.join(d, f"{name}.mem")
    t = time.monotonic()
    call(sock, "PUT", "/snapshot/create",
         {"snapshot_type": kind, "snapshot_path": snap, "mem_file_path": mem})
    ms = (time.monotonic() - t) * 1000
    size = allocated_mib(mem)
    os.remove(snap)
    os.remove(mem)
    return ms, size


def run_vmm(binary, elf, sizes, d):
    """One boot: {size: (diff_ms, diff_mib, full_ms, full_mib)}."""
    sock = os.path.join(d, "api.sock")
    p = subprocess.Popen([binary, "--api-sock", sock, "--level", "Error"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError("no API socket")
            time.sleep(0.01)
        call(sock, "PUT", "/boot-source", {"kernel_image_path": elf, "boot_args": "console=ttyS0"})
        call(sock, "PUT", "/machine-config",
             {"vcpu_count": 1, "mem_size_mib": MEM_MIB, "track_dirty_pages": True})
        call(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        wait_for(p, "VMM-GUEST: ready", 60)
        call(sock, "PATCH", "/vm", {"state": "Paused"})
        snapshot(sock, "Full", d, "base")
        out = {}
        for n in sizes:
            call(sock, "PATCH", "/vm", {"state": "Resumed"})
            p.stdin.write(bytes([n // 8]))
            p.stdin.flush()
            wait_for(p, "VMM-GUEST: dirtied", 300)
            call(sock, "PATCH", "/vm", {"state": "Paused"})
            diff = snapshot(sock, "Diff", d, f"diff-{n}")
            full = snapshot(sock, "Full", d, f"full-{n}")
            out[n] = diff + full
        return out
    finally:
        stop(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="8,64,512")
    ap.add_argument("--vmm", default=VMM)
    ap.add_argument("--firecracker", default=DEFAULT_FC)
    ap.add_argument("--skip-fc", action="store_true")
    args = benchlib.parse_args(ap)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s % 8 or not 8 <= s <= 2040 for s in sizes):
        sys.exit("bench-diff: each size is a multiple of 8 MiB from 8 to 2040")
    peers = [("vmm", args.vmm)]
    if not args.skip_fc:
        peers.append(("Firecracker", args.firecracker))
    tmp = tempfile.mkdtemp(prefix="bench-diff-")
    try:
        elf = build_guest("dirty_bench", tmp)
        results = {name: {n: [] for n in sizes} for name, _ in peers}
        for _ in range(args.runs):
            for name, binary in peers:
                d = tempfile.mkdtemp(dir=tmp)
                for n, r in run_vmm(binary, elf, sizes, d).items():
                    results[name][n].append(r)
                shutil.rmtree(d)
        print(host_line())
        print(f"Guest {MEM_MIB} MiB, track_dirty_pages on, {args.runs} runs (median); "
              "create time ms / memory file allocated MiB\n")
        head = "| dirtied |"
        for name, _ in peers:
            head += f" {name} Diff | {name} Full |"
        print(head)
        print("|---" * (1 + 2 * len(peers)) + "|")
        for n in sizes:
            row = f"| {n} MiB |"
            for name, _ in peers:
                rs = results[name][n]
                med = [statistics.median(r[i] for r in rs) for i in range(4)]
                row += f" {med[0]:.1f} ms, {med[1]:.1f} MiB | {med[2]:.1f} ms, {med[3]:.1f} MiB |"
            print(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
