#!/usr/bin/env bash
# Installs what building the sock_ops RTT program (ebpf/program) needs, and
# only what is missing, so it is safe to run before every build:
#   * the nightly toolchain's rust-src (the BPF target has no prebuilt std),
#   * bpf-linker, linked against the nightly's own libLLVM.
#
# Why the nightly's LLVM: bpf-linker must speak the same LLVM bitcode as the
# rustc that emits it, and the system LLVM here (14) is far older than the
# nightly's (22). rustup ships the nightly's libLLVM as a shared library, so we
# give bpf-linker's build script an LLVM_PREFIX whose lib/ holds links to it.
# bpf-linker's build script bakes that lib/ into the binary's rpath, so no
# LD_LIBRARY_PATH is needed at run time.
#
# Without this toolchain the workspace still builds: the sidecar then runs on
# the TCP_INFO RTT source and says so once in its log.
set -euo pipefail

BPF_LINKER_VERSION="${BPF_LINKER_VERSION:-0.13.0}"
NIGHTLY="${NIGHTLY:-nightly}"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback

log() { echo "setup-ebpf: $*" >&2; }

if ! rustup toolchain list | grep -q "^${NIGHTLY}"; then
    log "installing the ${NIGHTLY} toolchain"
    rustup toolchain install "${NIGHTLY}" --profile minimal
fi

if rustup component list --toolchain "${NIGHTLY}" --installed | grep -q '^rust-src'; then
    log "rust-src for ${NIGHTLY}: present"
else
    log "adding rust-src to ${NIGHTLY}"
    rustup component add rust-src --toolchain "${NIGHTLY}"
fi

# The folder bpf-linker links against: lib/libLLVM.so for the build-time
# link, plus a link under the library's SONAME, which is what the binary
# asks the loader for through its rpath.
sysroot="$(rustc "+${NIGHTLY}" --print sysroot)"
llvm_so="$(find "${sysroot}/lib" -maxdepth 1 -name 'libLLVM.so.*-rust-*' | head -n 1)"
if [[ -z "${llvm_so}" ]]; then
    log "no libLLVM.so.* in ${sysroot}/lib; cannot build bpf-linker"
    exit 1
fi
llvm_major="$(basename "${llvm_so}" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')"
prefix="${SWITCHYARD_LLVM_PREFIX:-${XDG_DATA_HOME:-$HOME/.local/share}/switchyard/llvm-${NIGHTLY}}"
mkdir -p "${prefix}/lib"
ln -sfn "${llvm_so}" "${prefix}/lib/libLLVM.so"
ln -sfn "${llvm_so}" "${prefix}/lib/$(basename "${llvm_so}")"

linker_ok() {
    [[ -x "${CARGO_BIN}/bpf-linker" ]] && "${CARGO_BIN}/bpf-linker" --version >/dev/null 2>&1 &&
        ldd "${CARGO_BIN}/bpf-linker" | grep -q "$(basename "${llvm_so}")"
}

if linker_ok; then
    log "bpf-linker: present ($("${CARGO_BIN}/bpf-linker" --version)), linked to $(basename "${llvm_so}")"
else
    log "installing bpf-linker ${BPF_LINKER_VERSION} against LLVM ${llvm_major} from ${llvm_so}"
    LLVM_PREFIX="${prefix}" cargo install bpf-linker --version "=${BPF_LINKER_VERSION}" \
        --locked --force --no-default-features --features "llvm-${llvm_major}"
    linker_ok || { log "bpf-linker installed but does not run; see ldd ${CARGO_BIN}/bpf-linker"; exit 1; }
    log "bpf-linker: installed ($("${CARGO_BIN}/bpf-linker" --version))"
fi
