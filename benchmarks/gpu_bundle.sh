#!/usr/bin/env bash
# Packs, into .gpu-bundle/ (ignored by git), what a GPU machine without internet access needs for
# benchmarks/gpu_session.sh:
#  - mirror/: ML-1M from a local mirror of the upstream files (RAYSWEEP_MIRROR, default
#    ../shared/data); MovieLens may not be redistributed, so this copy stays in the ignored folder;
#  - whl/: implicit (BPR-MF) and pydantic wheels for every CPython from 3.10 to 3.13 (whichever the
#    GPU machine has: pip there picks the wheels that match it), for an image that has torch,
#    pandas, pyarrow, matplotlib, pytest and PyYAML but neither of these (nor Ray). A part of
#    gpu_session.sh whose modules are still missing says "skipped: needs X".
# Copy the checkout with .gpu-bundle/ to the GPU machine, then run: bash benchmarks/gpu_session.sh all
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=${RAYSWEEP_MIRROR:-../shared/data}
rm -rf .gpu-bundle && mkdir -p .gpu-bundle/mirror/ml-1m .gpu-bundle/whl
cp "$mirror"/ml-1m/ml-1m.txt.gz .gpu-bundle/mirror/ml-1m/
for python in 3.10 3.11 3.12 3.13; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-bundle/whl implicit==0.7.3 pydantic==2.13.4 pydantic_core==2.46.4 annotated_types==0.8.0 \
    typing_inspection==0.4.5 typing_extensions==4.15.0
done
du -sh .gpu-bundle
