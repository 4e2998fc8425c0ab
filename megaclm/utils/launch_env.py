"""The rank environment of a process that `srun` started without a launcher's RANK.

torch.distributed's env:// rendezvous reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The
deepspeed launcher on one node, torchrun and slurm/pretrain_multinode.sbatch's MODE=srun set them; `srun` alone
(DeepSpeed's slurm launcher runs `srun -n N python -u pretrain_gpt.py ...`) sets only SLURM's own in each task
of a job step: SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS, SLURM_STEP_ID. Without them each of the N tasks
would train alone, as a world of one, into the same --save. A python started directly in a batch script is no
task of a step: it has the allocation's SLURM_NTASKS and SLURM_PROCID=0 but no SLURM_STEP_ID (SLURM 22.05), so
it stays a world of one. MASTER_ADDR/MASTER_PORT are the job's to export (the sbatch script does).
"""
from __future__ import annotations

import os
from typing import MutableMapping

from megaclm.utils.errors import UserError


def rank_env_from_slurm(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK from a multi-task SLURM job step when no launcher did.

    Returns a line saying what was adopted (None if nothing was). A step of several tasks without
    MASTER_ADDR/MASTER_PORT is refused: its tasks could only train as independent worlds.
    """
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_STEP_ID" not in env:
        return None
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks <= 1:
        return None
    rank, step = env["SLURM_PROCID"], f"{env.get('SLURM_JOB_ID', '?')}.{env['SLURM_STEP_ID']}"
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise UserError(f"this process is task {rank} of {tasks} in SLURM job step {step} but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not set, so the {tasks} tasks would train as "
                        f"{tasks} independent runs: export MASTER_ADDR (the first node: `scontrol show hostnames "
                        "$SLURM_JOB_NODELIST | head -n 1`) and MASTER_PORT (a free port there) before srun, "
                        "or submit with slurm/submit.sh")
    env.update(RANK=rank, WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    return (f"rank {rank} of {tasks} from SLURM job step {step} (SLURM_PROCID, SLURM_STEP_NUM_TASKS, "
            f"SLURM_LOCALID); rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}")
