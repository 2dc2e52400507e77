#!/usr/bin/env bash
# The first GPU run: the headline numbers from a bare H100/H200 in at most 8 minutes.
#
#   bash bench/gpu_session.sh            # build, gpu tests, the five benchmarks
#   bash bench/gpu_session.sh --full     # also the torch.compile providers (slower)
#   bash bench/gpu_session.sh --dry-run  # the same plan at tiny shapes on CPU (CI)
#   bash bench/gpu_session.sh --extra    # a second call (<= 5 min): compiled decode,
#                                          packed attention, estimate vs measured memory
#
# The lent machine has torch, triton, pytest but no network and no .venv: its own
# python is used and the package is installed editable without dependencies, once.
# Without nvcc the extension is built CPU-only (GAE then runs its C++ kernel).
#
# Plan, each step under its own `timeout` (seconds), in order of importance:
#   build 90 | pytest -m gpu tests/ops 100 | token_logprobs 60 | linear logprobs 90 |
#   PPO loss 30 | GAE 20 | PPO step 90                                   (= 480 s = 8 min)
# (the caps sum to 8 minutes; each benchmark measures "ours" first, so a step cut by its
# cap still returns the headline rows)
# Every benchmark appends each row as soon as it is measured, and results are copied to
# $OUT after every step, so a run stopped at any point returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
full=0
dry=0
extra=0
for arg in "$@"; do
  case "$arg" in
    --full) full=1 ;;
    --dry-run) dry=1 ;;
    --extra) extra=1 ;;
    *) echo "usage: $0 [--full] [--dry-run] [--extra]" >&2; exit 2 ;;
  esac
done

OUT_DIR=${OUT:-/tmp/fastrlhf-gpu}
if [ "$dry" = 1 ]; then
  # tiny shapes on CPU, rows kept apart from bench/results (which holds real runs)
  PY=${PYTHON:-.venv/bin/python}
  OUT_DIR=${OUT:-$(mktemp -d)}
  export CUDA_VISIBLE_DEVICES=""
  export FASTRLHF_BENCH_RESULTS="$OUT_DIR/results"
  SIZE=--tiny
  T=(120 300 120 120 120 120 300)  # the CPU is slower at everything; shapes are tiny
else
  export FASTRLHF_BENCH_RESULTS="$PWD/bench/results"
  SIZE=""
  T=(90 100 60 90 30 20 90)
fi
COMPILED=""
[ "$full" = 1 ] && COMPILED=--compiled
mkdir -p "$OUT_DIR" "$FASTRLHF_BENCH_RESULTS"
LOG="$OUT_DIR/session.log"
status=0
start=$(date +%s)

copy_out() {  # after every step: the rows and the log so far
  [ "$OUT_DIR/results" = "$FASTRLHF_BENCH_RESULTS" ] || cp -r "$FASTRLHF_BENCH_RESULTS" "$OUT_DIR/" 2>/dev/null
  return 0
}

step() {  # step NAME SECONDS CMD...: run under its own timeout, log, copy results out
  local name=$1 secs=$2
  shift 2
  echo "== $name (timeout ${secs}s, +$(($(date +%s) - start))s)" | tee -a "$LOG"
  timeout --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "!! $name: exit $rc" | tee -a "$LOG"; status=1; }
  copy_out
}

build() {
  if [ "$dry" = 1 ]; then  # the worktree's venv has the extension built in place
    $PY -c "import torch, fastrlhf._C" && return 0
    $PY setup.py -q build_ext --inplace
    return
  fi
  local cuda=0
  command -v nvcc >/dev/null 2>&1 && cuda=1
  [ "$cuda" = 0 ] && echo "nvcc not found: building the extension CPU-only"
  FASTRLHF_BUILD_CUDA=$cuda $PY -m pip install -q --no-deps --no-build-isolation -e . || return 1
  $PY -c "import torch, fastrlhf._C; print(torch.cuda.get_device_name(), 'torch', \
torch.__version__, 'CUDA GAE:', torch._C._dispatch_has_kernel_for_dispatch_key(\
'fastrlhf::packed_gae', 'CUDA'))"
}

step build "${T[0]}" bash -c "$(declare -f build); PY=$PY dry=$dry build" || true
if [ "$extra" = 1 ]; then
  # The second plan, after the headline one: GPU-only benchmarks of the compiled decode
  # step (issue 18), the packed attention paths (issue 21) and the memory estimate
  # against torch.cuda.max_memory_allocated (issue 17). 90 + 90 + 90 + 30 s.
  if [ "$dry" = 1 ]; then
    echo "--extra measures GPU-only paths; nothing to dry-run on CPU" | tee -a "$LOG"
  else
    step rollout 90 $PY -m bench.bench_rollout --decode --rep 2
    step attention 90 $PY -m bench.bench_attention
    step estimate 90 $PY -m fastrlhf.estimate.calibrate --model Qwen2.5-0.5B \
      --out "$FASTRLHF_BENCH_RESULTS/estimate.jsonl"
  fi
else
  if [ "$dry" = 1 ]; then
    # the plan's test step on CPU: the kernel-launch tests (no GPU), not the slow suite
    step pytest "${T[1]}" $PY -m pytest -q -p no:cacheprovider tests/ops/test_kernel_launch.py
  else
    step pytest-gpu "${T[1]}" $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/ops
  fi
  step token_logprobs "${T[2]}" $PY -m bench.bench_token_logprobs $SIZE $COMPILED
  step linear_logprobs "${T[3]}" $PY -m bench.bench_linear_logprobs $SIZE $COMPILED
  step ppo_loss "${T[4]}" $PY -m bench.bench_ppo_loss $SIZE $COMPILED
  step gae "${T[5]}" $PY -m bench.bench_gae $SIZE
  if [ "$dry" = 1 ]; then
    step ppo_step "${T[6]}" $PY -m bench.bench_ppo_step --tiny
  else
    step ppo_step "${T[6]}" $PY -m bench.bench_ppo_step --quick
  fi
fi
echo "done in $(($(date +%s) - start))s, status $status; results in $OUT_DIR" | tee -a "$LOG"
copy_out
exit "$status"
