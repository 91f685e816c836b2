"""The workflow on a real SLURM cluster: a one-node cluster from Debian's packages, started here.

The pipeline runs through the repository's own profile (`workflow/profiles/slurm`), so every job
is an `sbatch` job scheduled by slurmctld and run by slurmd. Checked: the jobs went through
SLURM (job ids in Snakemake's log, known to `scontrol`), the shard jobs overlapped in time, the
databases have exactly the digests of a local `snakemake --cores 2` run and `dvc status` is
clean after `dvc commit`; a job failing on the cluster fails the run with its log shown, and the
rerun after the fix resubmits only what had not finished.

Two settings stand in for a production cluster's: this cluster has no accounting database, so
job states come from `squeue` (the plugin's default, `sacct`, would wait forever), and status
checks start after 1 s instead of 40 s. Every Snakemake call is bounded by a timeout that sends
SIGINT, which Snakemake honours by cancelling its jobs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurmCluster, missing_tools
from workflow_helpers import BIN, ENV, SPLITS, commit_all, copy_worktree, dvc, snakemake, status_clean

from datumdb.manifest import read_manifest

pytestmark = pytest.mark.cluster

TEST_CLUSTER_FLAGS = [
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "1",
    "--slurm-no-account",
    "--latency-wait", "5",
]  # fmt: skip
SNAKEMAKE_TIMEOUT = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> LocalSlurmCluster:
    missing = missing_tools()
    assert not missing, f"SLURM/munge programs missing: {missing}; `make test` installs them (needs root and apt)"
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), install_config=True) as running:
        yield running


def _tiny_repo(path: Path) -> Path:
    """A copy of the repository whose params.yaml is the small test variant (PNG encoding)."""
    path.mkdir(parents=True, exist_ok=True)
    copy_worktree(path)
    shutil.copy(path / ".test" / "params.yaml", path / "params.yaml")
    commit_all(path)
    return path


def _on_cluster(repo: Path, cluster: LocalSlurmCluster, *extra: str, datumdb: Path | None = None):
    env = {**ENV, **{k: v for k, v in cluster.env.items() if k == "SLURM_CONF"}}
    if datumdb is not None:  # the command the rules run instead of the datumdb beside Snakemake's Python
        env["DATUMDB_COMMAND"] = str(datumdb)
    return subprocess.run(
        ["timeout", "-s", "INT", "-k", "30", str(SNAKEMAKE_TIMEOUT), str(BIN / "snakemake"),
         "--profile", "workflow/profiles/slurm", *TEST_CLUSTER_FLAGS, *extra],
        cwd=repo, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip


def _job_ids(log: str) -> dict[str, list[str]]:
    """SLURM job ids per rule, from Snakemake's submission lines."""
    jobs: dict[str, list[str]] = {}
    for job_id, rule in re.findall(r"submitted with SLURM jobid (\d+) \(log: [^)]*/rule_(\w+)/", log):
        jobs.setdefault(rule, []).append(job_id)
    return jobs


def _job_times(cluster: LocalSlurmCluster, job_id: str) -> tuple[datetime, datetime, str]:
    info = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env, capture_output=True, text=True)
    fields = dict(re.findall(r"(\w+)=(\S+)", info.stdout))
    return datetime.fromisoformat(fields["StartTime"]), datetime.fromisoformat(fields["EndTime"]), fields["JobState"]


def _split_bytes(repo: Path) -> dict[str, tuple[str, bytes]]:
    """Every assembled database's and every shard's digest and data.mdb bytes."""
    found = {}
    for folder in [repo / "data" / "lmdb" / s for s in SPLITS] + sorted((repo / "data" / "shards").glob("*/*")):
        if (folder / "data.mdb").is_file():
            found[str(folder.relative_to(repo))] = (read_manifest(folder)["digest"], (folder / "data.mdb").read_bytes())
    return found


def test_pipeline_runs_on_slurm_and_matches_a_local_run(cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    repo = _tiny_repo(tmp_path / "cluster")
    result = _on_cluster(repo, cluster)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    jobs = _job_ids(log)
    assert len(jobs.get("shards", [])) == 2, jobs  # one job per part of the plan, each on a node
    assert len(jobs.get("assemble", [])) == 3, jobs
    times = {job_id: _job_times(cluster, job_id) for ids in jobs.values() for job_id in ids}
    assert {state for _, _, state in times.values()} == {"COMPLETED"}, times
    # The two part jobs ran side by side (SLURM reports whole seconds).
    for rule in ("shards",):
        (start_a, end_a, _), (start_b, end_b, _) = (times[i] for i in jobs[rule])
        assert start_a <= end_b and start_b <= end_a, (rule, times)
    assert not list((repo / "data" / "lmdb").rglob("lock.mdb"))

    local = _tiny_repo(tmp_path / "local")
    snakemake("--cores", "2", cwd=local)
    assert _split_bytes(repo) == _split_bytes(local)

    dvc("commit", "--force", "--quiet", cwd=repo)
    assert status_clean(repo)


def test_a_job_failing_on_the_cluster_fails_the_run_and_the_rerun_resumes(
    cluster: LocalSlurmCluster, tmp_path: Path
) -> None:
    repo = _tiny_repo(tmp_path / "failing")
    # A node-level fault: on the first run, `datumdb pipeline assemble` fails for the val split.
    shim = tmp_path / "faulty-bin"
    shim.mkdir()
    (shim / "datumdb").write_text(
        "#!/bin/sh\n"
        'case "$*" in *"pipeline assemble "*"--split val"*) echo "simulated node fault: disk gone" >&2; exit 3;; esac\n'
        f'exec {BIN / "datumdb"} "$@"\n'
    )
    (shim / "datumdb").chmod(0o755)
    first = _on_cluster(repo, cluster, "--retries", "0", datumdb=shim / "datumdb")
    first_log = first.stdout + first.stderr
    assert first.returncode != 0
    assert "Error in rule assemble" in first_log
    assert "simulated node fault: disk gone" in first_log  # the failed job's log, shown
    finished = _job_ids(first_log)
    assert len(finished["shards"]) == 2

    second = _on_cluster(repo, cluster)  # the fault is gone
    second_log = second.stdout + second.stderr
    assert second.returncode == 0, second_log[-4000:]
    resubmitted = _job_ids(second_log)
    assert "shards" not in resubmitted, resubmitted  # the parts' shards were kept: current
    assert "assemble" in resubmitted
    dvc("commit", "--force", "--quiet", cwd=repo)
    assert status_clean(repo)
