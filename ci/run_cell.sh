#!/usr/bin/env bash
# One cell of the CI matrix: install dsv32 for a backend and run its tests.
#   bash ci/run_cell.sh cpu          the CPU suite (device-marked tests skip with the reason; the Triton kernels run on
#                                    the interpreter; the ROCm / Ascend adapters against fakes checked against the
#                                    real aiter / torch_npu packages; a dry-run install of each extra)
#   bash ci/run_cell.sh aot-compile  every Triton kernel launch compiled for gfx942, gfx950, sm80, sm90, sm100, sm120
#                                    on this CPU machine (fails when any target stops compiling)
#   bash ci/run_cell.sh cuda         NVIDIA runners: the suite with the tests marked `cuda`
#   bash ci/run_cell.sh rocm         AMD runners:    the suite with the tests marked `rocm`
#   bash ci/run_cell.sh ascend       Ascend runners: the suite with the tests marked `ascend`
# Device tests skip with the reason when the hardware is absent, so a mislabelled runner shows up as skips.
set -euo pipefail
cell="${1:-cpu}"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
case "$cell" in
  cpu|aot-compile)
    # The CPU wheel first: a bare `torch` requirement would pull several GB of CUDA wheels.
    "$py" -m pip install -q torch==2.13.0
    "$py" -m pip install -q -e ".[test]"
    if [ "$cell" = cpu ]; then
      exec "$py" -m pytest -q
    fi
    exec "$py" -m dsv32.backends.triton.aot --json "${AOT_REPORT:-aot-compile.json}"
    ;;
  cuda|rocm|ascend)
    # The runner image provides the vendor torch build (and torch_npu on Ascend); the extra adds the vendor kernels.
    "$py" -m pip install -q -e ".[test,$cell]"
    exec "$py" -m pytest -q
    ;;
  *)
    echo "unknown CI cell '$cell' (cpu, aot-compile, cuda, rocm, ascend)" >&2
    exit 2
    ;;
esac
