#!/usr/bin/env bash
# The C++ extension's error paths on CPU tensors, with the facts that explain a native crash:
# the compilers, what torch was built with, the libraries the extension loads, and whether it
# carries its own copy of the C++ runtime. Then the bad-input matrix of the cuda backend on
# CPU tensors (every op's TORCH_CHECKs) under faulthandler, one line per case (the case after
# the last one printed is the one that crashed); exits with its status (> 128: a signal).
#   bash scripts/native_probe.sh [python]
PY=${1:-${PYTHON:-python3}}
cd "$(dirname "$0")/.." || exit 1
so=$(ls llm_kernels/_C*.so 2> /dev/null | head -n 1)
echo "CC=${CC:-} CXX=${CXX:-}"
for c in "${CXX:-c++}" g++ /usr/bin/g++; do
  command -v "$c" > /dev/null && echo "$c: $("$c" --version | head -n 1)"
done
"$PY" -c "import torch; print('torch:', '; '.join(l.strip() for l in torch.__config__.show().splitlines()[1:3]))"
# A library built against a newer libstdc++ than the one the process loads is not supported by
# GCC (only the reverse is); the two versions side by side:
echo "libstdc++ of the compiler: $(readlink -f "$("${CXX:-c++}" -print-file-name=libstdc++.so.6)")"
"$PY" -c "import torch, os; print('libstdc++ loaded with torch:', sorted({os.path.realpath(l.split()[-1]) for l in open('/proc/self/maps') if 'libstdc++' in l}))"
if [ -n "$so" ]; then
  readelf -d "$so" | grep NEEDED
  ldd "$so" | grep -E 'stdc|gomp|gcc_s'
  echo "C++ runtime symbols defined inside $so: $(nm -D --defined-only "$so" | grep -cE '__cxa_|_Unwind_')"
fi
echo "cpus with avx512f: $(grep -c avx512f /proc/cpuinfo)"
exec "$PY" -X faulthandler tests/bad_input_matrix.py cuda --device cpu
