#!/usr/bin/env bash
# The command for an H100/H200 machine (no network): build the extension in place, run the
# cuda-marked tests, `llm-kernels verify --device cuda`, a kernel profile of one GPT training
# step, the standard benchmark suite with the bit-for-bit determinism check and the rest of the
# test suite on the GPU, and print a summary table LAST. Every step has a timeout inside one
# overall budget; a failed step never stops the next ones. Correctness comes first: on a fresh
# machine Triton's JIT compilation (4-8 s per kernel variant) makes the whole check take about
# 10 minutes, more than one call leaves time for, so it is made to run as two calls:
#
#   bash bench/gpu_check.sh              # call 1 (7.5 min): build, a probe of the C++ ops'
#                                        # error paths, cuda tests, verify, profile, host
#                                        # overhead, then the benchmark with what is left
#   BENCH_RESUME=gpu-resume/bench.json CUDA_RESUME=gpu-resume/cuda_finished.txt \
#     bash bench/gpu_check.sh --bench    # call 2 (6 min): the build kept from call 1 (same
#                                        # sources), the cuda tests call 1 did not finish (both
#                                        # files copied to gpu-resume/, which git ignores:
#                                        # name it in the call's carry), memcheck and
#                                        # racecheck over the CUDA C++ kernels' small-shape
#                                        # tests, the benchmark resumed from call 1's
#                                        # bench.json, the launch-parameter sweeps
#                                        # (bench/sweep.py; the warp-specialized attention
#                                        # kernels' first, in a step of their own), the
#                                        # tests of what this machine
#                                        # built (C++ ops on CPU tensors, the Triton
#                                        # interpreter), verify again (call 1's may be cut
#                                        # short), then the rest of the tests
#   bash bench/gpu_check.sh --sanitize   # build, cuda tests, verify, then compute-sanitizer
#                                        # (memcheck, racecheck) over a small subset of the
#                                        # cuda tests instead of the benchmarks
#
# Writes at most 8 files into ${OUT:-./gpu-results}: gpu_check.log, test_failures.txt (each
# failing test the moment it fails, so a cut-off run still names them), cuda_finished.txt (the
# cuda tests that ended), verify.json (written also when cut off), bench.csv, bench.json,
# bench.png, summary.json. Then, on the development
# machine:
#   python bench/summarize.py --out gpu-results --results-dir bench/results
# Two calls fit a 15-minute lease: call 1 with timeout_s 480, then call 2 at once (the machine
# stays warm for 30 s: the build and the Triton cache are reused) with timeout_s 390.
# Environment: GPU_CHECK_BUDGET (seconds; default 450, 360 with --bench), PYTHON (default
# python3), BENCH_RESUME, TEST_WORKERS (pytest-xdist workers, default 6), TRITON_CACHE_DIR
# (default .triton-cache in the repository: ignored by git, so a second call on the still-warm
# machine reuses the kernels the first compiled), CUDA_RESUME, SANITIZE_K (a pytest -k expression choosing
# the sanitized tests), SANITIZE_PER_FILE.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd) || exit 1
OUT=${OUT:-$REPO/gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$REPO" || exit 1
LOG=$OUT/gpu_check.log
: > "$LOG"
PY=${PYTHON:-python3}
MODE=full
[ "${1:-}" = "--sanitize" ] && MODE=sanitize
[ "${1:-}" = "--bench" ] && MODE=bench
DEFAULT_BUDGET=450
[ "$MODE" = bench ] && DEFAULT_BUDGET=360
BUDGET=${GPU_CHECK_BUDGET:-$DEFAULT_BUDGET}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$REPO/.triton-cache}
export LLM_KERNELS_FAILURE_LOG=$OUT/test_failures.txt
: > "$LLM_KERNELS_FAILURE_LOG"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export MPLBACKEND=Agg

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(date -u +%H:%M:%S) +$(elapsed)s] $*" | tee -a "$LOG"; }

# slot MAX RESERVE: seconds a step may take: at most MAX, leaving RESERVE for the later steps.
slot() {
  local left=$(( BUDGET - $(elapsed) - $2 ))
  echo $(( left < $1 ? left : $1 ))
}

