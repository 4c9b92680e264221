#!/usr/bin/env bash
# GPU verification (on a bare GPU machine with PyTorch and Triton; the tests and the ops fit one 10-minute call,
# the models another: STAGES="tests ops", then STAGES=models;
# no network): installs carried wheels (from .whl/, if any), optionally builds mamba-ssm's CUDA extension from a
# carried sdist (in parallel with the tests), runs the gpu-marked tests, benchmarks every op (each under its own
# time limit) and every registered model, and writes logs, JSON and Markdown tables to $OUT (default gpu_out/).
#
#   OUT=gpu_out bash scripts/gpu_check.sh                 # everything
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh           # small sizes (a smoke run)
#   OPS="scan swa" MODELS="gru" bash scripts/gpu_check.sh # a subset
#   STAGES=models MODELS=hamt MODEL_SEQ_LENS="1024 4096 16384" TOKENS_PER_STEP=16384 NO_REFERENCE=1 \
#     bash scripts/gpu_check.sh                          # cost per token at equal work per step (batch N // L)
#   STAGES="tests ops" bash scripts/gpu_check.sh         # some of the stages: tests ops models (default all three)
#   STAGES=models MODELS=atlas_mag COMPILE=1 COMPILE_MODE=reduce-overhead bash scripts/gpu_check.sh  # compile rows
#                                                        # too (COMPILE=1), replayed as CUDA graphs
#   STAGES=emma bash scripts/gpu_check.sh                # EMMA's long-context recipe: optimized training to the end,
#                                                        # then the reference on the same config for EMMA_REF_STEPS (1)
#   STAGES=emma EMMA_IMPLS=reference EMMA_REF_TIMEOUT=560 bash scripts/gpu_check.sh  # the reference alone (one call)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
build_pid=""
sdist=$(compgen -G ".whl/mamba_ssm-*.tar.gz" | head -n 1)
if [ -n "$sdist" ] && [ "${MAMBA_BUILD:-1}" = "1" ]; then
  # mamba-ssm's CUDA extension, for sm_90 only (its setup.py targets nine architectures otherwise).
  rm -rf /tmp/mamba && mkdir -p /tmp/mamba && tar xzf "$sdist" -C /tmp/mamba && src=$(ls -d /tmp/mamba/mamba_ssm-*)
  python3 - "$src/setup.py" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
text = re.sub(r'\n( *)cc_flag\.append\("-gencode"\)\n\s*cc_flag\.append\("arch=compute_(?!90,)\d+,code=sm_\d+"\)',
              r"\n\1pass", text)
open(path, "w").write(text)
PY
  (cd "$src" && MAMBA_FORCE_BUILD=TRUE MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/mamba_build.log" 2>&1) &
  build_pid=$!
  export PYTHONPATH=$src:$PYTHONPATH
fi
quick=()
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && quick=(--quick)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"

wait_for_mamba() {  # once: the ops and the comparison tests want mamba-ssm's kernel built
  [ -z "$build_pid" ] && return
  timeout "${MAMBA_WAIT:-120}" tail --pid="$build_pid" -f /dev/null
  ls /tmp/mamba/mamba_ssm-*/selective_scan_cuda*.so > /dev/null 2>&1 && echo "mamba-ssm extension built" \
    || { echo "mamba-ssm extension not built (see mamba_build.log)"; tail -n 5 "$OUT/mamba_build.log"; }
  build_pid=""
}

STAGES=${STAGES:-tests ops models}
stage() { [[ " $STAGES " == *" $1 "* ]]; }
tests_rc=0
if stage tests; then
echo "== gpu-marked tests"
# --durations: a stalled or slow test shows in gpu_tests.log (the seventh session's two calls stalled at 115 of 118)
timeout "${GPU_TEST_TIMEOUT:-300}" python3 tests/run.py -m gpu -q -p no:cacheprovider -n 4 --continue-on-collection-errors \
  --durations=15 \
  --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -n 40
if [ -n "$build_pid" ]; then
  wait_for_mamba
  # with the extension importable: our reference against mamba-ssm's selective_scan_ref (a CPU test, so no `-m gpu`)
  # and the CUDA scan tests, whose default dispatch is now mamba-ssm's kernel
  python3 tests/run.py -q -p no:cacheprovider tests/test_ssm.py -k "mamba or test_cuda_scan" 2>&1 | tail -n 5 \
    | tee -a "$OUT/gpu_tests.log"
fi
fi

if stage ops; then
echo "== op benchmarks"
for op in ${OPS:-$(python3 scripts/bench.py --list | grep -v _sweep)}; do  # the *_sweep tuning runs only when named
  case "$op" in scan|scan_sweep) wait_for_mamba ;; esac  # the peer row and the default branch need the build
  # per-op limits: GPU_OP_TIMEOUT_<op> (deq, hopfield and titans time slow references and autotuning peers)
  limit_var="GPU_OP_TIMEOUT_$op"; case "$op" in deq|hopfield|titans|scan_sweep|titans_sweep|omega_sweep|bind_sweep) default=150 ;; *) default=50 ;; esac
  # each row also goes to stderr as it is measured ("# row: ..."): kept in the log, left out of the tables
  timeout "${!limit_var:-${GPU_OP_TIMEOUT:-$default}}" python3 scripts/bench.py --op "$op" --device cuda "${quick[@]}" \
    --json "$OUT/bench_op_$op.json" 2> >(tee -a "$OUT/bench_progress.log" >&2) | grep -v "^# memarch" \
    | tee -a "$OUT/bench_ops.md" \
    || echo "op $op: timed out or failed" | tee -a "$OUT/bench_ops.md"
