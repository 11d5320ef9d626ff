#!/usr/bin/env python3
"""Control-plane benchmark: vmm's Firecracker-compatible API against Firecracker
itself (and against vmm's previous commit, which had no API), in one run.

1. Process start -> the API socket accepts a connection and answers
   GET /machine-config, median of N (firecracker-go-sdk polls that every 10 ms).
2. InstanceStart -> first guest byte on the console, median of N: a PVH test
   guest (tests/guests/pvh.S) whose first instruction writes to COM1, configured
   over the API (boot-source, machine-config), then PUT /actions InstanceStart;
   the clock starts when the request is sent. The previous commit's closest
   figure is spawn -> first byte with --kernel (no API), shown beside it, and
   the same for the current vmm.
3. VMM memory overhead with the API thread: the project's Linux kernel and
   initramfs (1 vCPU, 128 MiB) booted over the API to MILESTONE; VmRSS minus
   the resident guest RAM. Beside it: the current vmm and the previous commit
   booted from flags (no API thread), and Firecracker over its API.

Usage: tools/bench-api.py [--runs 20] [--firecracker PATH] [--previous PATH] [--skip-linux]
Needs: cargo build --release; curl not needed (Python's http.client over AF_UNIX).
"""
import argparse, json, os, select, statistics, subprocess, sys, tempfile, time

import benchlib
from benchlib import ROOT, VMM, PVM_PARAMS, build_guest, guest_kernel, guest_ram_rss_kib, host_line, on_pvm, \
    status_kib, stop, wait_for, UnixHTTP

DEFAULT_FC = os.path.join(ROOT, "..", "shared", "peers", "firecracker")


def call(sock_path, method, path, body=None):
    c = UnixHTTP(sock_path)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {data!r}")
    return data


