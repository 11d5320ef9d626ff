#!/usr/bin/env bash
# Builds the release binaries (vmm statically linked, vmm-jailer, vmm-agent)
# and installs them side by side into PREFIX/bin (default: /usr/local when
# root, else ~/.local), so that `vmm`, `vmm run` (which finds vmm-agent next
# to vmm) and `vmm-jailer` are on PATH. Usage: bash resources/install.sh [PREFIX]
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -gt 0 ]]; then
    prefix=$1
elif [[ $(id -u) -eq 0 ]]; then
    prefix=/usr/local
else
    prefix=$HOME/.local
fi
echo "install: building the release binaries (a few minutes the first time)" >&2
cargo build --release --workspace --quiet
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p "$prefix/bin"
for b in vmm vmm-jailer vmm-agent; do
    install -m 0755 "$bin/$b" "$prefix/bin/$b"
done
echo "install: vmm, vmm-jailer and vmm-agent are in $prefix/bin" >&2
case ":$PATH:" in
    *":$prefix/bin:"*) ;;
    *) echo "install: add $prefix/bin to PATH (e.g. export PATH=\"$prefix/bin:\$PATH\")" >&2 ;;
esac
echo "$prefix/bin"
