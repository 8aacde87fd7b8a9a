#!/usr/bin/env bash
# One command when a GPU is at hand: every GPU check and benchmark of fastkd, in order, in <= 8 min.
#
#   bash bench/gpu_check.sh --prepare   # on a machine with the package index: download the wheels
#   bash bench/gpu_check.sh             # on one H100/H200 with a CUDA torch, no network needed
#   bash bench/gpu_check.sh --dry-run   # anywhere: every step but the GPU work (CPU stand-ins)
#
# Steps and their time budgets (each step is killed at its budget; total 500 s = 8 min 20 s):
#   1. environment (nvidia-smi, versions)                                 30 s
#   2. install the prepared wheels (peers) into a private site dir        25 s
#   3. the GPU-marked tests: pytest -m gpu tests (109 tests)              140 s
#   4. compute-sanitizer (memcheck) on a small subset: every backend once  60 s
#      on a small shape, fwd+bwd, top-k and dense (bench/sanitize_case.py)
#   5. the benchmark at the main shapes with the peers, the model's bound 150 s
#      beside every figure: python -m bench --set gpu-main --reps 5 (the
#      default fused head beside the Triton epilogues: fastkd-chunked-triton)
#   6. bench/step.py: a training step of a Qwen2.5-1.5B-shaped student    80 s
#   7. the table of RESULTS.md from this run's JSON (bench/report.py)      15 s
# Everything goes to bench/results/gpu-check-<date>/ (logs, JSON, CSV, PNG) and, when $OUT is set
# (the device machine's return folder), is copied there too. The script stops at the first wrong
# result (a failed test, a sanitizer error, an implementation whose loss or gradients differ from
# the naive result) and says which; a step that runs out of its budget is reported and the script
# goes on. --dry-run multiplies every budget by $FASTKD_DRY_SLACK (default 10): a loaded CPU
# machine is far slower than the GPU machine's 16 cores at the same Python work.
#
# Wheels: --prepare downloads, without dependencies, the peers fastkd is compared with and that
# a bare CUDA image lacks (liger-kernel, cut-cross-entropy) for CPython 3.12 / manylinux x86-64
# into $FASTKD_WHEELS (default .whl/ at the repo root, git-ignored; a few hundred KB). fastkd itself
# runs from this checkout (PYTHONPATH), and its CUDA extension builds on first use (nvcc, ninja).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${FASTKD_WHEELS:-$ROOT/.whl}
PEERS=(liger-kernel cut-cross-entropy)
MODE=run
for arg in "$@"; do
  case $arg in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $arg (see --help)"; exit 2 ;;
  esac
done

if [[ $MODE == prepare ]]; then
  mkdir -p "$WHEELS"
  for peer in "${PEERS[@]}"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$peer" || { echo "could not download $peer"; exit 1; }
  done
  ls -la "$WHEELS"; du -sh "$WHEELS"
  echo "prepared: carry $WHEELS to the GPU machine with the checkout, then run bash bench/gpu_check.sh"
  exit 0
fi

STAMP=$(date -u +%Y-%m-%dT%H%M)
RUN=$ROOT/bench/results/gpu-check-$STAMP
[[ $MODE == dry ]] && RUN=$(mktemp -d /tmp/fastkd-gpu-check-dry.XXXX)
mkdir -p "$RUN"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SITE=/tmp/fastkd-gpu-check-site
T0=$SECONDS
STATUS=0
SLACK=1
[[ $MODE == dry ]] && SLACK=${FASTKD_DRY_SLACK:-10}

say() { echo "[gpu_check $(( SECONDS - T0 ))s] $*" | tee -a "$RUN/summary.txt"; }
finish() {
  say "done in $(( SECONDS - T0 )) s, status $STATUS; everything in $RUN"
  if [[ -n ${OUT:-} && -d ${OUT:-} && $MODE == run ]]; then
    tar -czf "$OUT/gpu-check-$STAMP.tar.gz" -C "$(dirname "$RUN")" "$(basename "$RUN")"
    cp "$RUN/summary.txt" "$OUT/" 2>/dev/null
  fi
  exit $STATUS
}
# step NAME BUDGET_S CMD...: run with a time limit, log to $RUN/NAME.log; stop on a wrong result
step() {
  local name=$1 budget=$(( $2 * SLACK )); shift 2
  say "step $name (budget ${budget}s): $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$budget" "$@" > >(tee "$RUN/$name.log") 2>&1
  local rc=$?
  if (( rc == 124 || rc == 137 )); then
    say "step $name: TIMED OUT after ${budget}s (not a wrong result; going on)"
    return 0
  fi
  if (( rc != 0 )); then
    STATUS=1
    say "step $name: WRONG or FAILED (exit $rc) after $(( SECONDS - start ))s: see $RUN/$name.log"
    tail -n 25 "$RUN/$name.log"
    finish
  fi
  say "step $name: ok in $(( SECONDS - start ))s"
}

if [[ $MODE == dry ]]; then
  say "DRY RUN: every step but the GPU work; CPU stand-ins where a step needs the GPU"
  step environment 30 bash -c 'python3 -c "import torch, fastkd; print(torch.__version__, fastkd.__file__)";
    command -v nvidia-smi || echo "no nvidia-smi (expected here)";
    command -v compute-sanitizer || echo "no compute-sanitizer (expected here)"'
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    step install 25 python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
  else
    say "step install: no wheels in $WHEELS (run --prepare first); skipped in the dry run"
  fi
  step gpu-tests 140 python3 -m pytest -q -m gpu --collect-only tests
  step sanitize 60 python3 bench/sanitize_case.py --dry-run
  step bench 120 python3 -m bench --set cpu --models cpu-softcap --loss topk --reps 1 --no-memory --stop-on-wrong \
       --impl fastkd-torch naive-fp32 liger cut-cross-entropy --out "$RUN"
  step step 80 python3 bench/step.py --tiny --batches 1 --steps 1 --seq 128 --out "$RUN"
  cp bench/RESULTS.md "$RUN/RESULTS.md"
  step report 15 python3 -m bench.report --results "$RUN"/bench-*.json --write "$RUN/RESULTS.md"
  finish
fi

step environment 30 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.version.cuda)"; command -v nvcc compute-sanitizer'
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  step install 25 python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH=$PYTHONPATH:$SITE
else
  say "no wheels in $WHEELS: the peers that are missing will be reported as such (run --prepare where pip works)"
fi
step gpu-tests 140 python3 -m pytest -q -x -m gpu tests
step sanitize 60 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
     python3 bench/sanitize_case.py
step bench 150 python3 -m bench --set gpu-main --reps 5 --stop-on-wrong --out "$RUN"
step step 80 python3 bench/step.py --batches 1 2 4 --steps 2 --out "$RUN"
if compgen -G "$RUN/bench-*.json" > /dev/null; then
  step report 15 python3 -m bench.report --results "$RUN"/bench-*.json --write bench/RESULTS.md
  cp bench/RESULTS.md "$RUN/"
fi
finish
