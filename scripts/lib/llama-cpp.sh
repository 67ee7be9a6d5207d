# Sourced by the scripts that measure strata beside llama.cpp: builds the pinned
# llama.cpp once into the cache folder, from the sources vendored in the
# llama-cpp-python 0.3.36 source package (pip's sdist), with cmake from Debian
# (~15 minutes on 2 cores), and sets `llama_bin` to its bin folder.
#
#   llama_cpp_build JOBS TARGET...

llama_cpp_build() {
  local jobs=$1
  shift
  local cache=${XDG_CACHE_HOME:-$HOME/.cache}
  local src=$cache/llama-cpp-src
  local llama=$src/llama_cpp_python-0.3.36/vendor/llama.cpp
  llama_bin=$llama/build/bin
  local missing=()
  for target in "$@"; do
    [ -x "$llama_bin/$target" ] || missing+=("$target")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v cmake >/dev/null || {
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null || { echo "llama.cpp: needs cmake" >&2; return 1; }
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake
  }
  mkdir -p "$src"
  [ -d "$llama" ] || {
    python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$src" llama-cpp-python==0.3.36
    tar -xzf "$src/llama_cpp_python-0.3.36.tar.gz" -C "$src"
  }
  # llama.cpp's AMX kernels died at their first tile instruction (SIGILL at
  # `tilezero`, llama-bench on Gemma 3) on a Sapphire Rapids VM whose kernel grants
  # the AMX state, so where the CPU has AMX the build leaves it out: llama.cpp then
  # runs its AVX-512 VNNI kernels, as strata does.
  local flags=
  grep -qw amx_tile /proc/cpuinfo 2>/dev/null && flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$llama" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >/dev/null
  cmake --build "$llama/build" -j "$jobs" --target "${missing[@]}"
}
