"""megaclm.utils.launch_env: the rank of a task that `srun` started without a launcher's RANK.

The environments are the SLURM variables recorded on SLURM 22.05 (job 1, 2 nodes x 2 tasks): the batch
script's shell, and task 3 of the job step `srun` started from it.
"""
import pytest

from megaclm.utils.errors import UserError
from megaclm.utils.launch_env import rank_env_from_slurm

BATCH = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
STEP_TASK_3 = {**BATCH, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
               "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2"}
RENDEZVOUS = {"MASTER_ADDR": "n1", "MASTER_PORT": "29611"}


def test_a_task_of_a_multi_task_step_takes_its_rank_from_slurm():
    env = {**STEP_TASK_3, **RENDEZVOUS}
    line = rank_env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert line.startswith("rank 3 of 4 from SLURM job step 1.0") and "n1:29611" in line


def test_a_launchers_rank_wins():
    """deepspeed's launch.py, torchrun or the sbatch script's MODE=srun set RANK: nothing changes."""
    env = {**STEP_TASK_3, **RENDEZVOUS, "RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert rank_env_from_slurm(env) is None
    assert (env["RANK"], env["WORLD_SIZE"]) == ("1", "8")


@pytest.mark.parametrize("env", [BATCH, {**STEP_TASK_3, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, {}],
                         ids=["batch-script", "one-task-step", "no-slurm"])
def test_one_process_stays_a_world_of_one(env):
    """A python run by the batch script itself (the allocation's SLURM_NTASKS=4 but no job step), a
    one-task step, or no SLURM: the single-process fallback applies, nothing is refused."""
    env = dict(env)
    assert rank_env_from_slurm(env) is None
    assert "RANK" not in env and "WORLD_SIZE" not in env


@pytest.mark.parametrize("given", [{}, {"MASTER_ADDR": "n1"}])
def test_a_multi_task_step_without_rendezvous_is_refused(given):
    env = {**STEP_TASK_3, **given}
    with pytest.raises(UserError) as e:
        rank_env_from_slurm(env)
    missing = "MASTER_PORT is" if given else "MASTER_ADDR and MASTER_PORT are"
    assert str(e.value).startswith(f"this process is task 3 of 4 in SLURM job step 1.0 but {missing} not set, "
                                   "so the 4 tasks would train as 4 independent runs: export MASTER_ADDR")
    assert "RANK" not in env