# step NAME SECONDS CMD...: run CMD under `timeout` (SIGINT first, so pytest and the bench
# write what they have), append its output to the log, print its last lines and a status
# line; returns CMD's exit code (124: timed out).
step() {
  local name=$1 secs=$2
  shift 2
  if [ "$secs" -lt 10 ]; then
    say "SKIP $name: the time budget is spent"
    echo "@@step $name status=skipped rc=- secs=0" >> "$LOG"
    return 125
  fi
  say "BEGIN $name (timeout ${secs}s)"
  echo "@@begin $name: $*" >> "$LOG"
  local offset began rc status
  offset=$(stat -c %s "$LOG")
  began=$(date +%s)
  timeout -s INT -k 20 "$secs" "$@" >> "$LOG" 2>&1
  rc=$?
  status=ok
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
  echo "@@step $name status=$status rc=$rc secs=$(( $(date +%s) - began ))" >> "$LOG"
  tail -c +"$(( offset + 1 ))" "$LOG" | grep -v '^@@' | tail -n "${TAIL_LINES:-6}" | sed 's/^/    | /'
  say "END $name: $status (rc=$rc, $(( $(date +%s) - began ))s)"
  return "$rc"
}

has_module() { "$PY" -c "import $1" > /dev/null 2>&1; }

# inner_budget SECONDS: the bench's own time budget inside a step of SECONDS, leaving it
# time for the determinism check's tail, the files and the plot.
inner_budget() {
  local b=$(( $1 - 25 ))
  [ "$b" -lt $(( $1 / 2 )) ] && b=$(( $1 / 2 ))
  echo "$b"
}

# ------------------------------------------------------------------------------ identity
COMMIT=$(git rev-parse --short=12 HEAD 2> /dev/null || cat COMMIT 2> /dev/null || echo unknown)
export LLM_KERNELS_COMMIT=$COMMIT
GPU=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null | head -n 1)
say "gpu_check ($MODE) on ${GPU:-no GPU found}, commit $COMMIT, budget ${BUDGET}s"
{
  echo "@@info mode=$MODE"
  echo "@@info gpu=${GPU:-none}"
  echo "@@info commit=$COMMIT"
  echo "@@info date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "@@info host_cpus=$(nproc)"
  timeout 60 "$PY" -c "import sys, torch; print('@@info python=' + sys.version.split()[0]); print('@@info torch=' + torch.__version__); import triton; print('@@info triton=' + triton.__version__)" 2>&1
  timeout 20 nvcc --version 2>&1 | tail -n 2
} >> "$LOG"

# ------------------------------------------------------------------------------ precompile
# Triton kernels compiled ahead into the cache the tests and the bench read (through the real
# launchers with a fake driver: no GPU involved), in the background on the cores the build
# leaves idle (its nvcc jobs are few); stopped before the steps that time anything. The
# package is not installed yet when they start (the build installs it), hence PYTHONPATH:
# without it every case failed to import llm_kernels and nothing was precompiled.
PRECOMPILE_PIDS=()
precompile_start() {
  local k n=${PRECOMPILE_SHARDS:-8}
  [ -e llm_kernels/kernels ] || ln -sfn ../kernels llm_kernels/kernels
  for k in $(seq 0 $(( n - 1 ))); do
    env -u TRITON_INTERPRET PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
      nice -n 10 "$PY" scripts/check_triton_compile.py --no-usage \
      --shard "$k/$n" > "/tmp/gpu-check-precompile-$k.log" 2>&1 &
    PRECOMPILE_PIDS+=("$!")
  done
  say "precompiling the Triton kernels in the background ($n processes)"
}
precompile_stop() {
  local compiled
  [ "${#PRECOMPILE_PIDS[@]}" -gt 0 ] || return 0
  kill "${PRECOMPILE_PIDS[@]}" 2> /dev/null
  wait "${PRECOMPILE_PIDS[@]}" 2> /dev/null
  PRECOMPILE_PIDS=()
  compiled=$(cat /tmp/gpu-check-precompile-*.log 2> /dev/null | grep -c '^ok ')
  echo "@@info precompiled=$compiled" >> "$LOG"
  say "precompile stopped after $compiled Triton kernel variants"
  if [ "$compiled" -eq 0 ]; then  # why: the first shard's last lines
    tail -n 25 /tmp/gpu-check-precompile-0.log 2> /dev/null | sed 's/^/    precompile | /' | tee -a "$LOG"
  fi
}
trap '[ "${#PRECOMPILE_PIDS[@]}" -gt 0 ] && kill "${PRECOMPILE_PIDS[@]}" 2> /dev/null' EXIT
[ "$MODE" = full ] && precompile_start

