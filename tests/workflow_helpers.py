"""Throwaway copies of this repository, and the commands the workflow tests run in them.

Shared by tests/test_workflow.py and tests/test_cluster.py. The copies are made from the working
tree (tracked and untracked, not ignored files), so the checks cover uncommitted changes too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
SPLITS = ("train", "val", "test")
GIT = ["git", "-c", "user.name=datumdb-test", "-c", "user.email=test@datumdb.invalid", "-c", "commit.gpgsign=false"]


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=ENV, text=True, capture_output=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "dvc"), *args], cwd, check)


def snakemake(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "snakemake"), *args], cwd, check)


def copy_worktree(target: Path) -> Path:
    """The working tree's tracked and untracked (not ignored) files, as a fresh one-commit repo."""
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], ROOT).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    commit_all(target, init=True)
    return target


def commit_all(repo: Path, *, init: bool = False) -> None:
    if init:
        run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run([*GIT, "commit", "-q", "--allow-empty", "-m", "test"], repo)


def clone(source: Path, target: Path) -> Path:
    run(["git", "clone", "-q", str(source), str(target)], source.parent)
    return target


def status_clean(repo: Path) -> bool:
    return "Data and pipelines are up to date" in dvc("status", cwd=repo).stdout


def tiny_built_repo(folder: Path, remote: Path) -> tuple[Path, str]:
    """A repo copy on .test/params.yaml with a local remote, built by Snakemake, committed to DVC
    and git; also the build's log (stdout + stderr)."""
    repo = copy_worktree(folder)
    shutil.copy(repo / ".test" / "params.yaml", repo / "params.yaml")
    (repo / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(repo / "reports", ignore_errors=True)
    dvc("remote", "modify", "--local", "storage", "url", str(remote), cwd=repo)
    build = snakemake("--cores", "2", cwd=repo)
    dvc("commit", "--force", cwd=repo)
    commit_all(repo)
    return repo, build.stdout + build.stderr
