#!/usr/bin/env bash
# One command for a session that has a GPU (H100/H200; no internet needed), run from the repository root:
#
#   bash benchmarks/gpu_session.sh                # <= ~8 min of device time (every part is time-limited)
#   bash benchmarks/gpu_session.sh --cpu-dry-run  # the same parts on the CPU with tiny models (plumbing)
#
# Parts (each in its own process with its own time limit; one failing or timing out never loses the
# others' results, and the fast-paths tool reports the images it finished when its limit stops it):
#   1. fastpaths-eager:   python -m ntt.tools.fastpaths at paper size (SAM2 Hiera-L + DINOv2 ViT-L/14, 32x32 grid,
#                         RANDOM weights): parity, parity rerun, bf16, fp16, tf32, one decoder call
#   2. fastpaths-compile: the same for torch.compile alone and the GPU goal's combination
#   3. bench:             python -m ntt.tools.bench --device cuda --sam2 sam2_hiera_l --dinov2 vitl14
#   4. parity-gpu:        pytest -m gpu tests/test_parity.py (CUDA, TF32 off; skips without the fixture)
# Output: everything under $OUT if set, else benchmarks/gpu-session-<UTC time>/: one log per part, the
# tools' json/md files, env.txt and summary.txt (part, exit code, seconds). Exit code 0 iff every part passed.
# Python: $PY if set, else .venv/bin/python, else python3; it needs torch (CUDA build), sam2, dinov2 and
# ntt's dependencies (make setup TORCH= keeps an installed CUDA torch). The parts call python directly,
# not make, so that no `make setup` (pip, internet) is triggered.
set -u
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_session.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac

DEST="${OUT:-benchmarks/gpu-session-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$DEST"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d shared ] && export NTT_SHARED="${NTT_SHARED:-$PWD/shared}"
DATA_ROOT="${TMPDIR:-/tmp}/ntt-gpu-session-data"   # the synthetic test images (generated; not in $DEST)

if [ "$DRY" = 1 ]; then
  DEV=(--device cpu --sam2 tiny_random --dinov2 tiny_random --grid 4 --max-images 2 --no-progress
       --data-root "$DATA_ROOT")
  EAGER_MODES=parity,parity_rerun,bf16,fp16,tf32,one_batch
  COMPILE_MODES=parity,parity_rerun   # torch.compile takes minutes on 2 CPU cores: not in the dry run
  BENCH=(--quick)
  T_EAGER=150; T_COMPILE=120; T_BENCH=90; T_PARITY=60
else
  DEV=(--device cuda --sam2 sam2_hiera_l --dinov2 vitl14 --grid 32 --max-images 3 --no-progress
       --data-root "$DATA_ROOT")
  EAGER_MODES=parity,parity_rerun,bf16,fp16,tf32,one_batch
  COMPILE_MODES=parity,compile,combo
  BENCH=(--device cuda --sam2 sam2_hiera_l --dinov2 vitl14 --repeats 5)
  T_EAGER=130; T_COMPILE=190; T_BENCH=110; T_PARITY=60
fi

SUMMARY="$DEST/summary.txt"
: > "$SUMMARY"
FAILED=0

run_part() {  # name, seconds, command...
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$DEST/$name.log"
  t0=$(date +%s)
  timeout -k 20 "$limit" "$@" >> "$DEST/$name.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || FAILED=1
  printf '%-18s rc=%-4s %5ss%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" \
    "$([ "$rc" = 124 ] && echo '  (time limit: partial results)')" | tee -a "$SUMMARY"
}

{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $([ "$DRY" = 1 ] && echo cpu-dry-run || echo gpu)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "python: $PY"
  echo "loadavg: $(cat /proc/loadavg 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  timeout 60 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())" 2>&1
} > "$DEST/env.txt"
cat "$DEST/env.txt"

run_part fastpaths-eager "$T_EAGER" "$PY" -m ntt.tools.fastpaths "${DEV[@]}" --modes "$EAGER_MODES" \
  --out "$DEST" --tag eager
run_part fastpaths-compile "$T_COMPILE" "$PY" -m ntt.tools.fastpaths "${DEV[@]}" --modes "$COMPILE_MODES" \
  --out "$DEST" --tag compile
run_part bench "$T_BENCH" "$PY" -m ntt.tools.bench "${BENCH[@]}" --out "$DEST"
run_part parity-gpu "$T_PARITY" "$PY" -m pytest -q -s -p no:cacheprovider -m gpu tests/test_parity.py

echo "results in $DEST"
cat "$SUMMARY"
exit "$FAILED"
