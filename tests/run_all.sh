#!/usr/bin/env bash
# The test suite, tier by tier: unit (one process), distributed (gloo, spawned ranks compared with
# unsharded references), integration (the real deepspeed launcher, tiny models), fuzz (a fixed-seed sample
# of the layout fuzzer through tools/check_layout.py), cluster (slurm/ under a real SLURM on this machine;
# needs root and Debian's slurm-wlm + munge: `make slurm-install`), gpu (skip without CUDA).
# The launcher's ranks leave 66 MiB /dev/shm buffers behind: remove the ones this run created.
set -uo pipefail
PY=${1:-python}
before=$(ls /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true)
cleanup() {
    for f in /dev/shm/deepspeed_allreduce_buffer_*; do
        [ -e "$f" ] && ! grep -qxF "$f" <<<"$before" && rm -f "$f"
    done
    return 0
}
trap cleanup EXIT
"$PY" -m pytest -q -p no:cacheprovider --durations=40 tests/unit tests/distributed tests/integration tests/fuzz tests/cluster tests/gpu
