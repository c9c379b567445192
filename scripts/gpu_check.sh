#!/usr/bin/env bash
# Everything of issue 13 that needs a GPU, in one run that fits in 10 minutes on one GPU (H200 class):
#   1. the suite's CUDA tests (compiled == eager bit for bit under Triton; a ZSQ iteration on CUDA)
#   2. the latency benchmark on CUDA (Figure 5 on GPU; GranQ's speed-up over the iterative method;
#      --check: exit 1 if a latency target is missed)
#   3. a slice of --preset paper (s/iter, peak memory, projected hours per Table 3 row, fold_bn off/on)
# All output goes to one results folder (default runs/gpu_check_<UTC time>); SUMMARY.txt lists it.
#
#   bash scripts/gpu_check.sh              # on a machine with a CUDA device
#   bash scripts/gpu_check.sh --dry-run    # anywhere: print the plan and check the imports, run nothing heavy
#   bash scripts/gpu_check.sh --out DIR
# Environment: PYTHON (default .venv/bin/python, else python3); step limits T_TESTS, T_LATENCY, T_SLICE (s).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT="runs/gpu_check_$(date -u +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
T_TESTS=${T_TESTS:-180}
T_LATENCY=${T_LATENCY:-240}
T_SLICE=${T_SLICE:-150}

STEP_TESTS=("$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_repro_cuda.py -k cuda)
STEP_LATENCY=("$PYTHON" benchmarks/fake_quant_latency.py --device cuda --bits 3 --iterative all --iterative-reps 2
              --check --json "$OUT/latency_cuda.json")
STEP_FIG_FWD=("$PYTHON" benchmarks/figure5.py "$OUT/latency_cuda.json" --mode fwd --out "$OUT/figure5_cuda_fwd.png")
STEP_FIG_GRAD=("$PYTHON" benchmarks/figure5.py "$OUT/latency_cuda.json" --mode fwdgrad --out "$OUT/figure5_cuda_fwdgrad.png")
STEP_SLICE=("$PYTHON" benchmarks/paper_slice.py --device cuda --rows cifar10,cifar100 --bits 3 --fold-bn off,on
            --iters 20 --warmup 5 --json "$OUT/paper_slice_cuda.json")

echo "gpu_check: results folder $OUT (python: $PYTHON)"
echo "plan (limit per step; total <= $((T_TESTS + T_LATENCY + T_SLICE + 60)) s):"
echo "  1. [${T_TESTS}s] ${STEP_TESTS[*]}"
echo "  2. [${T_LATENCY}s] ${STEP_LATENCY[*]}"
echo "     then ${STEP_FIG_FWD[*]}"
echo "     and  ${STEP_FIG_GRAD[*]}"
echo "  3. [${T_SLICE}s] ${STEP_SLICE[*]}"

if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: checking imports and entry points (nothing is timed)"
  "$PYTHON" - <<'EOF' || exit 1
import importlib, sys
for name in ("torch", "matplotlib", "pytorchcv", "granq_ao", "granq_ao.functional", "granq_ao.zsq",
             "granq_ao.integrations.torch_ao.frozen_bn"):
    importlib.import_module(name)
import torch
print(f"  imports ok: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
EOF
  for script in benchmarks/fake_quant_latency.py benchmarks/figure5.py benchmarks/paper_slice.py; do
    "$PYTHON" "$script" --help > /dev/null || { echo "  FAILED: $script --help"; exit 1; }
    echo "  $script --help ok"
  done
  "$PYTHON" -m pytest -q --collect-only -p no:cacheprovider tests/test_repro_cuda.py > /dev/null \
    || { echo "  FAILED: collecting tests/test_repro_cuda.py"; exit 1; }
  echo "  tests/test_repro_cuda.py collects"
  echo "dry run done: nothing ran on a GPU"
  exit 0
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; use --dry-run" >&2
  exit 3
fi
mkdir -p "$OUT"
{
  date -u
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/environment.txt" 2>&1

status=0
run_step() {  # name, limit, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "  $name: exit $rc after $((SECONDS - start)) s (log $OUT/$name.log)" | tee -a "$OUT/SUMMARY.txt"
  [ $rc -eq 0 ] || status=1
}
echo "gpu_check $(date -u) commit $(git rev-parse --short HEAD 2>/dev/null)" > "$OUT/SUMMARY.txt"
run_step tests_cuda "$T_TESTS" "${STEP_TESTS[@]}"
run_step latency_cuda "$T_LATENCY" "${STEP_LATENCY[@]}"
if [ -f "$OUT/latency_cuda.json" ]; then
  run_step figure5_fwd 60 "${STEP_FIG_FWD[@]}"
  run_step figure5_fwdgrad 60 "${STEP_FIG_GRAD[@]}"
fi
run_step paper_slice "$T_SLICE" "${STEP_SLICE[@]}"
tail -n 3 "$OUT/tests_cuda.log" >> "$OUT/SUMMARY.txt"
grep -A 12 "^targets" "$OUT/latency_cuda.log" >> "$OUT/SUMMARY.txt" 2>/dev/null
grep "s/iter" "$OUT/paper_slice.log" >> "$OUT/SUMMARY.txt" 2>/dev/null
echo "results in $OUT:"; ls -1 "$OUT"
cat "$OUT/SUMMARY.txt"
exit $status
