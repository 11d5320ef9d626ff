#!/usr/bin/env bash
# Installs what building and testing vmm needs on a Debian 12 machine: the
# packages the guest kernel and initramfs are built from, binutils for the
# test guests, and the API tests' clients (curl, python3) and nsenter
# (util-linux). Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail

PKGS=(linux-source-6.1 busybox-static build-essential bc flex bison libelf-dev libssl-dev
      cpio xz-utils lz4 e2fsprogs iproute2 dnsmasq-base iputils-ping curl python3 util-linux)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO=sudo
    echo "setup-host: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null; then
    echo "setup-host: error: cargo is not installed; install a Rust toolchain >= 1.85 (rustup) and re-run." >&2
    exit 1
fi
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "setup-host: error: /dev/kvm is not usable by $(id -un); enable KVM or add yourself to the kvm group." >&2
    exit 1
fi
