#!/bin/sh
# Build llama.cpp's C++ tools (llama-bench, llama-batched-bench, llama-server,
# llama-lookup, llama-cli, llama-simple) from the llama.cpp tree vendored in
# llama-cpp-python's PyPI source package (only PyPI needs to be reachable).
#
# Usage: sh bench/llama_cpp.sh [DEST]        (DEST defaults to .cache/llama.cpp; `make bench-install` runs it)
#   DEST/src        llama.cpp source (vendor/llama.cpp of the sdist)
#   DEST/build      cmake build dir; binaries end up in DEST/build/bin
#
# Env overrides:
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default 0.3.36)
#   LLAMA_CPP_PYTHON_SDIST    path to an already downloaded llama_cpp_python-*.tar.gz
#   PYTHON                    python used for `-m pip download` (default python3)
#   JOBS                      parallel build jobs (default: nproc)
#   TARGETS                   space-separated cmake targets (default: see below)
#   FORCE=1                   rebuild even if all binaries already exist
#   DRY_RUN=1                 only print the chosen cmake flags
#   LLAMA_CPP_CPUFLAGS        cpu flag list to use instead of /proc/cpuinfo (testing)
#
# CPU ISA flags come from /proc/cpuinfo of the machine running this script
# (GGML_NATIVE=OFF); AMX is always disabled (an AMX build segfaults at the first
# decode on AMX Xeons). Idempotent: exits early (no download, no cmake) when all
# binaries exist and DEST/build/llama_cpp_build.flags matches the flags chosen
# for this CPU; otherwise reuses DEST/src and rebuilds incrementally.
set -eu

DEST=${1:-.cache/llama.cpp}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
SRC="$DEST/src"
BUILD="$DEST/build"
BIN="$BUILD/bin"
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
TARGETS=${TARGETS:-"llama-bench llama-batched-bench llama-server llama-lookup llama-cli llama-simple"}

log() { printf '[llama_cpp_build] %s\n' "$*" >&2; }

all_built() {
    for t in $TARGETS; do
        [ -x "$BIN/$t" ] || return 1
    done
    return 0
}

# ----------------------------------------------------------- cmake flags ----
FLAGS="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF"
FLAGS="$FLAGS -DGGML_OPENMP=ON -DGGML_CCACHE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF"
FLAGS="$FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON"

case "$(uname -m)" in
x86_64|amd64|i?86)
    CPUFLAGS=" ${LLAMA_CPP_CPUFLAGS:-$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2)} "
    has() { case "$CPUFLAGS" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
    onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
    AVX512=OFF
    # GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw, so require all five
    if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
        AVX512=ON
    fi
    if [ "$AVX512" = ON ]; then
        VBMI=$(onoff avx512vbmi); VNNI512=$(onoff avx512_vnni); BF16=$(onoff avx512_bf16)
    else
        VBMI=OFF; VNNI512=OFF; BF16=OFF
    fi
    FLAGS="$FLAGS -DGGML_SSE42=$(onoff sse4_2) -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2)"
    FLAGS="$FLAGS -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c) -DGGML_BMI2=$(onoff bmi2)"
    FLAGS="$FLAGS -DGGML_AVX_VNNI=$(onoff avx_vnni)"
    FLAGS="$FLAGS -DGGML_AVX512=$AVX512 -DGGML_AVX512_VBMI=$VBMI -DGGML_AVX512_VNNI=$VNNI512 -DGGML_AVX512_BF16=$BF16"
    FLAGS="$FLAGS -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    ;;
*)
    log "non-x86 host ($(uname -m)): using ggml's default CPU flags for GGML_NATIVE=OFF"
    ;;
esac

STAMP="$BUILD/llama_cpp_build.flags"
echo "cmake flags: $FLAGS"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
if [ "${FORCE:-0}" != 1 ] && all_built && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$FLAGS" ]; then
    log "all binaries present in $BIN (built with the same flags), nothing to do:"
    for t in $TARGETS; do log "  $BIN/$t"; done
    exit 0
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" != "$FLAGS" ]; then
    log "flags differ from previous build ($(cat "$STAMP")); reconfiguring"
fi

# ---------------------------------------------------------------- source ----
if [ ! -f "$SRC/CMakeLists.txt" ] || [ ! -f "$SRC/ggml/CMakeLists.txt" ]; then
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/llama_cpp_src.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT INT TERM
    if [ -n "${LLAMA_CPP_PYTHON_SDIST:-}" ]; then
        SDIST=$LLAMA_CPP_PYTHON_SDIST
    else
        log "downloading llama-cpp-python==$VERSION sdist from PyPI"
        "$PYTHON" -m pip download --no-deps --no-binary :all: \
            "llama-cpp-python==$VERSION" -d "$TMP" >&2
        SDIST=$(ls "$TMP"/llama_cpp_python-*.tar.gz | head -n 1)
    fi
    log "unpacking vendor/llama.cpp from $SDIST"
    tar -xzf "$SDIST" -C "$TMP"
    VENDOR=$(ls -d "$TMP"/llama_cpp_python-*/vendor/llama.cpp | head -n 1)
    [ -f "$VENDOR/CMakeLists.txt" ] || { log "no vendor/llama.cpp in sdist"; exit 1; }
    rm -rf "$SRC"
    mv "$VENDOR" "$SRC"
    rm -rf "$TMP"
    trap - EXIT INT TERM
fi

log "source: $SRC"
log "build:  $BUILD"

# --------------------------------------------------------------- build ----
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$BUILD" $FLAGS >&2
# shellcheck disable=SC2086
cmake --build "$BUILD" --config Release -j "$JOBS" --target $TARGETS >&2

all_built || { log "build finished but some binaries are missing in $BIN"; exit 1; }
printf '%s\n' "$FLAGS" > "$STAMP"
log "built:"
for t in $TARGETS; do log "  $BIN/$t"; done
