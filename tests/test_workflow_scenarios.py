"""The pipeline's seams, tried as a user would, in throwaway copies of the repository.

* a failed (killed) run after a param change, then a rerun, under Snakemake and under DVC,
  in a clone where Snakemake has run before and in one where it has not;
* YAML 1.1 vs 1.2 readings of params.yaml refused by both orchestrators, naming the key;
* values with spaces, quotes, `$(...)`, `;` and leading dashes built identically by both, and
  nothing executed;
* disk used and remote size relative to the final outputs; readable `dvc metrics show`;
* `dvc exp run -S` leaves params.yaml's formatting alone; a failing job prints its log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from workflow_helpers import (
    BIN,
    ENV,
    SPLITS,
    clone,
    commit_all,
    copy_worktree,
    dvc,
    run,
    snakemake,
    status_clean,
    tiny_built_repo,
)

from datumdb.manifest import read_manifest
from datumdb.verify import content_digest

pytestmark = pytest.mark.integration


def digests(repo: Path) -> dict[str, str]:
    return {split: content_digest(repo / "data" / "lmdb" / split) for split in SPLITS}


def nothing_to_do(repo: Path) -> bool:
    plan = snakemake("-n", cwd=repo)
    return "Nothing to be done" in plan.stdout + plan.stderr


def replace_in_params(repo: Path, old: str, new: str) -> None:
    text = (repo / "params.yaml").read_text()
    assert old in text, old
    (repo / "params.yaml").write_text(text.replace(old, new, 1))


def killing_shim(folder: Path, step: str) -> dict[str, str]:
    """An environment whose `datumdb` kills itself (SIGKILL, exit 137) when running ``step``."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "datumdb"
    shim.write_text(f'#!/bin/sh\ncase "$*" in *"pipeline {step} "*) kill -9 $$ ;; esac\nexec "{BIN}/datumdb" "$@"\n')
    shim.chmod(0o755)
    return {**ENV, "PATH": f"{folder}{os.pathsep}{ENV['PATH']}"}


