#!/usr/bin/env bash
# Every GPU check and measurement of issue 16 in one call, for a GPU machine lent for minutes:
#
#     bash pipelines/gpu_checks.sh OUT            # OUT: where the figures go (JSON + markdown)
#
# 1. the CUDA tests (marker gpu): torch candidates on CUDA equal the CPU's, nvJPEG within 2 grey
#    levels of libjpeg-turbo on every shared JPEG slide (the decoder alone and the reader using it),
#    Reinhard on CUDA, the fast paths;
# 2. candidate extraction on the device against the CPU path (pipelines/bench_candidates.py);
# 3. the decode limits: libjpeg-turbo threads against batched nvJPEG (benchmark --reader-only);
# 4. the 20,000² slide end to end with the torch candidates, nvJPEG in the reader and GPU batch sizes,
#    and a torch.profiler trace of one more run (b20k/profile/trace.json.gz);
# 5. with WSI_GPU_LARGE=1 also the 70,000² (4.9-gigapixel) slide, the issue's goal (it takes the
#    longest: its synthesis alone is minutes).
# Each step writes under OUT and a failing step does not stop the others; the exit status is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash pipelines/gpu_checks.sh OUT}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
failed=0
step() {
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)" | tee -a "$OUT/steps.log"
  else
    echo "   FAILED ($((SECONDS - t0)) s), see $name.log" | tee -a "$OUT/steps.log"
    failed=$((failed + 1))
  fi
}
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
step gpu-tests "$PY" -m pytest -q -m gpu -p no:cacheprovider
step candidates "$PY" pipelines/bench_candidates.py --device cuda --batch 32 --out "$OUT/bench-cand"
step decode "$PY" pipelines/benchmark.py --device cuda --reader-only --size 20000 --out "$OUT/b20k-decode"
step e2e-20k "$PY" pipelines/benchmark.py --device cuda --localize-batch 32 --classify-batch 512 \
  --no-peer --size 20000 --candidates torch --profile --out "$OUT/b20k"
if [ "${WSI_GPU_LARGE:-0}" = 1 ]; then
  step e2e-70k "$PY" pipelines/benchmark.py --device cuda --localize-batch 32 --classify-batch 512 \
    --no-peer --size 70000 --candidates torch --out "$OUT/b70k"
fi
rm -f "$OUT"/b*/bench-*.tiff  # the synthetic slides: large, and remade from their seed
exit "$failed"
