#!/usr/bin/env bash
# Every GPU figure in one run of about ten minutes, on a machine with a CUDA GPU (Ray not needed:
# trials run as `python -m raysweep.train` processes). Usage: bash benchmarks/gpu_session.sh all
# (or `speed`, `table2`, or `finish`). Steps, in order: the GPU tests, seconds per epoch eager and with CUDA
# graphs, chunked vs plain CE, Table 2 of ML-1M + Beauty on one card (benchmarks/one_card.py;
# each step replayed as a CUDA graph if a graphed SASRec+ trial first learns the planted order,
# GRAPHS=auto; GRAPHS=1 or 0 decides without the check), and several trials per card. Each part
# ends within its BUDGET seconds (speed 280, table2 420, all 580), each step within its own cap;
# a step cut by its cap keeps what it printed. Each step's output lands in $OUT/NAME.txt.
# `finish` (BUDGET 330) finishes the committed ML-1M and Beauty sweep runs on the card instead:
# each archive (docs/results/NAME/trials.parquet) unpacked, the trials its sweep file still lacks run
# side by side (benchmarks/one_card.py --grid-only), the records packed into $OUT/NAME_trials.parquet
# (a trial cut by the budget is left out; the next run of `finish` or the CPU sweep's --resume runs it).
# Without internet there, run benchmarks/gpu_bundle.sh first and copy .gpu-bundle/ along.
# DEVICE=cpu QUICK=1 runs the same steps on tiny shapes: a check of this script on a CPU machine.
set -uo pipefail
part=${1:?usage: gpu_session.sh speed|table2|all|finish}
case $part in speed) default=280 ;; table2) default=420 ;; all) default=580 ;; finish) default=330 ;; *) echo "unknown part $part" >&2; exit 2 ;; esac
BUDGET=${BUDGET:-$default}
deadline=$((SECONDS + BUDGET))
OUT=${OUT:-results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export RAYSWEEP_MIRROR=${RAYSWEEP_MIRROR:-$PWD/.gpu-bundle/mirror} RAYSWEEP_DATA_DIR=/tmp/raysweep-data
DEVICE=${DEVICE:-cuda}
if [ -n "${QUICK:-}" ]; then
  speed=(--steps 3 --only beauty-sasrec-bce)
  chunked=(--positions-scale 0.02) packing=(--ks 1 2 --epochs 1 --dataset synthetic-chains --loss ce)
  table2=(--datasets synthetic-chains --max-epochs 1 --concurrent 2)
else
  speed=(--epochs 2)
  chunked=() packing=(--ks 1 2 4 8 --epochs 2) table2=(--concurrent 4)
fi
# implicit (BPR-MF) and pydantic from the bundle's wheels, only if missing.
if ! python3 -c "import implicit, pydantic" 2>/dev/null && compgen -G ".gpu-bundle/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    --find-links .gpu-bundle/whl implicit pydantic pydantic_core annotated_types typing_inspection typing_extensions \
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

missing() {  # missing MODULE...: the Python modules of these that this python3 cannot import
  local m out=()
  for m in "$@"; do python3 -c "import $m" 2>/dev/null || out+=("$m"); done
  echo "${out[*]}"
}

step() {  # step NAME CAP NEEDS COMMAND...: at most CAP seconds (less if the budget is nearly spent),
  # output in $OUT/NAME.txt; NEEDS (comma-separated Python modules) missing: "skipped: needs X"
  local name=$1 cap=$2 needs=$3 began=$SECONDS left=$((deadline - SECONDS))
  shift 3
  local lacking
  lacking=$(missing ${needs//,/ })
  if [ -n "$lacking" ]; then
    echo "== $name: skipped: needs $lacking" | tee "$OUT/$name.txt"
    return
  fi
  ((cap > left)) && cap=$left
  if ((cap < 15)); then
    echo "== $name: not run, the script's time budget is spent" | tee "$OUT/$name.txt"
    return
  fi
  echo "== $name (at most $cap s): $*"
  capped "$cap" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  local how="exit $rc"
  ((rc == 143 || rc == 137)) && how="cut at its cap"
  echo "== $name: $how after $((SECONDS - began)) s" | tee -a "$OUT/$name.txt"
}

decide_graphs() {  # GRAPHS=auto: 1 if a graphed SASRec+ trial learns the planted order on this card
  GRAPHS=${GRAPHS:-auto}
  if [ "$GRAPHS" = auto ] && [ "$DEVICE" = cuda ]; then
    step graphs_check 40 pytest,torch,numpy,pandas,pyarrow,pydantic,yaml python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_gpu.py \
      -k "cuda_graphs_trial and sampled_ce"
    GRAPHS=0
    grep -q "1 passed" "$OUT/graphs_check.txt" && GRAPHS=1
  fi
  echo "== trials with CUDA graphs: $([ "$GRAPHS" = 1 ] && echo yes || echo no)"
}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  graphs=(--cuda-graphs)  # an eager step is launch-bound on a GPU: each step as one CUDA graph
else
  graphs=()  # (CUDA graphs need CUDA: on the CPU this step repeats the eager one)
fi
python3 -c "import torch; print('torch', torch.__version__)"
if [ "$part" = speed ] || [ "$part" = all ]; then
  step gpu_tests 110 pytest,torch,numpy,pandas,pyarrow,pydantic,yaml python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_gpu.py
  step speed 90 torch,numpy,pandas,pyarrow,pydantic,yaml python3 benchmarks/speed.py --device "$DEVICE" "${speed[@]}"
  step speed_graphs 80 torch,numpy,pandas,pyarrow,pydantic,yaml python3 benchmarks/speed.py --device "$DEVICE" "${graphs[@]}" "${speed[@]}"
fi
if [ "$part" = finish ]; then
  rm -rf /tmp/finish && mkdir -p /tmp/finish
  for name in ml-1m beauty; do
    python3 -m raysweep.archive unpack "docs/results/$name/trials.parquet" "/tmp/finish/$name" || exit 1
  done
  # ML-1M once, before the trials that share it read it
  python3 -c "from raysweep.core.data import get_dataset; get_dataset('ml-1m')" || exit 1
  # Both runs at once, each trial of both in a process of its own.
  both='python3 benchmarks/one_card.py sweeps/ml-1m.yaml --datasets ml-1m "$@" --concurrent "${ML1M_AT_ONCE:-9}" --out /tmp/finish/ml-1m &
    python3 benchmarks/one_card.py sweeps/beauty.yaml --datasets beauty "$@" --concurrent "${BEAUTY_AT_ONCE:-7}" --out /tmp/finish/beauty &
    wait'
  finish_args=(--grid-only --no-report --device "$DEVICE")  # (the report is rebuilt where the archive lands)
  decide_graphs
  [ "$GRAPHS" = 1 ] && finish_args+=(--cuda-graphs)
  step finish $((deadline - SECONDS - 20)) torch,numpy,pandas,pyarrow,pydantic,yaml bash -c "$both" finish "${finish_args[@]}"
  for name in ml-1m beauty; do
    python3 -m raysweep.archive pack "/tmp/finish/$name" "$OUT/${name}_trials.parquet"
  done
  exit 0
fi
if [ "$part" != speed ]; then
  decide_graphs
  [ "$GRAPHS" = 1 ] && table2+=(--cuda-graphs)
  step chunked_ce 60 torch,numpy,pandas,pyarrow,pydantic,yaml python3 benchmarks/chunked_ce.py --device "$DEVICE" "${chunked[@]}"
  rm -rf /tmp/table2-one-card
  # Table 2 takes what is left but 60 s, which packing gets (more, if Table 2 ends early).
  step table2 $((deadline - SECONDS - 60)) torch,numpy,pandas,pyarrow,pydantic,yaml python3 benchmarks/one_card.py --device "$DEVICE" --out /tmp/table2-one-card "${table2[@]}"
  cp /tmp/table2-one-card/results.parquet "$OUT/table2_results.parquet" 2>/dev/null
  cp /tmp/table2-one-card/report/figure1.png "$OUT/table2_figure1.png" 2>/dev/null
  step packing 120 torch,numpy,pandas,pyarrow,pydantic,yaml python3 benchmarks/packing.py --device "$DEVICE" "${packing[@]}"
fi
