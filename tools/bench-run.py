#!/usr/bin/env python3
"""`vmm run -- true` against a container started by runc, in one run.

1. vmm run, cold: the cached snapshots of the default guest (~/.cache/vmm/run-*,
   or $VMM_CACHE_DIR) are removed before each of --cold-runs runs, so each one
   boots the guest and saves it.
2. vmm run, warm: median (min-max) of N runs restoring that snapshot, each a
   fresh VM (process spawn -> exit, wall time).
   Beside it, the part that is the VMM's: spawn of the clone's `vmm --restore`
   -> the guest agent's `OK` on vsock; the rest of a warm run is the guest
   forking and running the command (slow under PVM's instruction emulator).
3. runc: median (min-max) of N `runc run` of /bin/true in a container whose
   root is the same busybox binary the guest's initramfs uses (read-only root,
   runc's default spec otherwise).

Usage: tools/bench-run.py [--runs 20] [--cold-runs 5] [--vmm PATH]   (cargo build --release --workspace first)
"""
import argparse, glob, json, os, shutil, statistics, subprocess, sys, tempfile, time

import benchlib
from benchlib import ROOT, host_line, restore_clone

VMM = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/vmm")


def wall(cmd, **kw):
    t = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, **kw)
    dt = (time.perf_counter() - t) * 1000
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    return dt


def restore_to_agent(vmm, snap_dir, tmp):
    """Spawn of `vmm --restore` -> the guest agent's OK on vsock (ms)."""
    t = time.perf_counter()
    p, s = restore_clone(vmm, snap_dir, os.path.join(tmp, "v.sock"))
    dt = (time.perf_counter() - t) * 1000
    s.close()
    p.kill()
    p.wait()
    return dt


def stats(xs):
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def runc_bundle(tmp):
    root = os.path.join(tmp, "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy("/bin/busybox", os.path.join(root, "busybox"))
    for applet in ("sh", "true"):
        os.symlink("../busybox", os.path.join(root, "bin", applet))
    subprocess.run(["runc", "spec"], cwd=tmp, check=True)
    path = os.path.join(tmp, "config.json")
    with open(path) as f:
        spec = json.load(f)
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/true"]
    spec["root"]["readonly"] = True
    with open(path, "w") as f:
        json.dump(spec, f)
    return tmp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--cold-runs", type=int, default=5)
    ap.add_argument("--vmm", default=VMM)
    a = benchlib.parse_args(ap)
    if not os.path.exists(a.vmm):
        sys.exit(f"{a.vmm} is missing: cargo build --release --workspace")
    cache = os.environ.get("VMM_CACHE_DIR", os.path.expanduser("~/.cache/vmm"))
    cold = []
    for _ in range(a.cold_runs):
        for d in glob.glob(os.path.join(cache, "run-*")):
            shutil.rmtree(d, ignore_errors=True)
        cold.append(wall([a.vmm, "run", "--", "true"]))
    warm = [wall([a.vmm, "run", "--", "true"]) for _ in range(a.runs)]
    snap_dir = glob.glob(os.path.join(cache, "run-*"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        agent = [restore_to_agent(a.vmm, snap_dir, tmp) for _ in range(a.runs)]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = runc_bundle(tmp)
        runc = [wall(["runc", "run", "--bundle", bundle, f"bench-{os.getpid()}-{i}"])
                for i in range(a.runs)]
    print(host_line())
    print(f"vmm: {a.vmm}; runc: {subprocess.run(['runc', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}\n")
    print(f"| `true`, wall time (ms) | median (min-max) of {a.runs} ({a.cold_runs} cold) |")
    print("|---|---|")
    print(f"| vmm run, cold (boots and saves the default guest) | {stats(cold)} |")
    print(f"| vmm run, warm (restores a clone of the saved guest) | {stats(warm)} |")
    print(f"| of which: spawn of the VM's vmm --restore -> the guest agent answers on vsock | {stats(agent)} |")
    print(f"| runc run (busybox root, read-only) | {stats(runc)} |")


if __name__ == "__main__":
    main()
