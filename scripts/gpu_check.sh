#!/usr/bin/env bash
# The GPU check (issue 21), in under 8 minutes on one GPU:
#   bash scripts/gpu_check.sh OUT_DIR
# from the repository root (fxclip need not be installed: PYTHONPATH=$PWD). Writes into OUT_DIR
# (flat, at most 6 files):
#   stages.log      what ran: versions, each stage's duration, exit status and output tail
#   tests.log       the rule-table and zoo conformance tests run on the GPU (FXCLIP_TEST_DEVICE)
#   rows.jsonl      raw benchmark rows, appended as each job finishes (kept if a later stage dies)
#   benchmark.json  {gpu, torch, commit, rows: [{model, batch, dtype, method, ms, vs_floor,
#                   speedup_over_naive, peak_mb, correct}], details}; benchmark.md, its table
# Stages, most important first, all inside one wall-clock budget (FXCLIP_GPU_CHECK_BUDGET s,
# default 450): wheels from .whl (if present), then the benchmark (python -m fxclip.tools.bench.gpu run:
# zoo at B=128, Hugging Face models at real width, zoo at B=1024, as parallel jobs that compile
# side by side and take turns on the GPU for their timed steps) with the conformance tests beside
# it, then the report. A stage past its time is killed; what finished is kept.
# Dry run on a CPU: FXCLIP_GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh /tmp/out (small models,
# tiny Hugging Face configs, a test subset; budget 1500 s).
# The commit measured: FXCLIP_COMMIT, else `git rev-parse HEAD`, else the file COMMIT.
# A rerun of some jobs: FXCLIP_GPU_CHECK_ONLY="hf_gpt2-float32 gpt-128" (parts of job names),
# FXCLIP_GPU_CHECK_MAX_HF Hugging Face jobs at once (default 3).
set -u
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
DEVICE=${FXCLIP_GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then QUICK=--quick; BUDGET=${FXCLIP_GPU_CHECK_BUDGET:-1500}; else QUICK=; BUDGET=${FXCLIP_GPU_CHECK_BUDGET:-450}; fi
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/fxclip-gpu-check.XXXXXX)
LOG="$OUT/stages.log"
: > "$LOG"
export PYTHONPATH=$PWD
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor-cache}
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
note() { echo "[$(elapsed) s] $*" >> "$LOG"; }
# stage NAME SECONDS OUTPUT_FILE CMD...: runs CMD with a time limit (cut to what the budget has
# left), appends its duration, status and output tail to stages.log
stage() {
  local name=$1 limit=$2 file=$3; shift 3
  local t; t=$(left); [ "$limit" -lt "$t" ] && t=$limit
  if [ "$t" -lt 5 ]; then note "$name: skipped (budget spent)"; return; fi
  local s; s=$(date +%s)
  timeout -k 5 "$t" "$@" > "$file" 2>&1
  local rc=$?
  note "$name: exit $rc after $(( $(date +%s) - s )) s (limit $t s)$([ $rc = 124 ] && echo ', TIMED OUT')"
  tail -n 15 "$file" | sed 's/^/    /' >> "$LOG"
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  stage wheels 60 "$WORK/wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
fi
COMMIT=${FXCLIP_COMMIT:-$(git rev-parse HEAD 2>/dev/null || cat COMMIT 2>/dev/null || echo unknown)}
export FXCLIP_COMMIT=$COMMIT
{
  echo "commit $COMMIT; device $DEVICE; budget $BUDGET s; $(nproc) CPUs"
  nvidia-smi -L 2>/dev/null
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
  for m in triton transformers peft opacus dp_accounting; do "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -1; done
} >> "$LOG"

# the conformance tests beside the benchmark (their small kernels barely disturb its medians)
TESTK="matches_reference or within_1e4 or per_example_kernel"
[ "$DEVICE" = cpu ] && TESTK="(matches_reference or within_1e4) and (mlp or small_cnn or linear_basic or conv2d_groups)"
( FXCLIP_TEST_DEVICE=$DEVICE stage tests 240 "$OUT/tests.log" nice -n 10 "$PY" -m pytest -q -p no:cacheprovider --timeout 120 \
    tests/test_zoo.py tests/test_rules_table.py -k "$TESTK" ) &
TESTS_PID=$!

# the benchmark: its own deadline 25 s before the budget's end leaves time for the report
stage bench $(( $(left) - 20 )) "$WORK/bench.log" "$PY" -m fxclip.tools.bench.gpu run "$WORK" "$OUT" --device "$DEVICE" --deadline $(( $(left) - 35 )) $QUICK ${FXCLIP_GPU_CHECK_ONLY:+--only $FXCLIP_GPU_CHECK_ONLY} ${FXCLIP_GPU_CHECK_MAX_HF:+--max-hf $FXCLIP_GPU_CHECK_MAX_HF}
cat "$WORK/bench.log" >> "$LOG"
stage report 20 "$WORK/report.log" "$PY" -m fxclip.tools.bench.gpu report "$OUT" --device "$DEVICE"
wait "$TESTS_PID"
note "done"
rm -rf "$WORK"
