#!/bin/bash
# Submit slurm/pretrain_multinode.sbatch with the node size from one number. From the repository root:
#   NODES=4 GPUS_PER_NODE=8 bash slurm/submit.sh [pretrain_gpt.py flags]               # 4 x 8 GPUs, 32 ranks
#   NODES=2 GPUS_PER_NODE=2 CPU_ONLY=1 bash slurm/submit.sh [pretrain_gpt.py flags]    # test mode, 4 CPU ranks
#
#   NODES          nodes (default 1)
#   GPUS_PER_NODE  ranks (SLURM tasks) per node, and the GPUs asked for on each (default 8)
#   CPU_ONLY=1     test mode: no GPUs asked for; the ranks train on CPU (gloo). Tries the script, the cluster
#                  and a config before a GPU run.
#   CPUS_PER_TASK  cores per rank (default 12; 1 with CPU_ONLY=1); the ranks' OMP_NUM_THREADS
# The sbatch script's own variables (MODE, CONFIG, SAVE, PRETRAINED, PYTHON, MASTER_ADDR, MASTER_PORT) pass through to the
# job; other sbatch options through sbatch's variables: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT,
# SBATCH_OUTPUT, ... Prints sbatch's "Submitted batch job <id>".
set -euo pipefail
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ "${CPU_ONLY:-0}" = 1 ]; then
    GPUS=0 CPUS=${CPUS_PER_TASK:-1}
else
    GPUS=$GPUS_PER_NODE CPUS=${CPUS_PER_TASK:-12}
fi
exec sbatch --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS" --cpus-per-task="$CPUS" \
    "$(dirname "$0")/pretrain_multinode.sbatch" "$@"
