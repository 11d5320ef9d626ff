#!/usr/bin/env bash
# The whole test suite: host set-up, format and lint checks, unit tests, test
# guests and Linux guests under KVM. The guest kernel is built once and cached
# outside the clone (resources/build-kernel.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash resources/setup-host.sh
echo "test: guest kernel: $(bash resources/build-kernel.sh | tail -n 1)"
echo "test: initramfs: $(bash resources/build-initramfs.sh | tail -n 1)"
echo "test: rootfs: $(bash resources/build-rootfs.sh | tail -n 1)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
