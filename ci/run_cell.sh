#!/usr/bin/env bash
# One cell of the CI matrix: install dsv32 for a backend and run its tests.
#   bash ci/run_cell.sh cpu      the CPU suite (device-marked tests skip with the reason)
#   bash ci/run_cell.sh cuda     NVIDIA runners: the CPU suite plus tests marked `cuda`
#   bash ci/run_cell.sh rocm     AMD runners:    the CPU suite plus tests marked `rocm`
#   bash ci/run_cell.sh ascend   Ascend runners: the CPU suite plus tests marked `ascend`
# Device tests skip with the reason when the hardware is absent, so a mislabelled runner shows up as skips.
set -euo pipefail
cell="${1:-cpu}"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
case "$cell" in
  cpu)
    # The CPU wheel first: a bare `torch` requirement would pull several GB of CUDA wheels.
    "$py" -m pip install -q torch==2.13.0
    "$py" -m pip install -q -e ".[test]"
    exec "$py" -m pytest -q
    ;;
  cuda|rocm|ascend)
    # The runner image provides the vendor torch build; the extra adds the vendor kernels.
    "$py" -m pip install -q -e ".[test,$cell]"
    exec "$py" -m pytest -q
    ;;
  *)
    echo "unknown CI cell '$cell' (cpu, cuda, rocm, ascend)" >&2
    exit 2
    ;;
esac