def spawn_api(binary, sock, extra=()):
    # Error level: Firecracker logs to stdout, where the console is measured.
    return subprocess.Popen([binary, "--api-sock", sock, "--level", "Error", *extra], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def time_to_api(binary, tmp):
    """Seconds from spawn until GET /machine-config is answered."""
    sock = os.path.join(tmp, "ready.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    t0 = time.monotonic()
    p = spawn_api(binary, sock)
    try:
        while True:
            try:
                call(sock, "GET", "/machine-config")
                return time.monotonic() - t0
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() - t0 > 10:
                    raise RuntimeError(f"{binary}: no API after 10 s")
                time.sleep(0.0002)
    finally:
        p.kill()
        p.wait()


def wait_socket(sock, timeout=10):
    """Until the API answers (Firecracker's socket file appears before it
    listens: a connect right then is refused)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call(sock, "GET", "/machine-config")
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no API on {sock}")
            time.sleep(0.0005)


def first_byte(p, t0, timeout=10):
    fd = p.stdout.fileno()
    r, _, _ = select.select([fd], [], [], timeout)
    if not r or not os.read(fd, 1):
        raise RuntimeError("no console output")
    return time.monotonic() - t0


def instance_start_to_first_byte(binary, elf, tmp):
    sock = os.path.join(tmp, "start.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    p = spawn_api(binary, sock)
    try:
        wait_socket(sock)
        call(sock, "PUT", "/boot-source", {"kernel_image_path": elf, "boot_args": "console=ttyS0"})
        call(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        t0 = time.monotonic()
        c = UnixHTTP(sock)
        c.request("PUT", "/actions", body=json.dumps({"action_type": "InstanceStart"}),
                  headers={"Content-Type": "application/json"})
        return first_byte(p, t0)
    finally:
        p.kill()
        p.wait()


def spawn_to_first_byte(binary, elf):
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "--kernel", elf, "--memory", "128M"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        return first_byte(p, t0)
    finally:
        p.kill()
        p.wait()


def ms(xs):
    return f"{statistics.median(xs) * 1000:.2f}" if xs else "n/a"


def bench_control(runs, fc, prev, tmp):
    elf = build_guest("pvh", tmp)
    rows = {k: [] for k in ["vmm_api", "fc_api", "vmm_start", "fc_start", "vmm_cli", "prev_cli"]}
    for _ in range(runs):
        rows["vmm_api"].append(time_to_api(VMM, tmp))
        rows["vmm_start"].append(instance_start_to_first_byte(VMM, elf, tmp))
        rows["vmm_cli"].append(spawn_to_first_byte(VMM, elf))
        if fc:
            rows["fc_api"].append(time_to_api(fc, tmp))
            rows["fc_start"].append(instance_start_to_first_byte(fc, elf, tmp))
        if prev:
            rows["prev_cli"].append(spawn_to_first_byte(prev, elf))
    print(f"## Control plane, PVH test guest, median of {runs} (ms)\n")
    print("| | vmm | previous commit | Firecracker |\n|---|---|---|---|")
    print(f"| process start → API answers GET /machine-config | {ms(rows['vmm_api'])} | no API | {ms(rows['fc_api'])} |")
    print(f"| InstanceStart sent → first guest byte | {ms(rows['vmm_start'])} | no API | {ms(rows['fc_start'])} |")
    print(f"| spawn with --kernel → first guest byte (no API) | {ms(rows['vmm_cli'])} | {ms(rows['prev_cli'])} | |")
    print()


def linux_memory(label, cmd, configure, milestone, timeout):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if configure:
            configure()
        wait_for(p, milestone, timeout)
        time.sleep(0.5)
        rss = status_kib(p.pid, "VmRSS")
        guest = guest_ram_rss_kib(p.pid, 128 * 1024)
        threads = len(os.listdir(f"/proc/{p.pid}/task"))
        return (label, rss, guest, threads)
    finally:
        stop(p)


def bench_memory(fc, prev, milestone, timeout, tmp):
    kernel = os.path.join(guest_kernel(), "vmlinux")
    initrd = subprocess.run(["bash", os.path.join(ROOT, "resources/build-initramfs.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cmdline = "console=ttyS0 reboot=k panic=-1 vmm.test=wait"
    if on_pvm():
        cmdline += " " + PVM_PARAMS
    sock = os.path.join(tmp, "mem.sock")

    def over_api():
        if os.path.exists(sock):
            os.unlink(sock)

        def configure():
            wait_socket(sock)
            call(sock, "PUT", "/boot-source",
                 {"kernel_image_path": kernel, "initrd_path": initrd, "boot_args": cmdline})
            call(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
            call(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        return configure

    rows = []
    rows.append(linux_memory("vmm, API", [VMM, "--api-sock", sock, "--level", "Error"], over_api(), milestone, timeout))
    flags = ["--kernel", kernel, "--initrd", initrd, "--memory", "128M", "--cmdline", cmdline]
    rows.append(linux_memory("vmm, flags (no API thread)", [VMM, *flags], None, milestone, timeout))
    if prev:
        rows.append(linux_memory("previous commit, flags", [prev, *flags], None, milestone, timeout))
    if fc:
        rows.append(linux_memory("Firecracker, API", [fc, "--api-sock", sock, "--level", "Error"], over_api(), milestone, timeout))
    print(f"## VMM memory overhead, Linux 1 vCPU / 128 MiB, at {milestone!r} (KiB)\n")
    print("| | VmRSS | guest RAM resident | overhead (RSS − guest) | threads |\n|---|---|---|---|---|")
    for label, rss, guest, threads in rows:
        print(f"| {label} | {rss} | {guest} | {rss - guest} | {threads} |")
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--firecracker", default=DEFAULT_FC if os.path.exists(DEFAULT_FC) else None)
    ap.add_argument("--previous", help="a vmm binary built from the previous commit")
    ap.add_argument("--milestone", default="VMM-TEST: waiting")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--skip-linux", action="store_true")
    a = benchlib.parse_args(ap)
    if not os.path.exists(VMM):
        sys.exit("build first: cargo build --release")
    print(host_line())
    print(f"vmm: {VMM}; previous: {a.previous or 'not given'}; Firecracker: {a.firecracker or 'not given'}\n")
    with tempfile.TemporaryDirectory() as tmp:
        bench_control(a.runs, a.firecracker, a.previous, tmp)
        if not a.skip_linux:
            bench_memory(a.firecracker, a.previous, a.milestone, a.timeout, tmp)


if __name__ == "__main__":
    main()