# ------------------------------------------------------------------------------ build
# Editable install: builds llm_kernels._C in place and maps llm_kernels.kernels/.bench.
# If the build fails, a pure-Python install keeps the Triton checks running.
# On a machine still warm from an earlier call the build of the same sources is kept: the
# stamp (EXT_BUILD_STAMP) holds the hash of setup.py and csrc/ the built extension came from.
export LLM_KERNELS_CUDA_ARCHS=${LLM_KERNELS_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
STAMP=${EXT_BUILD_STAMP:-llm_kernels/.ext-build-stamp}
SOURCES_HASH=$(cat setup.py csrc/* | sha256sum | cut -c1-16)-$LLM_KERNELS_CUDA_ARCHS
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SOURCES_HASH" ] \
    && "$PY" -c "import torch, llm_kernels._C, llm_kernels.kernels" > /dev/null 2>&1; then
  say "build: the extension of these sources is already built here: kept"
  echo "@@step build status=ok rc=0 secs=0" >> "$LOG"
elif step build "$(slot 210 95)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
  echo "$SOURCES_HASH" > "$STAMP"
else
  say "the extension did not build: installing pure Python so that the Triton checks still run"
  LLM_KERNELS_SKIP_EXT=1 step install-pure-python "$(slot 60 90)" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
if ! "$PY" -c "import llm_kernels.kernels, llm_kernels.bench" >> "$LOG" 2>&1; then
  say "llm_kernels.kernels is not importable after the install: linking kernels/ and bench/ into the package"
  ln -sfn ../kernels llm_kernels/kernels
  ln -sfn ../bench llm_kernels/bench
fi
if ! "$PY" -c "import torch, llm_kernels._C" >> "$LOG" 2>&1; then
  say "llm_kernels._C is not importable: building it in place"
  step build-inplace "$(slot 150 95)" "$PY" setup.py build_ext --inplace
fi
step backends 30 "$PY" -c "import llm_kernels as lk; print('@@info backends=' + ', '.join(n + (' ok' if ok else ' NO (' + why[:90] + ')') for n, (ok, why) in lk.available_backends().items()))"

# ------------------------------------------------------------------------------ steps
# The C++ ops' error paths on CPU tensors (the bad-input matrix of the cuda backend): a native
# crash there (seen once on this machine's build) prints the compiler and library facts, and
# with time left at the end, a backtrace from cuda-gdb.
NATIVE_CRASH=0
native_probe() {
  TAIL_LINES=30 step native-probe "$(slot 40 300)" bash scripts/native_probe.sh "$PY"
  [ $? -gt 128 ] && NATIVE_CRASH=1
}
native_backtrace() {
  [ "$NATIVE_CRASH" = 1 ] && command -v cuda-gdb > /dev/null || return 0
  TAIL_LINES=40 step native-backtrace "$(slot 90 150)" cuda-gdb -batch -ex run -ex bt \
    --args "$PY" tests/bad_input_matrix.py cuda --device cpu
}
# After a crash: the extension built again with the system's g++ (whose libstdc++ is the one the
# process loads), and the probe again. If that build passes, it stays for the later steps and
# the next call.
native_rebuild() {
  [ "$NATIVE_CRASH" = 1 ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ] || return 0
  [ "$(readlink -f "$(command -v "${CXX:-c++}")")" = "$(readlink -f /usr/bin/g++)" ] && return 0
  CC=/usr/bin/gcc CXX=/usr/bin/g++ step native-rebuild "$(slot 150 50)" \
    "$PY" setup.py build_ext --inplace || return 0
  TAIL_LINES=30 step native-probe-system-gxx "$(slot 40 0)" bash scripts/native_probe.sh "$PY"
}
# Launch-parameter sweeps (the CUDA attention's rows per warp, the Triton TMA reads, the decode
# split plan, the layer norm backward's grid): the data that chooses the kernels' settings. The
# warp-specialized attention kernels' sweep runs as a step of its own: they have never run on a
# GPU, and a hang there must not cost the other sweeps.
WS_SWEEP=attention_ws
sweep_ws_step() {
  TAIL_LINES=40 step sweep-ws "$(slot "$1" "$2")" "$PY" -m llm_kernels.bench.sweep --sweeps "$WS_SWEEP"
}
sweep_step() {
  local rest
  rest=$("$PY" -c "from llm_kernels.bench.sweep import SWEEPS; print(','.join(s for s in SWEEPS if s != '$WS_SWEEP'))")
  TAIL_LINES=80 step sweep "$(slot "$1" "$2")" "$PY" -m llm_kernels.bench.sweep ${rest:+--sweeps "$rest"}
}
# The CPU time each public op takes per call around its kernels, next to plain torch: the ops
# of a GPT training step first (its rows print as they are measured, so a cut keeps them), one
# config per Triton kernel (no autotuning: its compiles would take the step's time).
HOST_OVERHEAD_OPS=layer_norm,attention,feed_forward,cross_entropy,nn.LayerNorm,rms_norm,swiglu,softmax,decode,scaled_dot_product_attention
host_overhead_step() {
  TAIL_LINES=30 step host-overhead "$(slot "$1" "$2")" env LLM_KERNELS_AUTOTUNE=0 "$PY" \
    -m llm_kernels.bench.host_overhead --ops "$HOST_OVERHEAD_OPS" --repeat 5 --number 50
}
PYTEST_OPTS=(-q -rfE -p no:cacheprovider --continue-on-collection-errors)
TIMEOUT_OPT=()
has_module pytest_timeout && TIMEOUT_OPT=(--timeout=300)
XDIST=()
has_module xdist && XDIST=(-n "${TEST_WORKERS:-6}")

# cuda_tests MAX RESERVE / verify_step MAX RESERVE / ...: each step gets at most MAX seconds and
# leaves RESERVE for the steps after it.
# The cuda tests write the id of each one that ends to cuda_finished.txt, so that a time limit
# that cuts them short leaves the list of those still to run (cuda_leftover, in call 2).
cuda_tests() {
  : > "$OUT/cuda_finished.txt"
  step pytest-cuda "$(slot "$1" "$2")" env LLM_KERNELS_AUTOTUNE=0 \
    LLM_KERNELS_FINISHED_LOG="$OUT/cuda_finished.txt" "$PY" -m pytest -m cuda --durations=15 \
    "${PYTEST_OPTS[@]}" "${TIMEOUT_OPT[@]}" "${XDIST[@]}" tests
}
# With CUDA_RESUME (call 1's cuda_finished.txt): the cuda tests call 1 did not finish.
cuda_leftover() {
  [ -n "${CUDA_RESUME:-}" ] && [ -f "$CUDA_RESUME" ] || return 0
  local left=()
  mapfile -t left < <(timeout 60 "$PY" -m pytest -m cuda --co -q -p no:cacheprovider tests 2> /dev/null \
    | grep '::' | grep -vxF -f "$CUDA_RESUME")
  if [ "${#left[@]}" -eq 0 ]; then
    say "cuda tests: the earlier call finished every one"
    return 0
  fi
  say "cuda tests: ${#left[@]} not finished by the earlier call run now"
  step pytest-cuda-rest "$(slot "$1" "$2")" env LLM_KERNELS_AUTOTUNE=0 "$PY" -m pytest -m cuda \
    "${PYTEST_OPTS[@]}" "${TIMEOUT_OPT[@]}" "${XDIST[@]}" "${left[@]}"
}
verify_step() {
  step verify "$(slot "$1" "$2")" env LLM_KERNELS_AUTOTUNE=0 "$PY" -m llm_kernels verify --device cuda --progress --json "$OUT/verify.json"
}
# Where the training step's time goes, kernel by kernel and host versus device (issue 6).
# Triton last (its first steps compile its kernels), one config per kernel (no autotuning).
profile_step() {
  TAIL_LINES=40 step profile "$(slot "$1" "$2")" env LLM_KERNELS_AUTOTUNE=0 "$PY" \
    -m llm_kernels.bench.profile_step --providers torch-sdpa,lk-cuda,lk-triton --top 10
}
# The standard suite; with BENCH_RESUME (an earlier call's bench.json) it skips what that call
# measured. A kernel fault breaks the CUDA context: the bench then exits with 3 and a new
# process resumes from bench.json, the faulting (op, provider) excluded.
bench_step() {
  local args=(-m llm_kernels.bench --suite standard --csv "$OUT/bench.csv" --json "$OUT/bench.json"
              --plot-grid "$OUT/bench.png") resume=() secs rc attempt
  if [ -n "${BENCH_RESUME:-}" ] && [ -f "$BENCH_RESUME" ]; then
    cp "$BENCH_RESUME" "$OUT/bench.json" && resume=(--resume)
  fi
  secs=$(slot "$1" "$2")
  step bench "$secs" "$PY" "${args[@]}" "${resume[@]}" --time-budget "$(inner_budget "$secs")"
  rc=$?
  for attempt in 1 2 3 4 5; do
    [ "$rc" -eq 3 ] || break
    secs=$(slot "$1" "$2")
    [ "$secs" -ge 40 ] || break
    step bench "$secs" "$PY" "${args[@]}" --resume --time-budget "$(inner_budget "$secs")"
    rc=$?
  done
}
# The tests that depend on what this machine built or installed, not on a GPU: the C++ ops on
# CPU tensors and their error paths (the extension compiled by this machine's compiler) and
# Triton's interpreter under this machine's triton and numpy. Run before the rest of the suite.
CORE_TESTS=(tests/test_bad_input.py tests/test_cuda_backend.py tests/test_cuda_attention.py
            tests/test_interpreter_compat.py)
rest_core() {
  step pytest-rest-core "$(slot "$1" "$2")" \
    env LLM_KERNELS_AUTOTUNE=0 "$PY" -m pytest -m "not cuda" "${PYTEST_OPTS[@]}" "${TIMEOUT_OPT[@]}" "${XDIST[@]}" "${CORE_TESTS[@]}"
}
rest_tests() {
  local ignore=() t
  [ "${1:-}" = --after-core ] && { for t in "${CORE_TESTS[@]}"; do ignore+=(--ignore "$t"); done; shift; }
  step pytest-rest "$(slot "$1" "$2")" \
    env LLM_KERNELS_AUTOTUNE=0 "$PY" -m pytest -m "not cuda" "${PYTEST_OPTS[@]}" "${TIMEOUT_OPT[@]}" "${XDIST[@]}" "${ignore[@]}" tests
}
# Small-shape cuda tests of the CUDA C++ kernels only (attention with tensor cores, padded head
# dims, masks and flash-decoding; norms; softmax; feed-forward epilogues; cross-entropy's target check; no
# Triton JIT under the sanitizer): what the benchmark call has time to run under
# compute-sanitizer.
SANITIZE_LITE="test_cuda_attention and (tiny_shapes or padded_head_dims or test_cuda_masks or decode_small) or test_cuda_backend and (norm_flags_cuda or softmax_minus_inf_rows_cuda or feed_forward_odd_cuda or out_of_range_target_cuda)"
# sanitize_steps MEM_MAX MEM_RESERVE RACE_MAX RACE_RESERVE [K]: a subset of the cuda tests
# under compute-sanitizer's memcheck, then racecheck: the tests matching K (else SANITIZE_K),
# else the first SANITIZE_PER_FILE (1) tests of each kernel test file (not the model, training
# or torch.compile ones: too slow there).
sanitize_steps() {
  local tool select=() k=${5:-${SANITIZE_K:-}}
  tool=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2> /dev/null)
  if [ -z "$tool" ]; then
    say "compute-sanitizer not found (PATH, \$CUDA_HOME/bin): memcheck and racecheck not run"
    return
  fi
  local san=("$tool" --error-exitcode 99 --print-limit 20 --target-processes all)
  if [ -n "$k" ]; then
    select=(-k "$k" tests)
  else
    mapfile -t select < <(timeout 60 "$PY" -m pytest -m cuda --co -q -p no:cacheprovider tests 2> /dev/null \
      | grep '::' | grep -Ev '^tests/test_(compile|model|train|transformers|patch)' \
      | awk -F'::' -v k="${SANITIZE_PER_FILE:-1}" '{ if (n[$1]++ < k) print }' | head -n 16)
  fi
  if [ "${#select[@]}" -eq 0 ]; then
    say "no cuda tests collected: nothing to sanitize"
    return
  fi
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # exact allocations, so out-of-bounds is visible
  step memcheck "$(slot "$1" "$2")" "${san[@]}" --tool memcheck \
    "$PY" -m pytest -m cuda "${PYTEST_OPTS[@]}" "${TIMEOUT_OPT[@]}" "${select[@]}"
  step racecheck "$(slot "$3" "$4")" "${san[@]}" --tool racecheck \
    "$PY" -m pytest -m cuda "${PYTEST_OPTS[@]}" "${TIMEOUT_OPT[@]}" "${select[@]}"
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
}

case "$MODE" in
  full)
    native_probe
    cuda_tests 230 100
    verify_step 90 60
    precompile_stop
    profile_step 40 20
    host_overhead_step 30 5
    native_backtrace
    native_rebuild
    bench_step 200 5 ;;
  bench)
    cuda_leftover 60 290
    sanitize_steps 70 220 50 170 "$SANITIZE_LITE"
    bench_step 150 20
    sweep_ws_step 70 60
    sweep_step 110 10
    rest_core 60 5
    verify_step 60 5
    rest_tests --after-core 150 5 ;;
  sanitize)
    cuda_tests 100 215
    verify_step 45 200
    sanitize_steps 150 60 150 5 ;;
esac

# ------------------------------------------------------------------------------ summary
say "done in $(elapsed)s; summary (also in $OUT/summary.json):"
timeout 60 "$PY" bench/summarize.py --out "$OUT" --print
