"""Shared parts of the benchmarks in tools/: paths, the guest kernel parameters
the PVM host needs, QEMU's base command line, test-guest assembly, and the
/proc readings (CPU time of the VMM's own threads, resident guest RAM)."""
import http.client, json, os, re, select, signal, socket, subprocess, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/vmm")
PVM_PARAMS = ("noxsave nofsgsbase clearcpuid=cx16,popcnt,xsave,smap,bmi1,bmi2,abm,movbe,"
              "fsgsbase,rdrand,rdseed,rdpid,invpcid,aes,pclmulqdq,sha_ni,sse4_2,adx,clflushopt,clwb")


def parse_args(ap):
    """Parses the benchmark's arguments; with VMM_BENCH_DRY_RUN=1 in the
    environment it stops there, after saying what it would run (the docs'
    example runner, tests/docs_examples.rs, checks every benchmark command the
    docs show this way: a full run takes minutes to hours with its peers)."""
    a = ap.parse_args()
    if os.environ.get("VMM_BENCH_DRY_RUN") == "1":
        print(f"dry run: {os.path.basename(ap.prog)} {vars(a)}")
        raise SystemExit(0)
    return a


def on_pvm():
    return os.path.isdir("/sys/module/kvm_pvm")


def host_line():
    kind = "PVM (software KVM)" if on_pvm() else "hardware KVM"
    return f"host: {kind}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"


def qemu_cmd(kernel, mem_mib, extra=(), initrd=None, cmdline=None, machine="microvm"):
    # debug-threads names the vCPU threads "CPU n/KVM", which cpu_ns() needs to
    # tell them from QEMU's own threads.
    cmd = ["qemu-system-x86_64", "-name", "bench,debug-threads=on", "-M", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-smp", "1",
           "-m", str(mem_mib), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
           "-serial", "stdio", "-kernel", kernel, *extra]
    if initrd:
        cmd += ["-initrd", initrd]
    if cmdline:
        cmd += ["-append", cmdline]
    return cmd


def build_guest(name, tmp):
    """Assembles tests/guests/NAME.S into an ELF in tmp, as the test suite does."""
    src = os.path.join(ROOT, "tests/guests", f"{name}.S")
    obj, elf = os.path.join(tmp, f"{name}.o"), os.path.join(tmp, f"{name}.elf")
    subprocess.run(["as", "--64", "-I", os.path.join(ROOT, "tests/guests"), "-o", obj, src], check=True)
    subprocess.run(["ld", "-nostdlib", "--no-warn-rwx-segments", "-Ttext=0x200000", "-e", "_start",
                    "-o", elf, obj], check=True)
    return elf


def guest_kernel():
    """The project's guest kernel directory (built or taken from the cache)."""
    out = subprocess.run(["bash", os.path.join(ROOT, "resources/build-kernel.sh")], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def is_vcpu_thread(comm):
    # vmm and Firecracker: "fc_vcpu N" (vmm before the API: vcpuN), QEMU: "CPU 0/KVM"
    return comm.startswith(("fc_vcpu", "vcpu", "CPU "))


def cpu_ns(pid, vcpu=False):
    """CPU nanoseconds of the process's non-vCPU threads (or of its vCPU threads)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if is_vcpu_thread(f.read()) != vcpu:
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def guest_ram_rss_kib(pid, size_kib):
    """Resident KiB of the largest anonymous mapping of about the guest RAM size."""
    best = 0
    cur_size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                cur_size = None
            elif line.startswith("Size:"):
                cur_size = int(line.split()[1])
            elif line.startswith("Rss:") and cur_size is not None and size_kib <= cur_size <= size_kib + 4096:
                best = max(best, int(line.split()[1]))
    return best


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def wait_for(p, needle, timeout):
    """Reads p's stdout until `needle` shows; raises if p exits or time runs out."""
    buf, fd = b"", p.stdout.fileno()
    deadline = time.monotonic() + timeout
    while needle.encode() not in buf:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{needle!r} not seen in {timeout}s: {buf[-2000:]!r}")
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the VMM exited before {needle!r}: {buf[-2000:]!r}")
            buf += chunk
    return buf


def stop(p):
    """SIGTERM, then SIGKILL if the VMM has not exited in 10 s."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def restore_clone(vmm, snap_dir, uds, port=52):
    """Restores the snapshot in snap_dir (vm.snap, vm.mem) in a fresh
    `vmm --restore` with its vsock socket at uds, and connects to guest port
    `port` with Firecracker's CONNECT line. Returns (process, connected socket);
    the caller kills the process."""
    if os.path.exists(uds):
        os.unlink(uds)
    p = subprocess.Popen([vmm, "--restore", os.path.join(snap_dir, "vm.snap"), "--restore-mem",
                          os.path.join(snap_dir, "vm.mem"), "--vsock-override", uds, "--level", "Error"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        while not os.path.exists(uds):
            if p.poll() is not None:
                raise SystemExit(f"vmm --restore exited ({p.returncode})")
            time.sleep(0.0005)
        s = socket.socket(socket.AF_UNIX)
        s.connect(uds)
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            c = s.recv(1)
            if not c:
                raise SystemExit(f"guest port {port} did not answer")
            line += c
        return p, s
    except BaseException:
        p.kill()
        p.wait()
        raise


class UnixHTTP(http.client.HTTPConnection):
    """An HTTP connection over the Unix socket `path` (a VMM's API)."""

    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def call(sock, method, path, body=None, timeout=10):
    """One request to the VMM API at `sock` (JSON body); the response body,
    or RuntimeError with the status and body for anything but 2xx."""
    c = UnixHTTP(sock, timeout)
    try:
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
    finally:
        c.close()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: HTTP {r.status} {data.decode(errors='replace').strip()}")
    return data
