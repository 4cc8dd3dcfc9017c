#!/usr/bin/env bash
# Packs what a lent GPU machine lacks into .device/ (ignored by git), here, before the call:
#  - mirror/: ML-1M from the local mirror of upstream (../shared/data does not travel; MovieLens
#    may not be redistributed, so this copy lives only in the ignored folder);
#  - whl/: implicit (BPR-MF) and pydantic for the image's Python 3.12 (it has torch, pandas,
#    pyarrow, matplotlib, pytest, PyYAML, but neither of these nor Ray).
# Then, with the device tool, one call:
#   run(command="bash benchmarks/gpu_session.sh all", carry=[".device"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=${RAYSWEEP_MIRROR:-../shared/data}
rm -rf .device && mkdir -p .device/mirror/ml-1m .device/whl
cp "$mirror"/ml-1m/ml-1m.txt.gz .device/mirror/ml-1m/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/whl implicit==0.7.3 pydantic==2.13.4 pydantic_core==2.46.4 annotated_types==0.8.0 typing_inspection==0.4.5
du -sh .device