done
fi
if stage models; then
echo "== model benchmarks"
seq_lens=()
[ -n "${MODEL_SEQ_LENS:-}" ] && seq_lens=(--seq-lens $MODEL_SEQ_LENS)
for m in ${MODELS:-$(python3 -c "from training.registry import MODELS; print(' '.join(sorted(MODELS)))")}; do
  # REF_LENS_<model>="256": where the reference loop is too slow to time at 2048 (per-token cost is flat in L)
  ref_var="REF_LENS_$m"; ref_lens=(); [ -n "${!ref_var:-}" ] && ref_lens=(--ref-seq-lens ${!ref_var})
  timeout "${GPU_MODEL_TIMEOUT:-150}" python3 scripts/bench.py --model "$m" --device cuda "${quick[@]}" \
    $([ "${COMPILE:-0}" = "1" ] || echo --no-compile) ${COMPILE_MODE:+--compile-mode $COMPILE_MODE} \
    "${seq_lens[@]}" "${ref_lens[@]}" ${NO_REFERENCE:+--no-reference} \
    ${TOKENS_PER_STEP:+--tokens-per-step $TOKENS_PER_STEP} --repeat 3 \
    --json "$OUT/bench_model_$m.json" 2> >(tee -a "$OUT/bench_progress.log" >&2) | grep -v "^# memarch" \
    | tee -a "$OUT/bench_models.md" \
    || echo "model $m: timed out or failed" | tee -a "$OUT/bench_models.md"
done
fi
if stage emma; then
echo "== EMMA emma_n8_len1024 (bf16 autocast): optimized to the end, reference for ${EMMA_REF_STEPS:-1} step(s)"
for impl in ${EMMA_IMPLS:-optimized reference}; do
  steps=(); [ "$impl" = reference ] && steps=(--max-steps "${EMMA_REF_STEPS:-1}" --set train.eval_batches=1)
  limit=$([ "$impl" = reference ] && echo "${EMMA_REF_TIMEOUT:-420}" || echo "${EMMA_TIMEOUT:-400}")
  timeout "$limit" python3 scripts/train.py --impl "$impl" --config configs/emma_n8_len1024.yaml \
    --set train.autocast=bf16 "${steps[@]}" --out "$OUT/emma_$impl" --no-progress > "$OUT/emma_$impl.log" 2>&1 \
    || echo "emma $impl: timed out or failed (see emma_$impl.log)"
  rm -f "$OUT/emma_$impl/checkpoint.pt"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for impl in ("optimized", "reference"):
    path = pathlib.Path(sys.argv[1]) / f"emma_{impl}" / "summary.json"
    s = json.loads(path.read_text()) if path.exists() else {}
    print(f"{impl:>10}: steps {s.get('steps')}  val_accuracy {s.get('val_accuracy')}  "
          f"tokens/s {s.get('train_tokens_per_s')}  peak MiB {s.get('peak_memory_mib')}")
PY
fi
echo "gpu tests exit code: $tests_rc"
exit "$tests_rc"
