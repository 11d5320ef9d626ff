#!/usr/bin/env python3
"""The price of containment: start latency and memory of vmm with its seccomp
filters, without them, and started through vmm-jailer; beside Firecracker,
plain and through its jailer, in the same run.

Guest: tests/guests/halt.S (prints one line on COM1, then halts), 1 vCPU,
128 MiB, no API socket (--kernel for vmm, --no-api --config-file for
Firecracker).
1. spawn -> first console byte, median (min-max) of N runs;
2. VmRSS of the VMM process once the guest halted (median of N), and for
   vmm its own trace of main() -> first KVM_RUN (--level Debug).
Through a jailer the spawned process is the jailer, which execs the VMM in its
chroot (not daemonized: the console stays on our pipe); the jail is built anew
for each run (chroot base under a temporary directory) and removed after.

Usage: tools/bench-jail.py [--runs 20] [--firecracker PATH] [--fc-jailer PATH]
Needs: cargo build --release --workspace (vmm and vmm-jailer); root.
"""
import argparse, json, os, re, select, shutil, statistics, subprocess, sys, tempfile, time

import benchlib
from benchlib import ROOT, VMM, build_guest, host_line, status_kib

JAILER = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/vmm-jailer")
PEERS = os.path.join(ROOT, "..", "shared", "peers")


def first_line(p, timeout=10):
    """Seconds until the first stdout byte (from p's spawn, passed as t0)."""
    fd = p.stdout.fileno()
    r, _, _ = select.select([fd], [], [], timeout)
    if not r or not os.read(fd, 1):
        raise RuntimeError("no console output")


def vmm_pid(p, exe_name):
    """The VMM's pid: p itself, or (through a jailer) the child it became."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{p.pid}/comm") as f:
                if f.read().strip().startswith(exe_name[:15]):
                    return p.pid
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    return p.pid


def one(cmd, exe_name, cwd=None):
    """(ms to first byte, VmRSS KiB after the guest halted, stderr text)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=cwd)
    try:
        first_line(p)
        dt = (time.monotonic() - t0) * 1000
        time.sleep(0.3)
        rss = status_kib(vmm_pid(p, exe_name), "VmRSS")
    finally:
        p.kill()
        p.wait()
    return dt, rss, p.stderr.read().decode(errors="replace")


def fc_config(path, kernel):
    with open(path, "w") as f:
        json.dump({"boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
                   "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}, "drives": []}, f)


def jailed(jailer, exe, base, jail_id, kernel, vmm_args):
    """The jailer command for `exe`, with the kernel copied into the jail."""
    name = os.path.basename(exe)
    root = os.path.join(base, name, jail_id, "root")
    os.makedirs(root, exist_ok=True)
    shutil.copy(kernel, os.path.join(root, "kernel.elf"))
    return [jailer, "--id", jail_id, "--exec-file", exe, "--uid", "0", "--gid", "0",
            "--chroot-base-dir", base, "--", *vmm_args]


def stats(xs):
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    fc = os.path.join(PEERS, "firecracker")
    fcj = os.path.join(PEERS, "jailer")
    ap.add_argument("--firecracker", default=fc if os.path.exists(fc) else None)
    ap.add_argument("--fc-jailer", default=fcj if os.path.exists(fcj) else None)
    a = benchlib.parse_args(ap)
    for b in (VMM, JAILER):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: cargo build --release --workspace")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        elf = build_guest("halt", tmp)
        cfg = os.path.join(tmp, "fc.json")
        fc_config(cfg, elf)
        jail_cfg = os.path.join(tmp, "fc-jail.json")
        fc_config(jail_cfg, "kernel.elf")
        kinds = {
            "vmm (seccomp on, the default)": lambda i: ([VMM, "--kernel", elf, "--level", "Debug"], "vmm"),
            "vmm --no-seccomp": lambda i: ([VMM, "--kernel", elf, "--no-seccomp", "--level", "Debug"], "vmm"),
            "vmm through vmm-jailer": lambda i: (
                jailed(JAILER, VMM, os.path.join(tmp, "jail"), f"bench-{i}", elf,
                       ["--kernel", "kernel.elf", "--level", "Debug"]), "vmm"),
        }
        if a.firecracker:
            # A copy whose name its jailer accepts.
            fc_bin = os.path.join(tmp, "firecracker")
            shutil.copy(a.firecracker, fc_bin)
            kinds["Firecracker 1.16 (gnu build: no seccomp filter)"] = lambda i: (
                [fc_bin, "--no-api", "--config-file", cfg, "--level", "Error"], "firecracker")
            if a.fc_jailer:
                def fc_jailed(i):
                    base = os.path.join(tmp, "fcjail")
                    cmd = jailed(a.fc_jailer, fc_bin, base, f"bench-{i}", elf,
                                 ["--no-api", "--config-file", "fc.json", "--level", "Error"])
                    shutil.copy(jail_cfg, os.path.join(base, "firecracker", f"bench-{i}", "root", "fc.json"))
                    return cmd, "firecracker"
                kinds["Firecracker through its jailer"] = fc_jailed
        for i in range(a.runs):
            for label, make in kinds.items():
                cmd, exe = make(i)
                dt, rss, err = one(cmd, exe)
                r = rows.setdefault(label, {"first": [], "rss": [], "kvm_run": []})
                r["first"].append(dt)
                r["rss"].append(rss)
                m = re.search(r"first KVM_RUN (\d+) us after VMM start", err)
                if m:
                    r["kvm_run"].append(int(m.group(1)) / 1000)
            for d in ("jail", "fcjail"):
                shutil.rmtree(os.path.join(tmp, d), ignore_errors=True)
    print(host_line())
    print(f"halt test guest, 1 vCPU, 128 MiB; median (min-max) of {a.runs}\n")
    print("| | spawn → first console byte (ms) | main() → first KVM_RUN (ms) | VmRSS, guest halted (KiB) |")
    print("|---|---|---|---|")
    for label, r in rows.items():
        kvm = stats(r["kvm_run"]) if r["kvm_run"] else ""
        print(f"| {label} | {stats(r['first'])} | {kvm} | {statistics.median(r['rss']):.0f} |")


if __name__ == "__main__":
    main()
