"""A one-node SLURM cluster on this machine, for tests: munge + slurmctld + slurmd from Debian.

Everything lives in one temporary folder (keys, sockets, state, spool, logs, ``slurm.conf``);
the daemons run as the current user (root in CI) with no cgroups and no accounting, listen on
free loopback ports, and are stopped by their PIDs. Clients find the cluster through the
``SLURM_CONF`` variable in :attr:`LocalSlurmCluster.env`. Start-up takes a few seconds.

Snakemake's SLURM job-step executor strips ``SLURM_*`` variables before it calls ``srun`` inside
a job, so ``srun`` there only finds the configuration at its compiled-in default path. With
``install_config=True`` the cluster also writes ``/etc/slurm/slurm.conf`` (refusing to replace a
file it did not write) and removes it again on stop, as a real cluster's nodes would have it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol")

_SLURM_CONF = """\
ClusterName=datumdbtest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools() -> list[str]:
    """The SLURM and munge programs this machine lacks (``.ci/run`` installs them)."""
    return [tool for tool in (*DAEMONS, *CLIENTS, "munge") if shutil.which(tool) is None]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalSlurmCluster:
    """Context manager: ``with LocalSlurmCluster(tmp) as cluster: subprocess.run(..., env=cluster.env)``."""

    SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
    MARKER = "# written by datumdb's tests/slurm_cluster.py\n"

    def __init__(self, root: Path, *, cpus: int = 2, memory_mb: int = 4000, install_config: bool = False) -> None:
        self.root = Path(root)
        self.install_config = install_config
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> None:
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        text = self.MARKER + _SLURM_CONF.format(
            root=self.root,
            user=_user(),
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            cpus=self.cpus,
            memory_mb=self.memory_mb,
        )
        self.conf.write_text(text)
        if self.install_config:
            if self.SYSTEM_CONF.exists() and not self.SYSTEM_CONF.read_text().startswith(self.MARKER):
                raise RuntimeError(f"{self.SYSTEM_CONF} exists and was not written by these tests; not replacing it")
            self.SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
            self.SYSTEM_CONF.write_text(text)
        self._run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={self.root}/munge.socket",
                f"--pid-file={self.root}/munged.pid",
                f"--log-file={self.root}/log/munged.log",
                f"--seed-file={self.root}/munged.seed",
            ]
        )
        self._run(["slurmctld", "-f", str(self.conf), "-i"])
        self._run(["slurmd", "-f", str(self.conf), "-N", "localhost"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.returncode == 0 and state.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the test SLURM cluster did not come up in {timeout} s; logs in {self.root / 'log'}")

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(f"{command[0]} failed to start: {result.stderr or result.stdout}")

    def stop(self) -> None:
        """Stop the daemons by their PID files (slurmd first), waiting for each to exit."""
        if self.install_config and self.SYSTEM_CONF.exists() and self.SYSTEM_CONF.read_text().startswith(self.MARKER):
            self.SYSTEM_CONF.unlink()
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            if not pid_file.exists():
                continue
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (ValueError, IndexError, ProcessLookupError):
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is dead for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
