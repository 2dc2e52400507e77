#!/usr/bin/env bash
# The GPU checks in one or two calls on a lent GPU machine, which has torch, triton,
# transformers, numba, peft and pytest but no network (so no .venv: the machine's own
# python is used, and the package is installed editable without dependencies).
#
#   bash bench/gpu_session.sh test    # build the CUDA extension, run the gpu-marked tests
#   bash bench/gpu_session.sh bench   # every bench/bench_*.py at the issues' GPU shapes
#
# Logs and the appended bench/results/*.jsonl rows are copied to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/fastrlhf-gpu}
mkdir -p "$LOG"
what=${1:-test}

build() {
  FASTRLHF_BUILD_CUDA=1 $PY -m pip install -q --no-deps --no-build-isolation -e . \
    >"$LOG/build.log" 2>&1 || { tail -40 "$LOG/build.log"; exit 1; }
  $PY -c "import torch, fastrlhf._C; print(torch.cuda.get_device_name(), 'torch', \
torch.__version__, 'cuda kernel:', torch._C._dispatch_has_kernel_for_dispatch_key(\
'fastrlhf::packed_gae', 'CUDA'))"
}

case "$what" in
  test)
    build
    $PY -m pytest tests -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$LOG/pytest-gpu.log"
    status=${PIPESTATUS[0]}
    ;;
  bench)
    build
    status=0
    for f in bench/bench_*.py; do
      echo "== $f"
      timeout 300 $PY -m "bench.$(basename "$f" .py)" 2>&1 | tee -a "$LOG/bench.log" || status=1
    done
    ;;
  *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac
[ -n "${OUT:-}" ] && cp -r bench/results "$OUT/results" 2>/dev/null
exit "$status"
