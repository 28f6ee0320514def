#!/usr/bin/env bash
# Every GPU check of fastguide in one command, <= 8 minutes on one H100/H200 (DESIGN.md section 6):
#
#   1. env       device, driver, versions (nvidia-smi, torch, triton)
#   2. tests     the gpu-marked tests (real kernels on CUDA tensors: large shapes, bf16, TF32,
#                determinism)
#   3. memcheck  compute-sanitizer --tool memcheck on small cases of every launcher
#                (tests/kernels/sanitizer_cases.py; caching allocator off so out-of-bounds
#                accesses inside pooled blocks are seen)
#   4. racecheck compute-sanitizer --tool racecheck on the same cases (shared-memory hazards)
#   5. bench     python -m fastguide bench --device cuda (W1-W4 against careful torch,
#                torch.compile and the naive code, with roofline ratios) at TF32, writing
#                benchmarks/results/bench_cuda_tf32.{json,md}
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--only STAGE[,STAGE...]]
#   --dry-run  run the CPU-possible parts instead (no GPU needed): collect the gpu tests, run the
#              sanitizer cases under TRITON_INTERPRET=1 without the sanitizer, check the bench CLI.
# Logs: benchmarks/results/gpu_check/<stage>.log, summary: benchmarks/results/gpu_check/summary.md
# (a dry run writes them under ${TMPDIR:-/tmp}/fastguide_gpu_check_dry). Python: $PYTHON, else the
# `python` on PATH (activate the environment first).
# Stage timeouts (seconds) can be overridden: GPU_CHECK_TIMEOUT_<STAGE>=<s> (e.g. ..._BENCH=300).
# Exit status: 0 when every stage that ran passed (a skipped stage, e.g. no compute-sanitizer, is
# reported and does not fail the run), 1 otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
DRY=0
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:?--only needs a stage list}; shift ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

# A real run's logs and summary are results (benchmarks/results/gpu_check/); a dry run's are not.
if [[ $DRY == 1 ]]; then LOGDIR=${TMPDIR:-/tmp}/fastguide_gpu_check_dry; else LOGDIR=$ROOT/benchmarks/results/gpu_check; fi
mkdir -p "$LOGDIR"
SUMMARY=$LOGDIR/summary.md
declare -a NAMES=() STATUS=() SECONDS_TAKEN=()
FAILED=0
START=$(date +%s)

timeout_of() {  # default timeout of a stage, overridable by GPU_CHECK_TIMEOUT_<STAGE>
  local var="GPU_CHECK_TIMEOUT_${1^^}"
  echo "${!var:-$2}"
}

wanted() {
  [[ -z "$ONLY" ]] && return 0
  [[ ",$ONLY," == *",$1,"* ]]
}

# run_stage NAME TIMEOUT CMD...: runs CMD under `timeout`, logs to $LOGDIR/NAME.log, records status.
run_stage() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local log=$LOGDIR/$name.log t0 rc
  t0=$(date +%s)
  echo "== $name (timeout ${limit}s): $*" | tee "$log"
  set +e
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  set -e
  local status
  case $rc in
    0) status=pass ;;
    124|137) status="TIMEOUT (${limit}s)"; FAILED=1 ;;
    *) status="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  NAMES+=("$name"); STATUS+=("$status"); SECONDS_TAKEN+=("$(( $(date +%s) - t0 ))")
  echo "-- $name: $status in $(( $(date +%s) - t0 ))s (log: ${log#"$ROOT"/})"
  if [[ $status != pass ]]; then tail -n 20 "$log" | sed 's/^/   | /'; fi
}

skip_stage() {
  wanted "$1" || return 0
  NAMES+=("$1"); STATUS+=("skipped: $2"); SECONDS_TAKEN+=(0)
  echo "-- $1: skipped ($2)"
}

find_sanitizer() {
  if command -v compute-sanitizer >/dev/null 2>&1; then command -v compute-sanitizer; return 0; fi
  local c
  for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-*; do
    [[ -n "$c" ]] || continue
    for p in "$c/bin/compute-sanitizer" "$c/compute-sanitizer/compute-sanitizer"; do
      if [[ -x "$p" ]]; then echo "$p"; return 0; fi
    done
  done
  return 1
}

ENV_PY='import torch, triton, platform
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda available:", torch.cuda.is_available(), "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "sm_%d%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
          "memory %.0f GiB" % (p.total_memory / 2**30))'

if [[ $DRY == 1 ]]; then
  echo "gpu_check.sh --dry-run: CPU-possible parts only (no GPU figures are produced)"
  run_stage env "$(timeout_of env 60)" "$PY" -c "$ENV_PY"
  run_stage tests "$(timeout_of tests 300)" bash -c \
    "'$PY' -m pytest -q -m gpu --collect-only tests && '$PY' -m pytest -q -m gpu --collect-only benchmarks"
  run_stage memcheck "$(timeout_of memcheck 600)" env TRITON_INTERPRET=1 FASTGUIDE_SKIP_AUTOTUNE=1 \
    "$PY" tests/kernels/sanitizer_cases.py --small
  if SAN=$(find_sanitizer); then echo "compute-sanitizer found: $SAN"; else echo "compute-sanitizer: not found here"; fi
  run_stage bench "$(timeout_of bench 120)" "$PY" -m fastguide bench --help
else
  run_stage env "$(timeout_of env 30)" bash -c "nvidia-smi || true; $PY -c '$ENV_PY'"
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to torch; use --dry-run on a CPU machine" >&2
    exit 1
  fi
  # The gpu-marked tests (compiled kernels on CUDA tensors; the first stage also fills Triton's cache).
  # (tests/ and benchmarks/ have their own conftest.py: two pytest runs, as the project's command.)
  run_stage tests "$(timeout_of tests 130)" bash -c \
    "'$PY' -m pytest -q -p no:cacheprovider -m gpu tests && '$PY' -m pytest -q -p no:cacheprovider -m gpu benchmarks"
  if SAN=$(find_sanitizer); then
    for tool in memcheck racecheck; do
      run_stage "$tool" "$(timeout_of "$tool" 65)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 FASTGUIDE_SKIP_AUTOTUNE=1 \
        "$SAN" --tool "$tool" --error-exitcode 3 --print-limit 20 "$PY" tests/kernels/sanitizer_cases.py --small
    done
  else
    skip_stage memcheck "compute-sanitizer not found on PATH, \$CUDA_HOME or /usr/local/cuda*"
    skip_stage racecheck "compute-sanitizer not found"
  fi
  run_stage bench "$(timeout_of bench 180)" "$PY" -m fastguide bench --device cuda --tf32 --budget 80 \
    --out benchmarks/results/bench_cuda_tf32.json --markdown benchmarks/results/bench_cuda_tf32.md
fi

{
  echo "# gpu_check.sh $( [[ $DRY == 1 ]] && echo '(dry run) ')$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "| stage | status | seconds |"
  echo "| --- | --- | --- |"
  for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECONDS_TAKEN[$i]} |"; done
  echo
  echo "total: $(( $(date +%s) - START )) s; logs in ${LOGDIR#"$ROOT"/}/"
} >"$SUMMARY"
echo
cat "$SUMMARY"
exit "$FAILED"