def run_with(env: dict[str, str], args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, text=True, capture_output=True, check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo copy on .test/params.yaml, built by Snakemake, committed to DVC and git, pushed."""
    repo, _ = tiny_built_repo(tmp_path_factory.mktemp("built"), tmp_path_factory.mktemp("remote"))
    dvc("push", cwd=repo)
    return repo


def pulled_clone(built: Path, target: Path) -> Path:
    repo = clone(built, target)
    remote = dvc("remote", "list", "--local", cwd=built).stdout.split()[1]
    dvc("remote", "modify", "--local", "storage", "url", remote, cwd=repo)
    dvc("pull", cwd=repo)
    return repo


def encodings(repo: Path) -> set[str]:
    return {read_manifest(repo / "data" / "lmdb" / split)["encoding"] for split in SPLITS}


# ----------------------------------------------------------------------------- freshness


@pytest.mark.parametrize("where", ["after a snakemake run", "in a fresh clone after dvc pull"])
def test_a_killed_run_after_a_param_change_then_a_rerun_ends_fresh_under_snakemake(
    built: Path, tmp_path: Path, where: str
) -> None:
    if where == "after a snakemake run":
        repo = clone(built, tmp_path / "repo")
        for folder in ("data", "reports", ".snakemake"):  # the outputs, and Snakemake's own records
            shutil.copytree(built / folder, repo / folder, dirs_exist_ok=True)
    else:
        repo = pulled_clone(built, tmp_path / "repo")
    assert encodings(repo) == {"png"} and nothing_to_do(repo)
    replace_in_params(repo, "encoding: png", "encoding: jpg")
    failed = run_with(killing_shim(tmp_path / "shim", "records"), [str(BIN / "snakemake"), "--cores", "2"], repo)
    assert failed.returncode != 0
    assert encodings(repo) == {"png"}  # the databases were not touched: still the old version
    assert "is stale" in failed.stderr  # the run said why the build had to run
    snakemake("--cores", "2", cwd=repo)  # the rerun
    assert encodings(repo) == {"jpg"}
    for split in SPLITS:
        run(["datumdb", "verify", f"data/lmdb/{split}", "--params", "params.yaml"], repo)
    assert run(["datumdb", "pipeline", "stale"], repo).returncode == 0
    assert nothing_to_do(repo)
    metrics = json.loads((repo / "reports" / "verify" / "val.json").read_text())
    assert metrics["encoding"] == "jpg" and metrics["digest"] == digests(repo)["val"]


def test_a_killed_dvc_repro_after_a_param_change_then_a_rerun_ends_fresh(built: Path, tmp_path: Path) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    replace_in_params(repo, "encoding: png", "encoding: jpg")
    failed = run_with(killing_shim(tmp_path / "shim", "build-all"), [str(BIN / "dvc"), "repro"], repo)
    assert failed.returncode != 0
    assert not any((repo / "data" / "lmdb").glob(".records-*"))
    dvc("repro", cwd=repo)
    assert encodings(repo) == {"jpg"}
    run(["datumdb", "pipeline", "stale"], repo)
    assert status_clean(repo) and nothing_to_do(repo)


def test_verify_with_params_names_what_differs(built: Path, tmp_path: Path) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    run(["datumdb", "verify", "data/lmdb/train", "--params", "params.yaml"], repo)
    replace_in_params(repo, "seed: 3", "seed: 4")
    result = run(["datumdb", "verify", "data/lmdb/train", "--params", "params.yaml"], repo, check=False)
    assert result.returncode == 1
    assert "seed: 3 in the output, 4 in the params" in result.stderr


# ----------------------------------------------------------------------------- one reading


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("seed: 3", "seed: 010", "seed"),  # octal 8 for YAML 1.1, 10 for YAML 1.2
        ("seed: 3", "seed: 0o3", "seed"),  # a string for YAML 1.1, 3 for YAML 1.2
        ("gray: false", "gray: no", "dataset.imageset.gray"),  # false for YAML 1.1, "no" for YAML 1.2
        ("shuffle: false", "shuffle: off", "dataset.imageset.shuffle"),
        ("sample: 8", "sample: 1:20", "verify.sample"),  # sexagesimal 80 for YAML 1.1
        ("map_size: 1048576", "map_size: 1e7", "build.map_size"),  # a string for YAML 1.1, a float for 1.2
    ],
)
def test_values_the_two_yaml_versions_read_differently_are_refused_by_both(
    built: Path, tmp_path: Path, old: str, new: str, key: str
) -> None:
    repo = clone(built, tmp_path / "repo")
    replace_in_params(repo, old, new)
    by_snakemake = snakemake("--cores", "1", cwd=repo, check=False)
    by_dvc = dvc("repro", cwd=repo, check=False)
    for result in (by_snakemake, by_dvc):
        assert result.returncode != 0
        assert f"params.yaml: {key} is " in result.stdout + result.stderr
        assert "YAML 1.1" in result.stdout + result.stderr
    assert not (repo / "data").exists()  # refused before any work


@pytest.mark.parametrize(
    "folder",
    ["my inputs", "in$(touch PWNED)puts", "a;touch PWNED;b", 'it\'s "quoted"', "-dash", "$HOME `touch PWNED`"],
)
def test_hostile_values_are_data_in_both_orchestrators(built: Path, tmp_path: Path, folder: str) -> None:
    repo = clone(built, tmp_path / "repo")
    inputs = repo / folder
    inputs.mkdir()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 40)
    np.save(inputs / "X.npy", (labels[:, None, None, None] * 70 + rng.integers(0, 30, (40, 3, 6, 6))).astype(np.uint8))
    np.save(inputs / "y.npy", labels)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"].update(source="arrays", input_dir=folder)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(repo)
    other = clone(repo, tmp_path / "other")
    shutil.copytree(inputs, other / folder, dirs_exist_ok=True)
    snakemake("--cores", "2", cwd=repo)
    dvc("repro", cwd=other)
    assert digests(repo) == digests(other)
    assert read_manifest(repo / "data/lmdb/train")["metadata"]["pipeline"]["params"]["dataset"]["input_dir"] == folder
    for place in (repo, other, tmp_path, Path.cwd()):
        assert not (place / "PWNED").exists()


def test_snakemake_starts_on_class_folders_with_symlink_loops_and_refuses_one_out_of_root(tmp_path: Path) -> None:
    """`snakemake -n` lists the class folders at start-up (the input fingerprint): two links to
    '.' made it hang, a link to /usr walk the system. Now each image is listed once, and a link
    out of ROOT is refused naming it, before any work."""
    repo = copy_worktree(tmp_path / "repo")
    shutil.copy(repo / ".test" / "params.yaml", repo / "params.yaml")
    images = repo / "inputs" / "images"
    for name in ("a/x.png", "a/sub/y.png", "b/z.png"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(images / name), np.full((6, 6, 3), len(name), np.uint8))
    (images / "a" / "loop").symlink_to(".", target_is_directory=True)
    (images / "a" / "sub" / "loop").symlink_to(".", target_is_directory=True)
    (images / "b" / "sibling").symlink_to("../a", target_is_directory=True)
    replace_in_params(repo, "source: synthetic", "source: imageset")
    replace_in_params(repo, "  imageset:\n", "  imageset:\n    layout: folders\n")
    plan = subprocess.run(
        [str(BIN / "snakemake"), "-n"], cwd=repo, env=ENV, text=True, capture_output=True, timeout=300, check=False
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    (images / "b" / "usr").symlink_to("/usr", target_is_directory=True)
    plan = subprocess.run(
        [str(BIN / "snakemake"), "-n"], cwd=repo, env=ENV, text=True, capture_output=True, timeout=300, check=False
    )
    assert plan.returncode != 0
    assert "b/usr: a symlink to the folder /usr, outside ROOT" in plan.stdout + plan.stderr
    assert not (repo / "data").exists()


def _billion_laughs() -> str:
    """Nine levels of mapping aliases, nine each (9**9 values) in under 3 kB: Snakemake's config
    merge and DVC's interpolation context walk every one of them."""
    lines = ['a0: &a0 {x: "lol"}']
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} {{" + ", ".join(f"k{i}: *a{level - 1}" for i in range(9)) + "}")
    return "\n".join(lines) + "\n"


def tree_state(repo: Path) -> dict[str, tuple[int, int]]:
    """Every file outside .git and .snakemake, with its size and mtime: what 'nothing touched' means."""
    return {
        str(path.relative_to(repo)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in repo.rglob("*")
        if path.is_file() and not {".git", ".snakemake", ".dvc"} & set(path.relative_to(repo).parts)
    }


@pytest.mark.parametrize(
    ("old", "new", "message", "dvc_reaches_the_step"),
    [
        ("seed: 3\n", "seed: " + "9" * 5000 + "\n", "seed (line 29): an integer of 5000 digits", False),
        ("seed: 3\n", _billion_laughs() + "seed: 3\n", "a0 (line 29): YAML anchors and aliases", False),
        ("map_size: 1048576", "map_size: 100000000000000000", "build.map_size: 100000000000000000 is greater", True),
        (
            "resize_width: 0",
            "resize_width: 0\n    decode_timeout: .nan",
            "dataset.imageset.decode_timeout: nan is not a finite",
            True,
        ),
        (
            "resize_width: 0",
            "resize_width: 0\n    decode_timeout: .inf",
            "dataset.imageset.decode_timeout: inf is not a finite",
            True,
        ),
        ("input_dir: inputs", "input_dir: in{put}s", "dataset.input_dir: 'in{put}s' has a brace", True),
    ],
)
def test_hostile_params_files_end_in_one_line_before_any_work_in_both_orchestrators(
    built: Path, tmp_path: Path, old: str, new: str, message: str, dvc_reaches_the_step: bool
) -> None:
    """The steps and Snakemake's start-up refuse the file (exit 2, one line naming the key) before
    Snakemake reads it; the outputs already built are left as they are."""
    repo = clone(built, tmp_path / "repo")
    for folder in ("data", "reports"):
        shutil.copytree(built / folder, repo / folder, dirs_exist_ok=True)
    (repo / "in{put}s").mkdir()  # the folder exists: only the braces are wrong
    replace_in_params(repo, old, new)
    before = tree_state(repo)
    expected = f"params.yaml: {message}"

    plan = subprocess.run(
        [str(BIN / "snakemake"), "-n"], cwd=repo, env=ENV, text=True, capture_output=True, timeout=300
    )
    assert plan.returncode == 2, plan.stdout + plan.stderr
    lines = [line for line in (plan.stdout + plan.stderr).splitlines() if not line.startswith("Using workflow")]
    assert lines == [lines[0]] and lines[0].startswith(f"datumdb: {expected}"), lines

    db = repo / "data" / "lmdb" / "train"
    for args in (
        ["pipeline", "build", "--params", "params.yaml", "--split", "train", "records", str(db)],
        ["pipeline", "build-all", "--params", "params.yaml", "data/lmdb"],
        ["pipeline", "check", "--params", "params.yaml"],
    ):
        step = subprocess.run(
            [str(BIN / "datumdb"), *args], cwd=repo, env=ENV, text=True, capture_output=True, timeout=300
        )
        assert step.returncode == 2 and step.stdout == "", (args, step.stdout, step.stderr)
        assert step.stderr.startswith(f"datumdb pipeline: error: {expected}") and step.stderr.count("\n") == 1

    assert tree_state(repo) == before  # nothing deleted, replaced or made

    if dvc_reaches_the_step:  # DVC parses params.yaml itself first: see README, "Reliability"
        by_dvc = dvc("repro", cwd=repo, check=False)
        assert by_dvc.returncode != 0
        assert f"datumdb pipeline: error: {expected}" in by_dvc.stdout + by_dvc.stderr
        assert "Traceback" not in by_dvc.stdout + by_dvc.stderr


# ----------------------------------------------------------------------------- storage and sharing


def tree_bytes(*folders: Path) -> int:
    """Bytes on disk under the folders, each hard-linked file counted once (as du does)."""
    seen, total = set(), 0
    for folder in folders:
        for path in folder.rglob("*"):
            info = path.lstat()
            if path.is_file() and not path.is_symlink() and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


def test_only_results_are_versioned_and_disk_stays_near_the_outputs(built: Path, tmp_path: Path) -> None:
    outputs = tree_bytes(built / "data" / "lmdb", built / "data" / "mean", built / "reports")
    used = tree_bytes(built / "data", built / ".dvc" / "cache")
    assert used <= 2.2 * outputs, (used, outputs)
    remote = Path(dvc("remote", "list", "--local", cwd=built).stdout.split()[1])
    assert tree_bytes(remote) <= 1.2 * outputs, (tree_bytes(remote), outputs)
    stages = yaml.safe_load((built / "dvc.lock").read_text())["stages"].values()
    tracked = {out["path"] for stage in stages for out in stage.get("outs", [])}
    assert tracked >= {f"data/lmdb/{s}" for s in SPLITS}
    assert not any("records" in path or "shards" in path for path in tracked)


def test_dvc_metrics_show_prints_a_few_numbers_per_split(built: Path) -> None:
    shown = dvc("metrics", "show", "--json", cwd=built).stdout
    data = json.loads(shown)
    values = next(iter(data.values()))["data"]
    for split in SPLITS:
        metrics = values[f"reports/metrics/{split}.json"]["data"]
        assert set(metrics) == {"count", "ncm_accuracy", "chance_accuracy", "digest"}
        assert metrics["digest"] == digests(built)[split].removeprefix("sha256:")[:12]


def test_dvc_exp_run_set_param_changes_one_line_of_params_yaml(built: Path, tmp_path: Path) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    before = (repo / "params.yaml").read_text().splitlines()
    dvc("exp", "run", "-S", "verify.sample=5", cwd=repo)
    after = (repo / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(before) == len(after) and len(changed) == 1 and "sample: 5" in changed[0][1], changed


def test_a_failing_job_prints_its_log(built: Path, tmp_path: Path) -> None:
    repo = clone(built, tmp_path / "repo")
    (repo / "inputs" / "X.npy").write_bytes(b"not a numpy file")
    (repo / "inputs" / "y.npy").write_bytes(b"")
    replace_in_params(repo, "source: synthetic", "source: arrays")
    result = snakemake("--cores", "1", cwd=repo, check=False)
    assert result.returncode != 0
    assert "inputs/X.npy" in result.stdout + result.stderr  # the error itself, not just the log's path
    assert "Traceback" not in result.stdout + result.stderr
