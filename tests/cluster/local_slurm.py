"""A throw-away SLURM cluster on this machine for tests: Debian's slurm-wlm (22.05) + munge.

Everything (config, munge key, state, spool, logs, pid files) lives under one directory, munge's socket in a
folder of its own under /tmp (removed by stop()); the daemons listen on 127.0.0.1 only, on free ports picked
at start (never SLURM's defaults, so a real cluster or another test run on the host is left alone), and are
stopped by the pid files they wrote.
`nodes=2` emulates two nodes n1, n2 with two slurmd on this host (`slurmd -N n1`, a port each).

Needs root (slurmd starts job steps as their user) and the packages; `make test-slurm` installs them.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client munge"
INSTALL_HINT = (f"the SLURM tests need Debian's {PACKAGES} and root: run `make test-slurm` (installs them with "
                f"apt-get, then runs tests/cluster), or `apt-get install --no-install-recommends {PACKAGES}`")
REQUEUE_WAIT_S = 10
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


def missing_requirements() -> str | None:
    """Why a local SLURM cannot start here (with how to fix it), or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not found; {INSTALL_HINT}"
    if os.geteuid() != 0:
        return f"not root; {INSTALL_HINT}"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (bound together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(pid_file: Path, name: str) -> int | None:
    """The pid in pid_file if that process is still a running `name` (not a zombie), else None."""
    try:
        pid = int(pid_file.read_text())
        comm, state = re.match(r"\d+ \((.*)\) (\S)", Path(f"/proc/{pid}/stat").read_text()).groups()
        return pid if comm == name and state != "Z" else None
    except (OSError, ValueError, AttributeError):
        return None


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 1):
        self.root, self.nodes = root, nodes
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # Node names: the host itself, or n1, n2 (a NodeName equal to the host name is refused with 2 slurmd)
        self.node_names = [self.host] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.socket_dir: Path | None = None  # made by start()

    # ---- daemons ---------------------------------------------------------------------------------

    def start(self) -> None:
        # munged wants every folder above its socket open to all (x), and a socket path is short (108 bytes):
        # pytest's tmp folders are neither, so the socket lives in a folder of its own under /tmp.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="megaclm-munge-"))
        self.socket_dir.chmod(0o755)
        for d in ("munge", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_conf()
        self._run(["munged", f"--key-file={key}", f"--socket={self.munge_socket}",
                   f"--pid-file={self.root}/run/munged.pid",
                   f"--log-file={self.root}/log/munged.log", f"--seed-file={self.root}/munge/munged.seed"])
        self._run(["slurmctld", "-f", str(self.conf)])
        for name in self.node_names:
            self._run(["slurmd", "-f", str(self.conf)] + (["-N", name] if self.nodes > 1 else []))
        self._wait_idle()

    @property
    def munge_socket(self) -> Path:
        return self.socket_dir / "munge.socket"

    def _write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + self.nodes)
        cpus = os.cpu_count()  # every slurmd sees the whole host
        if self.nodes == 1:
            node_lines = [f"SlurmdPort={node_ports[0]}",
                          f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN"]
        else:
            node_lines = [f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} State=UNKNOWN"
                          for n, p in zip(self.node_names, node_ports)]
        r = self.root
        (r / "plugstack.conf").write_text("")  # not the system's /etc/slurm/plugstack.conf
        self.conf.write_text("\n".join([
            "# a test cluster: loopback only, no accounting, no cgroups, no GRES",
            f"ClusterName=megaclmtest", f"SlurmctldHost={self.host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: a requeued job waits this long (default 120 s) before it runs again
            f"AuthInfo=socket={self.munge_socket},cred_expire={REQUEUE_WAIT_S}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            f"PlugStackConfig={r}/plugstack.conf",
            # task/none: two slurmd on one host would otherwise pin both nodes' tasks to the same core
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none", "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # a requeued job starts soon after cred_expire
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job` (no accounting here)
            "KillWait=10", "InactiveLimit=0", "Waittime=0",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            *node_lines,
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            ""]))

    def _run(self, cmd: list[str]) -> None:
        """Start a daemon (each forks itself and writes its pid file)."""
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")

    def _wait_idle(self, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in r.stdout.splitlines())
            if r.returncode == 0 and sorted(states) == sorted(self.node_names) and set(states.values()) == {"idle"}:
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not come up: {r.stdout or r.stderr}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end its daemons by their pid files (never by name)."""
        if _alive(self.root / "run/slurmctld.pid", "slurmctld"):
            subprocess.run(["scancel", "--full", "--quiet", "--partition=test"], env=self.env, timeout=30)
            end = time.time() + 60
            while time.time() < end and self.squeue("R,CG"):
                time.sleep(0.5)
        pid_files = [*sorted((self.root / "run").glob("slurmd-*.pid")), self.root / "run/slurmctld.pid",
                     self.root / "run/munged.pid"]
        for f in pid_files:
            name = f.stem.split("-")[0]
            pid = _alive(f, name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            end = time.time() + 20
            while _alive(f, name) and time.time() < end:
                time.sleep(0.2)
            if _alive(f, name):
                os.kill(pid, signal.SIGKILL)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f}\n" + "\n".join(lines))
        return "\n".join(out)

    # ---- jobs ------------------------------------------------------------------------------------

    def squeue(self, states: str = "all") -> list[str]:
        r = subprocess.run(["squeue", "-h", "-t", states, "-o", "%i"], env=self.env, capture_output=True, text=True)
        return r.stdout.split()

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, BatchHost, ...)."""
        r = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env, capture_output=True,
                           text=True, check=True)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def signal_batch_shell(self, job_id: int, sig: str) -> None:
        """What `#SBATCH --signal=B:<sig>@<seconds>` sends before the time limit: the batch script's shell only."""
        subprocess.run(["scancel", "--batch", f"--signal={sig}", str(job_id)], env=self.env, check=True, timeout=30)
