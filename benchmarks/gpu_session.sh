#!/usr/bin/env bash
# Every GPU figure the issues ask for, in two device calls of about 6-8 minutes each (estimated
# from ANCHORS.md's H100 epochs; 15 minutes of device time in all, so make the second call at
# once, while the machine is warm, with timeout_s about 560 each). Prepare .device/ first (benchmarks/device_bundle.sh), carry it, and run
#   bash benchmarks/gpu_session.sh speed    # GPU tests, s/epoch eager and compiled, chunked CE, packing
#   bash benchmarks/gpu_session.sh table2   # ML-1M + Beauty Table 2 as raysweep.train processes on one card
# Each step's output lands in $OUT (what the device tool brings back: at most 8 files) as it ends.
# DEVICE=cpu QUICK=1 runs the same steps on tiny shapes: a check of this script on a CPU machine.
set -uo pipefail
part=${1:?usage: gpu_session.sh speed|table2}
OUT=${OUT:-results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export RAYSWEEP_MIRROR=$PWD/.device/mirror RAYSWEEP_DATA_DIR=/tmp/raysweep-data
DEVICE=${DEVICE:-cuda}
if [ -n "${QUICK:-}" ]; then
  speed=(--steps 3 --only beauty-sasrec-bce) compiled=(--steps 3 --only beauty-sasrec-bce)
  chunked=(--positions-scale 0.02) packing=(--ks 1 2 --epochs 1 --dataset synthetic-chains --loss ce)
  table2=(--datasets synthetic-chains --max-epochs 1 --concurrent 2)
else
  # torch.compile with CUDA graphs: the eager step is launch-bound (ANCHORS.md).
  speed=(--epochs 2) compiled=(--epochs 2 --only beauty-sasrec+3000)
  chunked=() packing=(--ks 1 2 4 8 --epochs 2) table2=(--concurrent 4)
fi
# The image lacks implicit (BPR-MF) and pydantic: install the carried wheels, only if missing.
if ! python3 -c "import implicit, pydantic" 2>/dev/null && compgen -G ".device/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() {  # step NAME COMMAND...: run, keep its output in $OUT/NAME.txt, say how long it took
  local name=$1 began=$SECONDS
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - began)) s" | tee -a "$OUT/$name.txt"
}
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
case $part in
  speed)
    step gpu_tests python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
    step speed python3 benchmarks/speed.py --device "$DEVICE" "${speed[@]}"
    step speed_compiled python3 benchmarks/speed.py --device "$DEVICE" --compile reduce-overhead "${compiled[@]}"
    step chunked_ce python3 benchmarks/chunked_ce.py --device "$DEVICE" "${chunked[@]}"
    step packing python3 benchmarks/packing.py --device "$DEVICE" "${packing[@]}"
    ;;
  table2)
    rm -rf /tmp/table2-one-card
    step table2 python3 benchmarks/one_card.py --device "$DEVICE" --out /tmp/table2-one-card "${table2[@]}"
    cp /tmp/table2-one-card/results.parquet "$OUT/table2_results.parquet"
    ;;
  *) echo "unknown part $part (speed or table2)" >&2; exit 2 ;;
esac
