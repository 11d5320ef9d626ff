#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (packages, guest kernel, busybox root file
# system), builds vmm and boots the default guest with its console on this
# terminal: `vmm --kernel vmlinux --rootfs disk.img`, a shell on the console.
# The disk persists in the cache directory between runs. Extra arguments are
# passed to vmm (e.g. --cpus 2). Quit with `exit` (powers off) or Ctrl-A x.
set -euo pipefail
cd "$(dirname "$0")/.."

bash resources/setup-host.sh
echo "run-guest: building vmm, vmm-agent and vmm-jailer (release; a few minutes the first time)" >&2
cargo build --release --workspace --quiet  # vmm, vmm-agent, vmm-jailer (static)
echo "run-guest: the guest kernel (built once and cached; ~5 minutes on 2 cores, more on a busy machine)" >&2
kdir=$(bash resources/build-kernel.sh | tail -n 1)
echo "run-guest: the busybox root disk" >&2
image=$(bash resources/build-rootfs.sh | tail -n 1)
disk="${VMM_CACHE_DIR:-$HOME/.cache/vmm}/guest-disk.ext4"
[[ -f "$disk" ]] || cp "$image" "$disk"

cmdline="console=ttyS0 reboot=k panic=-1"
if [[ -d /sys/module/kvm_pvm ]]; then
    # PVM software KVM (see docs/TESTING-ON-PVM.md): steer the kernel clear of the
    # instructions its emulator lacks. Not needed on VMX/SVM hosts.
    cmdline+=" noxsave nofsgsbase clearcpuid=cx16,popcnt,xsave,smap,bmi1,bmi2,abm,movbe,fsgsbase,rdrand,rdseed,rdpid,invpcid,aes,pclmulqdq,sha_ni,sse4_2,adx,clflushopt,clwb"
    echo "run-guest: PVM host: the guest kernel runs partly emulated; expect ~2 minutes to a shell." >&2
fi
exec ./target/x86_64-unknown-linux-gnu/release/vmm --kernel "$kdir/vmlinux" --rootfs "$disk" --memory 256M --cmdline "$cmdline vmm.test=shell" "$@"
