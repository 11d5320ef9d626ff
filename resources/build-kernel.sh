#!/usr/bin/env bash
# Build the vmm project's guest kernel from Debian's linux-source-6.1.
#
# Usage: resources/build-kernel.sh
#
# The result is cached outside the clone, in
#   ${VMM_CACHE_DIR:-$HOME/.cache/vmm}/kernel-<key>/{vmlinux,bzImage,config,System.map}
# where <key> = first 16 hex chars of a sha256 over this script, the config
# fragment (resources/kernel/microvm.config), every patch in
# resources/kernel/patches/ and the installed linux-source-6.1 package version.
# The LAST line on stdout is that directory; progress goes to stderr.
#
# Environment:
#   VMM_CACHE_DIR     cache root (default $HOME/.cache/vmm)
#   VMM_INSTALL_DEPS  set to 1 to let the script apt-get install missing packages
#   VMM_KERNEL_JOBS   make -j value (default: nproc)
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
RES_DIR="$(dirname "$SCRIPT")"
FRAGMENT="$RES_DIR/kernel/microvm.config"
PATCH_DIR="$RES_DIR/kernel/patches"
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
CACHE_ROOT="${VMM_CACHE_DIR:-$HOME/.cache/vmm}"

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { printf 'build-kernel: error: %s\n' "$*" >&2; exit 1; }

# --- Inputs ------------------------------------------------------------------
pkg_version() {
    dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null |
        awk '$1 == "install" && $3 == "installed" { print $4 }'
}

SRC_VERSION="$(pkg_version "$SRC_PKG" || true)"
if [[ -z "$SRC_VERSION" || ! -f "$SRC_TARBALL" ]]; then
    if [[ "${VMM_INSTALL_DEPS:-0}" == 1 ]]; then
        log "installing $SRC_PKG (VMM_INSTALL_DEPS=1)"
        apt-get install -y "$SRC_PKG" >&2
        SRC_VERSION="$(pkg_version "$SRC_PKG" || true)"
        [[ -n "$SRC_VERSION" && -f "$SRC_TARBALL" ]] || die "$SRC_PKG still not installed"
    else
        die "$SRC_PKG is not installed; run: sudo apt-get install $SRC_PKG (or set VMM_INSTALL_DEPS=1)"
    fi
fi

