#!/usr/bin/env bash
# GPU verification in one go (designed for one 10-minute call on a bare GPU machine with PyTorch and Triton,
# no network): installs carried wheels (from .whl/, if any), runs the gpu-marked tests, benchmarks every op
# and every registered model, and writes JSON + a Markdown table to $OUT (default gpu_out/).
#
#   OUT=gpu_out bash scripts/gpu_check.sh            # everything
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh      # small sizes (a smoke run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
quick=()
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && quick=(--quick)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$OUT/machine.txt"

echo "== gpu-marked tests"
timeout "${GPU_TEST_TIMEOUT:-240}" python3 tests/run.py -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
  2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== op benchmarks"
timeout "${GPU_BENCH_TIMEOUT:-200}" python3 scripts/bench.py --op all --device cuda "${quick[@]}" \
  --json "$OUT/bench_ops.json" 2>&1 | tee "$OUT/bench_ops.md"
echo "== model benchmarks"
timeout "${GPU_MODEL_TIMEOUT:-120}" python3 scripts/bench.py --model all --device cuda "${quick[@]}" \
  --json "$OUT/bench_models.json" 2>&1 | tee "$OUT/bench_models.md"
echo "gpu tests exit code: $tests_rc"
exit "$tests_rc"
