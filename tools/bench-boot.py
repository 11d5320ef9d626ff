#!/usr/bin/env python3
"""Boot-latency and memory-overhead benchmark: vmm against QEMU (-M microvm), the
same guests, in the same run.

1. Start latency, median of N runs: a PVH test guest (tests/guests/pvh.S) whose
   first instruction writes a byte to COM1. Measured from spawn to that byte on
   the VMM's stdout, and to the process exit. For vmm also the VMM's own trace
   of its first KVM_RUN (--log-level debug), from the start of main(); vmm
   runs with and without --enable-pci (the PCI segment's set-up: host
   bridge, ECAM, ACPI MCFG and DSDT entries).
2. Memory: the project's Linux kernel with 1 vCPU / 128 MiB, sampled when the
   console shows MILESTONE: VmRSS and VmHWM of the process, minus the resident
   part of the guest-RAM mapping (from /proc/PID/smaps) = VMM overhead.

Usage: tools/bench-boot.py [--runs 10] [--milestone TEXT] [--skip-linux]
Needs: cargo build --release; qemu-system-x86; resources/build-kernel.sh and
build-initramfs.sh (cached).
"""
import argparse, os, re, select, statistics, subprocess, sys, tempfile, time

import benchlib
from benchlib import ROOT, VMM, PVM_PARAMS, build_guest, guest_kernel, guest_ram_rss_kib, host_line, on_pvm, \
    qemu_cmd, status_kib, stop, wait_for


def time_to_first_byte(cmd):
    """Returns (seconds to first stdout byte, seconds to exit, stderr)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = None
    fd = p.stdout.fileno()
    while first is None:
        r, _, _ = select.select([fd], [], [], 10)
        if not r:
            p.kill()
            raise RuntimeError(f"no output from {cmd[0]}")
        if os.read(fd, 1):
            first = time.monotonic() - t0
        else:
            break
    p.stdout.read()
    err = p.stderr.read().decode(errors="replace")
    p.wait()
    return first, time.monotonic() - t0, err


def median_ms(xs):
    return statistics.median(xs) * 1000


def bench_start(runs, tmp):
    elf = build_guest("pvh", tmp)
    variants = [("vmm", []), ("vmm --enable-pci", ["--enable-pci"])]
    first = {name: [] for name, _ in variants}
    exits = {name: [] for name, _ in variants}
    kvm_run = {name: [] for name, _ in variants}
    q_first, q_exit = [], []
    for _ in range(runs):
        for name, extra in variants:
            f, e, err = time_to_first_byte([VMM, "--kernel", elf, "--memory", "128M", "--log-level", "debug"] + extra)
            first[name].append(f)
            exits[name].append(e)
            m = re.search(r"first KVM_RUN (\d+) us after VMM start", err)
            if m:
                kvm_run[name].append(int(m.group(1)) / 1e6)
        f, e, _ = time_to_first_byte(qemu_cmd(elf, 128, ["-device", "isa-debug-exit,iobase=0xf4,iosize=1"]))
        q_first.append(f)
        q_exit.append(e)
    print(f"## Start latency, PVH test guest, median of {runs} (ms)\n")
    print("| | vmm | vmm --enable-pci | QEMU microvm | QEMU / vmm |\n|---|---|---|---|---|")
    v, p = first["vmm"], first["vmm --enable-pci"]
    print(f"| spawn → first guest byte on the console | {median_ms(v):.2f} | {median_ms(p):.2f} | "
          f"{median_ms(q_first):.2f} | {median_ms(q_first) / median_ms(v):.1f}x |")
    v, p = exits["vmm"], exits["vmm --enable-pci"]
    print(f"| spawn → process exit | {median_ms(v):.2f} | {median_ms(p):.2f} | {median_ms(q_exit):.2f} | "
          f"{median_ms(q_exit) / median_ms(v):.1f}x |")
    v, p = kvm_run["vmm"], kvm_run["vmm --enable-pci"]
    if v and p:
        print(f"| main() → first KVM_RUN (vmm's own trace) | {median_ms(v):.2f} | {median_ms(p):.2f} | | |")
    print()


def sample_memory(cmd, milestone, timeout):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for(p, milestone, timeout)
        time.sleep(0.5)
        rss, hwm = status_kib(p.pid, "VmRSS"), status_kib(p.pid, "VmHWM")
        guest = guest_ram_rss_kib(p.pid, 128 * 1024)
        return rss, hwm, guest
    finally:
        stop(p)


def bench_memory(milestone, timeout):
    kdir = guest_kernel()
    initrd = subprocess.run(["bash", os.path.join(ROOT, "resources/build-initramfs.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cmdline = "console=ttyS0 reboot=k panic=-1"
    if on_pvm():
        cmdline += " " + PVM_PARAMS
    kernel = os.path.join(kdir, "vmlinux")
    rows = []
    for name, cmd in [
        ("vmm", [VMM, "--kernel", kernel, "--initrd", initrd, "--memory", "128M", "--cmdline", cmdline]),
        ("QEMU microvm", qemu_cmd(kernel, 128, initrd=initrd, cmdline=cmdline)),
    ]:
        rss, hwm, guest = sample_memory(cmd, milestone, timeout)
        rows.append((name, rss, hwm, guest))
    print(f"## Memory, Linux guest, 1 vCPU / 128 MiB, sampled at {milestone!r} (KiB)\n")
    print("| | VmRSS | VmHWM (peak) | guest RAM resident | overhead (RSS − guest) | peak overhead (HWM − guest) |")
    print("|---|---|---|---|---|---|")
    for name, rss, hwm, guest in rows:
        print(f"| {name} | {rss} | {hwm} | {guest} | {rss - guest} | {hwm - guest} |")
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--milestone", default="VMM-TEST: userspace up")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--skip-linux", action="store_true")
    a = benchlib.parse_args(ap)
    if not os.path.exists(VMM):
        sys.exit("build first: cargo build --release")
    print(host_line() + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        bench_start(a.runs, tmp)
    if not a.skip_linux:
        bench_memory(a.milestone, a.timeout)


if __name__ == "__main__":
    main()
