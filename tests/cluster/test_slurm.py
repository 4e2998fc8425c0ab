"""slurm/submit.sh + slurm/pretrain_multinode.sbatch under a real SLURM (Debian's slurm-wlm 22.05 on this host,
tests/cluster/local_slurm.py), in test mode (CPU_ONLY=1), on a tiny GPT (2 layers, hidden 64), 2 ranks:

  one node (the host, 2 ranks) MODE=deepspeed: DeepSpeed's slurm launcher runs `srun -n 2 python -u
      pretrain_gpt.py`; the tasks form one world of 2 from SLURM's variables (the rendezvous at the node's own
      name, a free port) and train to the end: the reference losses, job COMPLETED. A bare `srun -n 2
      pretrain_gpt.py` without MASTER_ADDR/MASTER_PORT is refused by every task (exit 2), nothing trained; a
      python the batch script runs itself (SLURM_NTASKS=2 but no job step) is a world of one.
  two emulated nodes n1, n2 (two slurmd on this host, one rank each, MASTER_ADDR=127.0.0.1), MODE=srun and
      MODE=deepspeed, one job each: SIGUSR1 to the batch shell (what `--signal=B:USR1@300` sends before the time
      limit or a preemption) -> every rank saves and exits 76 -> the script requeues -> the job resumes from the
      checkpoint; then rank 1 is SIGSTOPped -> rank 0's hang watchdog exits 75 -> requeue -> resume -> the job
      finishes (COMPLETED after 2 restarts). Every loss the job logged, in every run, equals the reference's.
A requeued job waits cred_expire (SLURM's default 120 s, 10 s in the test's slurm.conf) before it runs again.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from local_slurm import LocalSlurm, missing_requirements
from megaclm.checkpoint.layout import read_latest
from megaclm.utils import exitcodes
from test_pretrain import REPO, base_args, corpus, records, remove_shm_buffers  # noqa: F401


ITERS = 24
SAVE_INTERVAL = 4
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def flags(corpus: str) -> list[str]:
    """The launcher tests' tiny model, without --save/--load (the sbatch script passes SAVE as both)."""
    args = base_args(corpus, Path("unused"))
    return args[:args.index("--save")] + ["--train-iters", str(ITERS), "--save-interval", str(SAVE_INTERVAL),
                                          "--eval-interval", "1000", "--hang-timeout-s", "10"]


@pytest.fixture(scope="module")
def requirements():
    why = missing_requirements()
    if why:
        pytest.fail(why, pytrace=False)


