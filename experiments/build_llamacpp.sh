#!/usr/bin/env bash
# Build the real llama.cpp tools (llama-quantize, llama-perplexity, llama-imatrix) from the vendored
# source of the llama-cpp-python sdist on PyPI, cached outside the checkout and rebuilt only when the
# version changes. Prints the folder that holds the binaries on its last line.
#   usage: experiments/build_llamacpp.sh [VERSION]      (cache: $MPSEARCH_LLAMACPP_CACHE, default ~/.cache/mpsearch)
# ~15 min on 2 cores the first time; a second call with the same version prints the cached folder at once.
set -euo pipefail
version="${1:-${LLAMA_CPP_PYTHON_VERSION:-0.3.36}}"
cache="${MPSEARCH_LLAMACPP_CACHE:-$HOME/.cache/mpsearch}/llama.cpp-$version"
bin="$cache/build/bin"
tools=(llama-quantize llama-perplexity llama-imatrix)
have_all() { for t in "${tools[@]}"; do [[ -x "$bin/$t" ]] || return 1; done; }
if have_all; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
rm -rf "$cache/src"
mv "$work/llama_cpp_python-$version/vendor/llama.cpp" "$cache/src"
cmake -S "$cache/src" -B "$cache/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
ninja -C "$cache/build" "${tools[@]}" >&2
have_all || { echo "build_llamacpp: ninja finished but ${tools[*]} are not all in $bin" >&2; exit 1; }
echo "$bin"
