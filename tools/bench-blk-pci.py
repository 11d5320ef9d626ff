#!/usr/bin/env python3
"""virtio-blk over virtio-mmio against virtio-pci (`--enable-pci`), vmm beside
Firecracker, with the project's Linux guest (kernel and busybox initramfs):
each run boots a fresh VM with a 64 MiB read-only drive, waits for its shell,
then has the guest read 16 MiB of the drive in 4 KiB O_DIRECT requests (one in
flight: `dd iflag=direct`), and times it from the typed command to its end
marker. Reported, median of RUNS per configuration: 4 KiB reads per second and
the CPU time of the VMM's own threads (all but the vCPU threads, from
/proc/PID/task/TID/schedstat) per request. On a PVM host each guest system
call costs a fault round trip, so the guest's side dominates the rate; the
VMM's CPU per request is the figure that does not depend on the host.

With --tracking the configurations are instead virtio-mmio with dirty-page
tracking off and on (`track_dirty_pages` in the machine configuration: KVM's
dirty log, and the VMM marking the pages its reads fill), for vmm and, with
--firecracker, Firecracker, each from the same configuration file.

Usage: tools/bench-blk-pci.py [--runs 3] [--firecracker PATH] [--tracking]   (after cargo build --release)
"""
import argparse, json, os, statistics, subprocess, tempfile, time

import benchlib
from benchlib import VMM, PVM_PARAMS, cpu_ns, host_line, on_pvm, stop, wait_for

ROOT = benchlib.ROOT
IMAGE_MIB = 64
READS = 4096  # 16 MiB in 4 KiB requests


def initramfs():
    out = subprocess.run(["bash", os.path.join(ROOT, "resources/build-initramfs.sh")], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def cmdline():
    base = "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd"
    return f"{base} {PVM_PARAMS}" if on_pvm() else base


def firecracker_cmd(fc, tmp, name, kernel, initrd, image, pci, track=False):
    cfg = {
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd, "boot_args": cmdline()},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256, "track_dirty_pages": track},
        "drives": [{"drive_id": "bench", "path_on_host": image, "is_root_device": False,
                    "is_read_only": True}],
    }
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    cmd = [fc, "--no-api", "--config-file", path, "--level", "Error"]
    return cmd + (["--enable-pci"] if pci else [])


def run_once(cmd):
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(p, "VMM-TEST: shell", 600)
        time.sleep(1)
        c0, t0 = cpu_ns(p.pid), time.monotonic()
        p.stdin.write(f"dd if=/dev/vda of=/dev/null bs=4096 count={READS} iflag=direct "
                      f"2>/dev/null; echo BENCH-$((6*7))\n".encode())
        p.stdin.flush()
        wait_for(p, "BENCH-42", 600)
        t1, c1 = time.monotonic(), cpu_ns(p.pid)
    finally:
        stop(p)
    return {"iops": READS / (t1 - t0), "cpu_us": (c1 - c0) / READS / 1000}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--firecracker", help="Firecracker binary to measure beside vmm")
    ap.add_argument("--tracking", action="store_true",
                    help="compare dirty-page tracking off and on instead of the transports")
    a = benchlib.parse_args(ap)
    kernel = os.path.join(benchlib.guest_kernel(), "vmlinux")
    initrd = initramfs()
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "bench.img")
        with open(image, "wb") as f:
            f.write(os.urandom(IMAGE_MIB << 20))
        base = [VMM, "--kernel", kernel, "--initrd", initrd, "--memory", "256M",
                "--disk", f"path={image},readonly=on", "--cmdline", cmdline()]
        cmds = {"vmm virtio-mmio": base, "vmm virtio-pci": base + ["--enable-pci"]}
        if a.tracking:
            peers = [("vmm", VMM)] + ([("Firecracker", a.firecracker)] if a.firecracker else [])
            cmds = {}
            for peer, binary in peers:
                for track in (False, True):
                    name = f"{peer}, tracking {'on' if track else 'off'}"
                    cmds[name] = firecracker_cmd(binary, tmp, f"{peer}-{track}", kernel, initrd,
                                                 image, False, track)
        elif a.firecracker:
            for name, pci in (("Firecracker virtio-mmio", False), ("Firecracker virtio-pci", True)):
                cmds[name] = firecracker_cmd(a.firecracker, tmp, name.split()[1], kernel, initrd,
                                             image, pci)
        results = {name: [] for name in cmds}
        for _ in range(a.runs):  # interleaved: every configuration sees the same machine
            for name, cmd in cmds.items():
                results[name].append(run_once(cmd))
    print(f"{host_line()}, median of {a.runs} runs each, {READS} reads of 4 KiB (O_DIRECT)\n")
    print("| | 4 KiB reads/s | VMM CPU per request (non-vCPU threads) |\n|---|---|---|")
    for name, rs in results.items():
        iops = statistics.median(r["iops"] for r in rs)
        cpu = statistics.median(r["cpu_us"] for r in rs)
        print(f"| {name} | {iops:.0f} | {cpu:.1f} µs |")


if __name__ == "__main__":
    main()