class Job:
    """One submission of slurm/submit.sh in test mode; all its runs append to one output file."""

    def __init__(self, cluster: LocalSlurm, save: Path, corpus: str, mode: str, nodes: int, ranks_per_node: int,
                 extra_flags: tuple[str, ...] = (), **env: str):
        self.cluster, self.save = cluster, save
        self.out = save.parent / f"{save.name}.out"
        job_env = dict(cluster.env, MODE=mode, NODES=str(nodes), GPUS_PER_NODE=str(ranks_per_node), CPU_ONLY="1",
                       CONFIG="", SAVE=str(save), PYTHON=sys.executable, SBATCH_OUTPUT=str(self.out),
                       SBATCH_TIMELIMIT="15", SBATCH_JOB_NAME=f"megaclm-{mode}",
                       TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                           str(REPO / ".cache/torch_extensions")), **env)
        r = subprocess.run(["bash", "slurm/submit.sh", *flags(corpus), *extra_flags], cwd=REPO, env=job_env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        self.id = int(re.search(r"Submitted batch job (\d+)", r.stdout).group(1))

    def text(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def info(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def fail(self, why: str) -> None:
        pytest.fail(f"job {self.id}: {why}; {self.info()}\n{self.text()[-4000:]}\n{self.cluster.logs(10)}")

    def wait_for(self, predicate, what: str, timeout: float = 240) -> None:
        end = time.time() + timeout
        while not predicate():
            if time.time() > end:
                self.fail(f"timed out waiting for {what}")
            time.sleep(0.2)

    def losses_logged(self) -> int:
        path = self.save / "metrics.jsonl"
        return sum(1 for r in records(self.save) if "loss" in r) if path.exists() else 0

    def wait_until_logged(self, count: int) -> None:
        def logged() -> bool:
            if self.info()["JobState"] in ENDED:
                self.fail(f"ended before {count} losses were logged")
            return self.losses_logged() >= count
        self.wait_for(logged, f"{count} losses logged")

    def wait_requeued(self, restarts: int) -> None:
        """Wait for the script's requeue (the job runs again REQUEUE_WAIT_S later, local_slurm's cred_expire)."""
        self.wait_for(lambda: self.info()["Restarts"] == str(restarts), f"requeue {restarts}")

    def wait_done(self) -> dict[str, str]:
        self.wait_for(lambda: self.info()["JobState"] in ENDED, "the end")
        return self.info()

    def rank_process(self, rank: int) -> psutil.Process:
        """The training process of `rank` (a task of this job's current step: SLURM_PROCID)."""
        for p in psutil.process_iter(["cmdline"]):
            try:
                if "pretrain_gpt.py" in (p.info["cmdline"] or []):
                    env = p.environ()
                    if env.get("SLURM_JOB_ID") == str(self.id) and env.get("SLURM_PROCID") == str(rank):
                        return p
            except psutil.Error:
                continue
        self.fail(f"no process of rank {rank}")


def losses(save: Path) -> list[tuple[int, float]]:
    return [(r["iteration"], r["loss"]) for r in records(save) if "loss" in r]


@pytest.fixture(scope="module")
def one_node(requirements, corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slurm1")
    cluster = LocalSlurm(root / "cluster", nodes=1)
    cluster.start()
    try:
        job = Job(cluster, root / "ckpt", corpus, "deepspeed", nodes=1, ranks_per_node=2)
        info = job.wait_done()
        # srun's own tasks, no launcher and no rendezvous: refused, never two worlds of one
        env = {k: v for k, v in cluster.env.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
        bare = subprocess.run(["srun", "-n", "2", "--kill-on-bad-exit=0", sys.executable, "pretrain_gpt.py",
                               *flags(corpus), "--save", str(root / "bare"), "--load", str(root / "bare")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        # python run by a batch script itself in a 2-task allocation (SLURM_NTASKS=2, no job step): one process
        out = root / "batch_python.out"
        cmd = f"{sys.executable} pretrain_gpt.py --validate-only {' '.join(flags(corpus))} --save {root / 'batch'}"
        batch = subprocess.run(["sbatch", "--wait", "--ntasks=2", f"--output={out}", "--wrap", cmd], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=180)
        yield {"job": job, "info": info, "bare": bare, "bare_save": root / "bare", "batch": batch,
               "batch_text": out.read_text()}
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_nodes(requirements, tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm2") / "cluster", nodes=2)
    cluster.start()
    yield cluster
    cluster.stop()


def preempt_then_stall(cluster: LocalSlurm, corpus: str, save: Path, mode: str) -> tuple[Job, dict, list[int]]:
    """SIGUSR1 in the first run, a SIGSTOPped rank in the second, the third runs to the end."""
    # Steps paced at >= 0.25 s (tests/faults.py step_pause), so that the 0.2 s polling below stops rank 1 between
    # two checkpoints: unpaced, a CPU step of this model takes a few ms, and run 2 could reach its next checkpoint
    # before the SIGSTOP lands (then run 3 resumes where run 2 stopped and no lost step is replayed).
    job = Job(cluster, save, corpus, mode, nodes=2, ranks_per_node=1, MASTER_ADDR="127.0.0.1",
              extra_flags=("--callbacks", "faults:step_pause=0.25"), PYTHONPATH=str(REPO / "tests"))
    job.wait_until_logged(3)
    cluster.signal_batch_shell(job.id, "USR1")
    job.wait_requeued(1)
    first_run = job.losses_logged()
    # one iteration past run 2's first checkpoint (--save-interval 4; a save ends before the next step's row), three
    # steps before its second
    job.wait_until_logged((first_run // SAVE_INTERVAL + 1) * SAVE_INTERVAL + 1)
    job.rank_process(1).send_signal(signal.SIGSTOP)
    job.wait_requeued(2)
    second_run = job.losses_logged()
    return job, job.wait_done(), [first_run, second_run]


@pytest.fixture(scope="module")
def srun_job(two_nodes, corpus, tmp_path_factory):
    return preempt_then_stall(two_nodes, corpus, tmp_path_factory.mktemp("srun") / "ckpt", "srun")


@pytest.fixture(scope="module")
def deepspeed_job(two_nodes, corpus, tmp_path_factory):
    return preempt_then_stall(two_nodes, corpus, tmp_path_factory.mktemp("deepspeed") / "ckpt", "deepspeed")


def test_deepspeed_mode_one_node_trains_as_one_world(one_node):
    job, info = one_node["job"], one_node["info"]
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), job.text()[-3000:]
    text = job.text()
    assert "cmd = srun -n 2 --kill-on-bad-exit=1" in text  # DeepSpeed's slurm launcher, no ssh check
    assert "rank 0 of 2 from SLURM job step" in text and "world 2 = tp 1 x dp 2" in text
    assert [i for i, _ in losses(job.save)] == list(range(1, ITERS + 1))  # one run, one world: each step once
    assert read_latest(str(job.save)) == f"iter_{ITERS:07d}"


def test_bare_srun_tasks_without_rendezvous_are_refused(one_node):
    bare = one_node["bare"]
    assert bare.returncode == exitcodes.BAD_INPUT, bare.stderr[-3000:]
    refusals = [line for line in bare.stderr.splitlines() if line.startswith("error: this process is task")]
    assert sorted(line.split()[5] for line in refusals) == ["0", "1"], bare.stderr[-3000:]
    assert "MASTER_ADDR and MASTER_PORT are not set, so the 2 tasks would train as 2 independent runs" in refusals[0]
    assert not one_node["bare_save"].exists()


def test_python_in_the_batch_script_itself_is_a_world_of_one(one_node):
    """The allocation's SLURM_NTASKS=2 reaches it, but it is no task of a job step: neither refused nor rank 0 of 2."""
    batch, text = one_node["batch"], one_node["batch_text"]
    assert batch.returncode == 0, batch.stderr + text[-3000:]
    assert "world 1 = tp 1 x dp 1" in text and "error:" not in text


@pytest.mark.parametrize("mode", ["srun", "deepspeed"])
def test_preemption_and_hang_requeue_and_resume_with_equal_losses(mode, one_node, request):
    job, info, (first_run, second_run) = request.getfixturevalue(f"{mode}_job")
    text = job.text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), text[-4000:]
    # run 1: SIGUSR1 -> every rank saved at the same step -> 76 -> requeued -> run 2 loaded that checkpoint
    assert "SIGUSR1: asking the ranks to save and stop" in text
    assert f"exit status {exitcodes.STOPPED}: checkpoint saved, run not finished; requeueing job {job.id}" in text
    stopped = losses(job.save)[first_run - 1][0]
    assert f"loaded checkpoint {job.save}/iter_{stopped:07d}" in text
    # run 2: rank 1 stopped -> rank 0's watchdog -> 75 -> requeued -> run 3 resumed from the last checkpoint
    assert f"exit status {exitcodes.HUNG}: hang watchdog fired" in text
    assert (job.save / "hang/rank0.txt").read_text().startswith("rank 0: no training step finished for ")
    resumed = int(re.findall(rf"loaded checkpoint {re.escape(str(job.save))}/iter_(\d+)", text)[-1])  # run 3's
    # run 2 had logged steps past that checkpoint (second_run rows, one per iteration), which run 3 trained again
    assert stopped < resumed < second_run
    # every loss equals the uninterrupted one-node run's; each iteration appears once (a resume drops the rows
    # past its checkpoint from metrics.jsonl, so the replayed steps replaced the hang's lost ones)
    reference = dict(losses(one_node["job"].save))
    logged = losses(job.save)
    assert [i for i, _ in logged] == list(range(1, ITERS + 1))
    assert [(i, loss) for i, loss in logged if loss != reference[i]] == []
    assert re.search(rf"metrics.jsonl: dropped \d+ rows past iteration {resumed}\b", text), text[-4000:]
    assert read_latest(str(job.save)) == f"iter_{ITERS:07d}"
    meta = json.loads((job.save / f"iter_{ITERS:07d}/megaclm/meta.json").read_text())
    assert (meta["iteration"], meta["world_size"]) == (ITERS, 2)
