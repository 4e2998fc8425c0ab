#!/usr/bin/env bash
# The test suite, tier by tier (see tests/README.md). Leaves no DeepSpeed shm buffers behind.
set -uo pipefail
PY=${1:-python}
cleanup() { rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true; }
trap cleanup EXIT
"$PY" -m pytest -q -p no:cacheprovider tests/unit tests/distributed tests/integration tests/gpu
