#!/usr/bin/env python3
"""virtio-net benchmark: vmm against QEMU (-M microvm, virtio-net-device on a
TAP), the same Linux guest, one after the other in the same run.

For each configuration: a network namespace with a TAP at 192.168.77.1/24; the
project's kernel (1 vCPU, 256 MiB) with a static address 192.168.77.15 and
root=/dev/vdz rootwait, so that it stays up with networking and no user space.
From the namespace, once the kernel has configured its address:
1. 3 warm-up pings, then 100 pings 20 ms apart: median round trip.
2. ping -f -s 1400 for 10 s: echo replies per second, MB/s (IP bytes both ways,
   1428 per packet), and the VMM's CPU time per packet (two frames per reply:
   the request in, the reply out), for its own threads (non-vCPU: where the
   device emulation runs) and for the whole process.
   Requests unanswered at ping's deadline are reported with the most that were
   in flight at once (ping's "pipe"), the frames the TAP device dropped on the
   way to the VMM (its tx_dropped: queue full), and for vmm the drops its
   device counted (its counters, logged at exit).
3. After the flood: the resident part of guest RAM (pages the guest touched,
   receive buffers among them) and the process RSS.
Each configuration boots RUNS times, interleaved; the table has medians.
Configurations: vmm (mergeable receive buffers on, the default), vmm with
--net ...,mrg_rxbuf=off, and QEMU 7.2 (modern virtio-mmio, userspace
virtio-net: this host has no /dev/vhost-net).

With --tracking the configurations are vmm with dirty-page tracking off and
on (`track_dirty_pages` in a configuration file: KVM's dirty log, and the
device marking the receive buffers it fills), compared with each other.

Usage: sudo tools/bench-net.py [--runs 3] [--tracking]   (after cargo build --release; needs root,
iproute2, iputils-ping, qemu-system-x86, and the kernel from resources/)
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time

import benchlib
from benchlib import VMM, PVM_PARAMS, cpu_ns, guest_kernel, guest_ram_rss_kib, host_line, on_pvm, qemu_cmd, \
    status_kib, stop, wait_for

TAP = "vmmtap0"
HOST, GUEST = "192.168.77.1", "192.168.77.15"
MAC = "02:00:00:00:00:15"
MEM_MIB = 256
FLOOD_S = 10
IP_BYTES = 1400 + 8 + 20


def sh(*args):
    subprocess.run(args, check=True)


class Namespace:
    def __init__(self, name):
        self.name = name
        subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
        sh("ip", "netns", "add", name)
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
                    ["ip", "addr", "add", f"{HOST}/24", "dev", TAP], ["ip", "link", "set", TAP, "up"]):
            sh("ip", "netns", "exec", name, *cmd)

    def run(self, *cmd):
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True, text=True)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name])


def measure(name, cmd, ns, tmp):
    errpath = os.path.join(tmp, "stderr")
    with open(errpath, "w") as err:
        p = subprocess.Popen(["ip", "netns", "exec", ns.name, *cmd], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=err)
    try:
        wait_for(p, "IP-Config: Complete", 900)
        ns.run("ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST)
        out = ns.run("ping", "-c", "100", "-i", "0.02", "-W", "5", GUEST).stdout
        rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
        if len(rtts) < 100:
            raise RuntimeError(f"{name}: {100 - len(rtts)} of 100 pings lost:\n{out}")
        own0, vcpu0, t0 = cpu_ns(p.pid), cpu_ns(p.pid, vcpu=True), time.monotonic()
        out = ns.run("ping", "-f", "-s", "1400", "-w", str(FLOOD_S), "-q", GUEST).stdout
        own1, vcpu1, t1 = cpu_ns(p.pid), cpu_ns(p.pid, vcpu=True), time.monotonic()
        tap_dropped = int(ns.run("cat", f"/sys/class/net/{TAP}/statistics/tx_dropped").stdout or 0)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if not m:
            raise RuntimeError(f"{name}: no ping summary:\n{out}")
        sent, replies = int(m.group(1)), int(m.group(2))
        pipe = re.search(r"pipe (\d+)", out)
        frames = 2 * replies
        result = {
            "rtt_ms": statistics.median(rtts),
            "pps": replies / (t1 - t0),
            "mbps": 2 * replies * IP_BYTES / (t1 - t0) / 1e6,
            "lost": sent - replies,
            "cpu_us": (own1 - own0) / frames / 1000,
            "all_us": (own1 - own0 + vcpu1 - vcpu0) / frames / 1000,
            "guest_kib": guest_ram_rss_kib(p.pid, MEM_MIB * 1024),
            "rss_kib": status_kib(p.pid, "VmRSS"),
            "tap_dropped": tap_dropped,
            "pipe": int(pipe.group(1)) if pipe else 1,
            "dev_dropped": float("nan"),
        }
    finally:
        stop(p)
    with open(errpath) as f:
        counters = re.findall(r"tx \d+ packets \d+ bytes (\d+) dropped, rx \d+ packets \d+ bytes (\d+) dropped", f.read())
    if counters:
        result["dev_dropped"] = sum(int(a) + int(b) for a, b in counters)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tracking", action="store_true",
                    help="compare dirty-page tracking off and on (vmm only)")
    a = benchlib.parse_args(ap)
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates a network namespace and a TAP device")
    if not os.path.exists(VMM):
        sys.exit("build first: cargo build --release")
    kernel = os.path.join(guest_kernel(), "vmlinux")
    cmdline = (f"console=ttyS0 reboot=k panic=-1 ip={GUEST}::{HOST}:255.255.255.0::eth0:off "
               "root=/dev/vdz rootwait")
    if on_pvm():
        cmdline += " " + PVM_PARAMS
    vmm = [VMM, "--kernel", kernel, "--memory", f"{MEM_MIB}M", "--cmdline", cmdline, "--log-level", "info"]
    configs = [
        ("vmm", vmm + ["--net", f"tap={TAP},mac={MAC}"]),
        ("vmm, mrg_rxbuf=off", vmm + ["--net", f"tap={TAP},mac={MAC},mrg_rxbuf=off"]),
        ("QEMU microvm", qemu_cmd(kernel, MEM_MIB, cmdline=cmdline, extra=[
            "-global", "virtio-mmio.force-legacy=false",
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={MAC}"])),
    ]
    ref = "QEMU microvm"
    if a.tracking:
        cfgdir = tempfile.mkdtemp(prefix="bench-net-")
        configs = []
        for track in (False, True):
            cfg = {
                "boot-source": {"kernel_image_path": kernel, "boot_args": cmdline},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB, "track_dirty_pages": track},
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": MAC}],
            }
            path = os.path.join(cfgdir, f"track-{track}.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            configs.append((f"vmm, tracking {'on' if track else 'off'}",
                            [VMM, "--no-api", "--config-file", path, "--log-level", "info"]))
        ref = configs[0][0]
    runs = {name: [] for name, _ in configs}
    for _ in range(a.runs):
        for name, cmd in configs:
            ns = Namespace(f"vmm-bench-net-{os.getpid()}")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    runs[name].append(measure(name, cmd, ns, tmp))
            finally:
                ns.close()
    results = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    print(f"{host_line()}, Linux guest 1 vCPU / {MEM_MIB} MiB, ping from the host side of the TAP, "
          f"median of {a.runs} boots each\n")
    names = [n for n, _ in configs]
    q = results[ref]
    vs = "on vs off" if a.tracking else "vmm vs QEMU"
    print("| | " + " | ".join(names) + f" | {vs} |")
    print("|---|" + "---|" * (len(names) + 1))
    rows = [
        ("ping round trip, median of 100", "rtt_ms", "{:.3f} ms", lambda v: f"{q['rtt_ms'] / v:.2f}x faster"),
        (f"ping -f -s 1400, {FLOOD_S} s: echo replies/s", "pps", "{:.0f}", lambda v: f"{v / q['pps']:.2f}x"),
        ("ping -f -s 1400: MB/s (IP bytes, both ways)", "mbps", "{:.2f}", lambda v: f"{v / q['mbps']:.2f}x"),
        ("ping -f -s 1400: requests unanswered at the deadline", "lost", "{:.0f}", lambda v: ""),
        ("ping -f -s 1400: most requests in flight (ping's pipe)", "pipe", "{:.0f}", lambda v: ""),
        ("frames the TAP dropped (queue to the VMM full)", "tap_dropped", "{:.0f}", lambda v: ""),
        ("frames the virtio-net device dropped (its counters)", "dev_dropped", "{:.0f}", lambda v: ""),
        ("VMM CPU per packet, non-vCPU threads", "cpu_us", "{:.1f} µs", lambda v: f"{q['cpu_us'] / v:.2f}x less"),
        ("VMM CPU per packet, all threads", "all_us", "{:.1f} µs", lambda v: f"{q['all_us'] / v:.2f}x less"),
        ("guest RAM resident after the flood", "guest_kib", "{:.0f} KiB", lambda v: ""),
        ("process RSS after the flood", "rss_kib", "{:.0f} KiB", lambda v: ""),
    ]
    for label, key, fmt, ratio in rows:
        cells = [fmt.format(results[n][key]) if results[n][key] == results[n][key] else "n/a" for n in names]
        mine = results[names[-1]] if a.tracking else results["vmm"]
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio(mine[key])} |")


if __name__ == "__main__":
    main()
