#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one device call that fits the per-call limit (600 s)
# and leaves a 15-minute session a few minutes for the machine's start:
#   run(command="bash benchmarks/gpu_session.sh all", carry=[".device"], timeout_s=600)
# or, for more time in Table 2, two calls, the second made at once (a machine stays warm only
# 30 s after a call, and a fresh start costs minutes of the same 15):
#   run(command="bash benchmarks/gpu_session.sh speed", carry=[".device"], timeout_s=320)
#   run(command="bash benchmarks/gpu_session.sh table2", carry=[".device"], timeout_s=450)
# Table 2 replays each step as a CUDA graph if a graphed SASRec+ 100 trial learns the planted
# order here first (GRAPHS=auto, 40 s at most); GRAPHS=1 or GRAPHS=0 decides without the check.
# Prepare .device/ first (benchmarks/device_bundle.sh). Each part ends within its BUDGET
# seconds (speed 280, table2 420, all 580); its steps run in the order of what the speed issue
# gates, each with its own cap; a step cut by its cap keeps what it printed (one_card.py
# reports the trials that finished). Each step's output lands in $OUT/NAME.txt as it runs.
# DEVICE=cpu QUICK=1 runs the same steps on tiny shapes: a check of this script on a CPU machine.
set -uo pipefail
part=${1:?usage: gpu_session.sh speed|table2|all}
case $part in speed) default=280 ;; table2) default=420 ;; all) default=580 ;; *) echo "unknown part $part" >&2; exit 2 ;; esac
BUDGET=${BUDGET:-$default}
deadline=$((SECONDS + BUDGET))
OUT=${OUT:-results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export RAYSWEEP_MIRROR=$PWD/.device/mirror RAYSWEEP_DATA_DIR=/tmp/raysweep-data
DEVICE=${DEVICE:-cuda}
if [ -n "${QUICK:-}" ]; then
  speed=(--steps 3 --only beauty-sasrec-bce)
  chunked=(--positions-scale 0.02) packing=(--ks 1 2 --epochs 1 --dataset synthetic-chains --loss ce)
  table2=(--datasets synthetic-chains --max-epochs 1 --concurrent 2)
else
  speed=(--epochs 2)
  chunked=() packing=(--ks 1 2 4 8 --epochs 2) table2=(--concurrent 4)
fi
# The image lacks implicit (BPR-MF) and pydantic: install the carried wheels, only if missing.
if ! python3 -c "import implicit, pydantic" 2>/dev/null && compgen -G ".device/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

capped() {  # capped SECONDS COMMAND...: run it in its own process group; TERM the group at the cap, KILL 5 s later
  local cap=$1 pid dog rc
  shift
  setsid "$@" &
  pid=$!
  (sleep "$cap" && kill -TERM -- "-$pid" && sleep 5 && kill -KILL -- "-$pid") >/dev/null 2>&1 &
  dog=$!
  wait "$pid"
  rc=$?
  pkill -P "$dog" 2>/dev/null
  kill "$dog" 2>/dev/null
  return "$rc"
}

step() {  # step NAME CAP COMMAND...: at most CAP seconds (less if the budget is nearly spent), output in $OUT/NAME.txt
  local name=$1 cap=$2 began=$SECONDS left=$((deadline - SECONDS))
  shift 2
  ((cap > left)) && cap=$left
  if ((cap < 15)); then
    echo "== $name: not run, the session's budget is spent" | tee "$OUT/$name.txt"
    return
  fi
  echo "== $name (at most $cap s): $*"
  capped "$cap" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  local how="exit $rc"
  ((rc == 143 || rc == 137)) && how="cut at its cap"
  echo "== $name: $how after $((SECONDS - began)) s" | tee -a "$OUT/$name.txt"
}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  graphs=(--cuda-graphs)  # the eager step is launch-bound (ANCHORS.md): each step as one CUDA graph
else
  graphs=()  # (CUDA graphs need CUDA: on the CPU this step repeats the eager one)
fi
python3 -c "import torch; print('torch', torch.__version__)"
if [ "$part" != table2 ]; then
  step gpu_tests 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
  step speed 90 python3 benchmarks/speed.py --device "$DEVICE" "${speed[@]}"
  step speed_graphs 80 python3 benchmarks/speed.py --device "$DEVICE" "${graphs[@]}" "${speed[@]}"
fi
if [ "$part" != speed ]; then
  GRAPHS=${GRAPHS:-auto}
  if [ "$GRAPHS" = auto ] && [ "$DEVICE" = cuda ]; then
    step graphs_check 40 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
      -k "cuda_graphs_trial and sampled_ce"
    GRAPHS=0
    grep -q "1 passed" "$OUT/graphs_check.txt" && GRAPHS=1
  fi
  [ "$GRAPHS" = 1 ] && table2+=(--cuda-graphs)
  echo "== table2 with CUDA graphs: $([ "$GRAPHS" = 1 ] && echo yes || echo no)"
  step chunked_ce 60 python3 benchmarks/chunked_ce.py --device "$DEVICE" "${chunked[@]}"
  rm -rf /tmp/table2-one-card
  # Table 2 takes what is left but 60 s, which packing gets (more, if Table 2 ends early).
  step table2 $((deadline - SECONDS - 60)) python3 benchmarks/one_card.py --device "$DEVICE" --out /tmp/table2-one-card "${table2[@]}"
  cp /tmp/table2-one-card/results.parquet "$OUT/table2_results.parquet" 2>/dev/null
  cp /tmp/table2-one-card/report/figure1.png "$OUT/table2_figure1.png" 2>/dev/null
  step packing 120 python3 benchmarks/packing.py --device "$DEVICE" "${packing[@]}"
fi