[[ -f "$FRAGMENT" ]] || die "missing config fragment $FRAGMENT"
shopt -s nullglob
PATCHES=("$PATCH_DIR"/*.patch)
shopt -u nullglob

compute_key() {
    local f
    {
        printf 'script\n'; sha256sum <"$SCRIPT"
        printf 'fragment\n'; sha256sum <"$FRAGMENT"
        for f in "${PATCHES[@]}"; do
            printf 'patch %s\n' "$(basename "$f")"; sha256sum <"$f"
        done
        printf 'source %s %s\n' "$SRC_PKG" "$SRC_VERSION"
    } | sha256sum | cut -c1-16
}
KEY="$(compute_key)"
FINAL="$CACHE_ROOT/kernel-$KEY"

# --- Fast path: cached -------------------------------------------------------
if [[ -f "$FINAL/vmlinux" && -f "$FINAL/bzImage" ]]; then
    echo "$FINAL"
    exit 0
fi

# --- Build tools ---------------------------------------------------------------
missing=()
for tool in make:make gcc:gcc ld:binutils flex:flex bison:bison bc:bc \
            lz4:lz4 patch:patch tar:tar xz:xz-utils perl:perl; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
[[ -f /usr/include/libelf.h || -f /usr/include/elfutils/libelf.h ]] || missing+=(libelf-dev)
[[ -f /usr/include/openssl/opensslv.h ]] || missing+=(libssl-dev)
if ((${#missing[@]})); then
    if [[ "${VMM_INSTALL_DEPS:-0}" == 1 ]]; then
        log "installing ${missing[*]} (VMM_INSTALL_DEPS=1)"
        apt-get install -y "${missing[@]}" >&2
    else
        die "missing build dependencies; run: sudo apt-get install ${missing[*]} (or set VMM_INSTALL_DEPS=1)"
    fi
fi

# --- Build in a temp dir under the cache root ------------------------------------
mkdir -p "$CACHE_ROOT"
# One build per key at a time: a second caller (a parallel test, another
# checkout) waits for the first and then takes its result.
exec 9>"$CACHE_ROOT/.kernel-$KEY.lock"
if ! flock -n 9; then
    log "another build of kernel $KEY is running; waiting for it"
    flock 9
fi
if [[ -f "$FINAL/vmlinux" && -f "$FINAL/bzImage" ]]; then
    echo "$FINAL"
    exit 0
fi
BUILD="$(mktemp -d "$CACHE_ROOT/.kernel-$KEY.build.XXXXXX")"
LOG="$BUILD/build.log"
SRC="$BUILD/src"
OUT="$BUILD/out"
JOBS="${VMM_KERNEL_JOBS:-$(nproc)}"
export ARCH=x86_64
unset CROSS_COMPILE KBUILD_OUTPUT KCONFIG_CONFIG O 2>/dev/null || true

succeeded=0
CHILD=
cleanup() {
    if [[ -n "$CHILD" ]]; then # interrupted while a step was running
        kill -TERM "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    if ((succeeded == 0)) && [[ -f "$LOG" ]]; then
        cp -f "$LOG" "$CACHE_ROOT/kernel-$KEY.failed.log" 2>/dev/null || true
    fi
    rm -rf "$BUILD"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
    printf 'build-kernel: error: %s\n' "$1" >&2
    if [[ -f "$LOG" ]]; then
        printf -- '--- last 40 lines of %s ---\n' "$CACHE_ROOT/kernel-$KEY.failed.log" >&2
        tail -n 40 "$LOG" >&2
    fi
    exit 1
}

# run STEP-DESCRIPTION CMD...: append output to the log, fail with its tail.
# The step runs in the background and is waited for, so that an INT/TERM sent
# to this script is handled at once (cleanup stops the step, e.g. make).
run() {
    local what="$1" rc=0; shift
    printf '\n### %s: %s\n' "$what" "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 </dev/null &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=
    ((rc == 0)) || fail "$what failed (exit $rc)"
}

start=$SECONDS
log "building kernel $KEY ($SRC_PKG $SRC_VERSION, ${#PATCHES[@]} patches, -j$JOBS) in $BUILD"
: >"$LOG"
mkdir -p "$SRC" "$OUT"
run "extract $SRC_TARBALL" tar -xf "$SRC_TARBALL" -C "$SRC" --strip-components=1

for p in "${PATCHES[@]}"; do
    run "apply $(basename "$p")" patch -d "$SRC" -p1 --forward --batch -i "$p"
done

run "allnoconfig" make -C "$SRC" allnoconfig
run "merge $(basename "$FRAGMENT")" \
    env -C "$SRC" ./scripts/kconfig/merge_config.sh -m .config "$FRAGMENT"
run "olddefconfig" make -C "$SRC" olddefconfig

# Verify that every option in the fragment survived with its exact value.
bad=()
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym="${BASH_REMATCH[1]}"
        grep -qxF -- "$line" "$SRC/.config" || {
            got="$(grep -E "^(# )?${sym}[= ]" "$SRC/.config" || true)"
            bad+=("$line (got: ${got:-unset})")
        }
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym="${BASH_REMATCH[1]}"
        got="$(grep -E "^${sym}=" "$SRC/.config" || true)"
        [[ -z "$got" ]] || bad+=("$sym must be unset (got: $got)")
    fi
done <"$FRAGMENT"
if ((${#bad[@]})); then
    printf 'build-kernel: error: options from %s not honoured by Kconfig (missing dependency?):\n' \
        "$FRAGMENT" >&2
    printf '  %s\n' "${bad[@]}" >&2
    exit 1
fi

log "config verified; compiling (log: $LOG)"
run "make" make -C "$SRC" -j"$JOBS" bzImage

cp "$SRC/vmlinux" "$SRC/arch/x86/boot/bzImage" "$SRC/System.map" "$OUT/"
cp "$SRC/.config" "$OUT/config"
cp "$LOG" "$OUT/build.log"
{
    echo "key=$KEY"
    echo "source=$SRC_PKG $SRC_VERSION"
    echo "release=$(make -s -C "$SRC" kernelrelease 2>/dev/null || true)"
    echo "patches=$(for p in "${PATCHES[@]}"; do printf '%s ' "$(basename "$p")"; done)"
    echo "build_seconds=$((SECONDS - start))"
} >"$OUT/INFO"

# Atomic publish: rename the complete directory into place. If another build
# of the same key won the race, keep its result.
if ! mv -T "$OUT" "$FINAL" 2>/dev/null; then
    [[ -f "$FINAL/vmlinux" && -f "$FINAL/bzImage" ]] || fail "could not move result to $FINAL"
fi
succeeded=1
rm -f "$CACHE_ROOT/kernel-$KEY.failed.log"
log "done in $((SECONDS - start)) s"
echo "$FINAL"
