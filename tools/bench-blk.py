#!/usr/bin/env python3
"""virtio-blk benchmark, vmm against QEMU (-M microvm, virtio-blk-device), the
same guest in the same run: tests/guests/pvh_blk_bench.S, a PVH guest with a
polling virtio-mmio driver that finds its device on the kernel command line. It
does 20000 random 4 KiB reads over a 64 MiB image, then reads all of it in
sequential 64 KiB requests (one request in flight, queue of 8).

Reports the median of RUNS for each VMM: random reads/s, sequential MB/s, and the
CPU time the VMM's own threads (all but its vCPU threads) spent per request, from
/proc/PID/task/TID/schedstat (nanoseconds). The image is written once before the
runs, so reads come from the host page cache: this measures the VMM's request
path, not the disk. QEMU runs with its defaults for a raw image (cache=writeback,
aio=threads), the modern virtio-mmio interface, and acpi=off so that it puts the
device on the command line.

Usage: tools/bench-blk.py [--runs 5]   (after cargo build --release)
"""
import argparse, os, select, statistics, subprocess, tempfile, time

import benchlib
from benchlib import build_guest, cpu_ns, host_line, qemu_cmd, VMM

RANDOM_READS = 20000
IMAGE_MIB = 64


def run_once(cmd):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    marks, buf = {}, b""
    fd = p.stdout.fileno()
    deadline = time.monotonic() + 300
    try:
        while b"sequential done" not in buf:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]}: benchmark guest did not finish")
            r, _, _ = select.select([fd], [], [], 1)
            if not r:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{cmd[0]} exited early: {buf!r}")
            buf += chunk
            now, cpu = time.monotonic(), cpu_ns(p.pid)
            for key in (b"bench start", b"random done", b"sequential done"):
                if key in buf and key not in marks:
                    marks[key] = (now, cpu)
            if b"request failed" in buf:
                raise RuntimeError(f"{cmd[0]}: a request failed in the guest: {buf!r}")
    finally:
        p.kill()
        p.wait()
    (t0, c0), (t1, c1), (t2, c2) = marks[b"bench start"], marks[b"random done"], marks[b"sequential done"]
    seq_requests = IMAGE_MIB * 1024 // 64
    return {
        "random_iops": RANDOM_READS / (t1 - t0),
        "random_cpu_us": (c1 - c0) / RANDOM_READS / 1000,
        "seq_mbps": IMAGE_MIB * 1048576 / (t2 - t1) / 1e6,
        "seq_cpu_us": (c2 - c1) / seq_requests / 1000,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = benchlib.parse_args(ap)
    with tempfile.TemporaryDirectory() as tmp:
        elf = build_guest("pvh_blk_bench", tmp)
        image = os.path.join(tmp, "bench.img")
        with open(image, "wb") as f:
            f.write(os.urandom(IMAGE_MIB << 20))
        cmds = {
            "vmm": [VMM, "--kernel", elf, "--memory", "128M", "--disk", f"path={image},readonly=on"],
            "QEMU microvm": qemu_cmd(elf, 128, machine="microvm,acpi=off", cmdline="console=ttyS0", extra=[
                "-global", "virtio-mmio.force-legacy=false",
                "-drive", f"id=d0,file={image},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=d0"]),
        }
        results = {name: [] for name in cmds}
        for _ in range(a.runs):  # interleaved, so both see the same machine state
            for name, cmd in cmds.items():
                results[name].append(run_once(cmd))
    print(f"{host_line()}, median of {a.runs} runs each\n")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    v, q = med["vmm"], med["QEMU microvm"]
    print("| | vmm | QEMU microvm | vmm / QEMU |\n|---|---|---|---|")
    print(f"| 4 KiB random reads | {v['random_iops']:.0f} IOPS | {q['random_iops']:.0f} IOPS | "
          f"{v['random_iops'] / q['random_iops']:.2f}x |")
    print(f"| 64 KiB sequential reads | {v['seq_mbps']:.0f} MB/s | {q['seq_mbps']:.0f} MB/s | "
          f"{v['seq_mbps'] / q['seq_mbps']:.2f}x |")
    print(f"| VMM CPU per 4 KiB request (non-vCPU threads) | {v['random_cpu_us']:.1f} µs | "
          f"{q['random_cpu_us']:.1f} µs | {v['random_cpu_us'] / q['random_cpu_us']:.2f}x |")
    print(f"| VMM CPU per 64 KiB request (non-vCPU threads) | {v['seq_cpu_us']:.1f} µs | "
          f"{q['seq_cpu_us']:.1f} µs | {v['seq_cpu_us'] / q['seq_cpu_us']:.2f}x |")


if __name__ == "__main__":
    main()
