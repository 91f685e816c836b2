"""Sharing through the default DVC remote, as the README tells it, and this repository as a data registry.

The default remote in the committed `.dvc/config` is `~/.cache/datumdb/dvc-storage`: DVC expands `~`
when it reads the config (and keeps it unexpanded when it writes), so every clone of one user, in
any folder, shares one store that survives a reboot. Here HOME is a temporary folder, so the
user's real store is never touched.

Checked for real, on `.test/params.yaml` built by `dvc repro`, committed and tagged:
- `dvc push` with no remote configuration lands under `$HOME/.cache/datumdb/dvc-storage`;
- the README's recipe, `git clone ... && cd ... && make pull`, gives databases with the same digests
  and a clean `dvc status` (the `make` target runs the venv's own `dvc`, which is not on PATH);
- another project (`git init` + `dvc init`) gets a shard set at a git tag with `dvc import` (tracked,
  with the tag and its commit recorded) and `dvc get` (a plain copy): the same bytes and digests,
  from a clone that has no DVC cache, so the data came from the remote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from workflow_helpers import BIN, ENV, GIT, SPLITS, clone, commit_all, copy_worktree

from datumdb.verify import content_digest

pytestmark = pytest.mark.integration

STORE = Path(".cache") / "datumdb" / "dvc-storage"  # under HOME


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, text=True, capture_output=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _digests(folder: Path) -> dict[str, str]:
    return {split: content_digest(folder / split) for split in SPLITS}


class Published:
    """A copy of this repository built on .test/params.yaml, committed, tagged v1 and pushed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir()
        self.env = {**ENV, "HOME": str(self.home)}
        self.repo = root / "origin"
        self.repo.mkdir()
        copy_worktree(self.repo)
        shutil.copy(self.repo / ".test" / "params.yaml", self.repo / "params.yaml")
        self.dvc(self.repo, "repro")
        commit_all(self.repo)
        _run([*GIT, "tag", "v1"], self.repo, self.env)
        self.dvc(self.repo, "push")

    def dvc(self, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([str(BIN / "dvc"), *args], cwd, self.env)

    @property
    def store(self) -> Path:
        return self.home / STORE


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return Published(tmp_path_factory.mktemp("sharing"))


def test_the_default_remote_is_a_folder_in_the_users_home(published: Published) -> None:
    config = (published.repo / ".dvc" / "config").read_text()
    assert "url = ~/.cache/datumdb/dvc-storage" in config
    assert not (published.repo / ".dvc" / "config.local").exists()
    stored = [path for path in published.store.rglob("*") if path.is_file()]
    assert len(stored) > 10, "dvc push stored nothing under $HOME/.cache/datumdb/dvc-storage"
    status = published.dvc(published.repo, "status", "--cloud").stdout
    assert "in sync" in status


def test_make_pull_in_a_fresh_clone_gives_the_same_databases(published: Published, tmp_path: Path) -> None:
    # A clone in an unrelated folder: the remote must not depend on where the clone is.
    fresh = clone(published.repo, tmp_path / "elsewhere" / "datumdb")
    assert not (fresh / "data").exists()
    # `make pull` builds .venv from requirements-dataset.lock (CI's `make test` proves that part from
    # scratch); here VENV is a folder whose python and dvc are this test run's, with its stamp fresh.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "dvc", "datumdb"):
        (venv / "bin" / name).symlink_to(BIN / name)
    (venv / ".dataset-deps").touch()
    env = {**published.env, "PATH": "/usr/bin:/bin"}  # no dvc on PATH, as on a fresh machine
    pulled = _run(["make", "pull", f"VENV={venv}"], fresh, env)
    assert "dvc pull" in pulled.stdout and "dvc repro" in pulled.stdout  # the shard sets, then assembled here
    assert _digests(fresh / "data" / "lmdb") == _digests(published.repo / "data" / "lmdb")
    assert "Data and pipelines are up to date" in published.dvc(fresh, "status").stdout


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_project_imports_a_shard_set_at_a_tag(published: Published, tmp_path: Path) -> None:
    """The remote holds the shard sets (the assembled databases are derived): another project
    imports one at a tag, reads it as one sequence, and assembles its own Caffe database."""
    registry = clone(published.repo, tmp_path / "registry")  # no DVC cache: data must come from the remote
    assert not (registry / ".dvc" / "cache").exists()
    project = tmp_path / "project"
    project.mkdir()
    _run(["git", "init", "-q", "-b", "main"], project, published.env)
    published.dvc(project, "init", "-q")

    published.dvc(project, "import", str(registry), "data/shards/train", "--rev", "v1", "-o", "train")
    expected = published.repo / "data" / "shards" / "train"
    assert _files(project / "train") == _files(expected)
    record = yaml.safe_load((project / "train.dvc").read_text())
    source = record["deps"][0]
    tagged = _run(["git", "rev-parse", "v1^{commit}"], published.repo, published.env).stdout.strip()
    assert source["path"] == "data/shards/train"
    assert source["repo"] == {"url": str(registry), "rev": "v1", "rev_lock": tagged}
    assert "Data and pipelines are up to date" in published.dvc(project, "status").stdout
    _run([str(BIN / "datumdb"), "assemble", "train", "train.lmdb"], project, published.env)
    assert content_digest(project / "train.lmdb") == content_digest(published.repo / "data" / "lmdb" / "train")

    published.dvc(project, "get", str(registry), "data/shards/val", "--rev", "v1", "-o", "val")
    assert _files(project / "val") == _files(published.repo / "data" / "shards" / "val")
    assert not os.path.exists(project / "val.dvc")  # `dvc get` is a plain download, not tracked
