#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (packages, guest kernel, busybox initramfs),
# builds vmm and boots the default guest with its console on this terminal.
# Extra arguments are passed to vmm (e.g. --cpus 2). Quit with Ctrl-A x.
set -euo pipefail
cd "$(dirname "$0")/.."

bash resources/setup-host.sh
cargo build --release --quiet
kdir=$(bash resources/build-kernel.sh | tail -n 1)
initrd=$(bash resources/build-initramfs.sh | tail -n 1)

cmdline="console=ttyS0 reboot=k panic=-1"
if [[ -d /sys/module/kvm_pvm ]]; then
    # PVM software KVM (see shared/HOST-KVM.md): steer the kernel clear of the
    # instructions its emulator lacks. Not needed on VMX/SVM hosts.
    cmdline+=" noxsave nofsgsbase clearcpuid=cx16,popcnt,xsave,smap,bmi1,bmi2,abm,movbe,fsgsbase,rdrand,rdseed,rdpid,invpcid,aes,pclmulqdq,sha_ni,sse4_2,adx,clflushopt,clwb"
    echo "run-guest: PVM host: the guest kernel runs partly emulated; expect ~2 minutes to a shell." >&2
fi
exec ./target/release/vmm --kernel "$kdir/bzImage" --initrd "$initrd" --memory 256M --cmdline "$cmdline" "$@"
