#!/usr/bin/env bash
# Build the real llama.cpp tools (llama-quantize, llama-perplexity, llama-imatrix) from the vendored
# source of the llama-cpp-python sdist on PyPI, cached outside the checkout and rebuilt only when the
# version or the build flags change. Prints the folder that holds the binaries on its last line.
#   usage: experiments/build_llamacpp.sh [VERSION]      (cache: $MPSEARCH_LLAMACPP_CACHE, default ~/.cache/mpsearch)
# ~15 min on 2 cores the first time; a second call with the same version prints the cached folder at once.
set -euo pipefail
version="${1:-${LLAMA_CPP_PYTHON_VERSION:-0.3.36}}"
cache="${MPSEARCH_LLAMACPP_CACHE:-$HOME/.cache/mpsearch}/llama.cpp-$version"
bin="$cache/build/bin"
tools=(llama-quantize llama-perplexity llama-imatrix)
flags=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF)
if [[ "$(uname -m)" == x86_64 ]]; then
  # a portable AVX2 build, not -march=native: native turns on ggml's AMX kernels where the CPU lists AMX, and
  # they died with SIGILL (tilezero) on such a machine whose kernel does not grant AMX state to the process
  flags+=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
fi
have_tools() { for t in "${tools[@]}"; do [[ -x "$bin/$t" ]] || return 1; done; }
have_all() { [[ "$(cat "$cache/build-flags" 2>/dev/null)" == "${flags[*]}" ]] && have_tools; }
if have_all; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
if [[ ! -f "$cache/src/CMakeLists.txt" ]]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
  tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
  rm -rf "$cache/src"
  mv "$work/llama_cpp_python-$version/vendor/llama.cpp" "$cache/src"
fi
rm -f "$cache/build-flags"
cmake -S "$cache/src" -B "$cache/build" -G Ninja "${flags[@]}" >&2
ninja -C "$cache/build" "${tools[@]}" >&2
have_tools || { echo "build_llamacpp: ninja finished but ${tools[*]} are not all in $bin" >&2; exit 1; }
echo "${flags[*]}" > "$cache/build-flags"
echo "$bin"
