#!/usr/bin/env python3
"""virtio-blk benchmark with the project's test guest (tests/guests/blk_bench.S):
20000 random 4 KiB reads over a 64 MiB image, then sequential 64 KiB reads of
all of it, driven by a polling virtio-mmio driver in the guest.

Reports per run and as the median of RUNS: random reads/s, sequential MB/s, and
the CPU time the VMM's own threads (everything but the vCPU threads) spent per
request, from /proc/PID/task/TID/schedstat (nanoseconds). The image is written
once before the runs, so reads come from the host page cache: this measures the
VMM's request path, not the disk.

Usage: tools/bench-blk.py [--runs 5]   (after cargo build --release)
"""
import argparse, os, select, statistics, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target/release/vmm")
RANDOM_READS = 20000
IMAGE_MIB = 64


def build_guest(tmp):
    src = os.path.join(ROOT, "tests/guests/blk_bench.S")
    obj, elf = os.path.join(tmp, "b.o"), os.path.join(tmp, "b.elf")
    subprocess.run(["as", "--64", "-I", os.path.join(ROOT, "tests/guests"), "-o", obj, src], check=True)
    subprocess.run(["ld", "-nostdlib", "--no-warn-rwx-segments", "-Ttext=0x200000", "-e", "_start",
                    "-o", elf, obj], check=True)
    return elf


def vmm_cpu_ns(pid):
    """CPU time of the VMM's threads other than vCPUs, in ns."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith("vcpu"):
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total


def run_once(elf, image):
    p = subprocess.Popen([VMM, "--kernel", elf, "--disk", f"path={image},readonly=on"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    marks = {}
    buf = b""
    fd = p.stdout.fileno()
    deadline = time.monotonic() + 300
    try:
        while b"sequential done" not in buf:
            if time.monotonic() > deadline:
                raise RuntimeError("benchmark guest did not finish")
            r, _, _ = select.select([fd], [], [], 1)
            if not r:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"vmm exited early: {buf!r}")
            buf += chunk
            now, cpu = time.monotonic(), vmm_cpu_ns(p.pid)
            for key in (b"bench start", b"random done", b"sequential done"):
                if key in buf and key not in marks:
                    marks[key] = (now, cpu)
            if b"request failed" in buf:
                raise RuntimeError("a request failed in the guest")
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
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        elf = build_guest(tmp)
        image = os.path.join(tmp, "bench.img")
        with open(image, "wb") as f:
            f.write(os.urandom(IMAGE_MIB << 20))
        runs = [run_once(elf, image) for _ in range(a.runs)]
    host = "PVM (software KVM)" if os.path.isdir("/sys/module/kvm_pvm") else "hardware KVM"
    print(f"host: {host}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, median of {a.runs} runs\n")
    print("| | 4 KiB random reads | 64 KiB sequential reads |\n|---|---|---|")
    med = lambda k: statistics.median(r[k] for r in runs)
    print(f"| throughput | {med('random_iops'):.0f} IOPS | {med('seq_mbps'):.0f} MB/s |")
    print(f"| VMM CPU per request (non-vCPU threads) | {med('random_cpu_us'):.1f} µs | {med('seq_cpu_us'):.1f} µs |")


if __name__ == "__main__":
    main()
