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

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
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
    """The assembled databases' content digests, and each shard set's (as verify reports it)."""
    found = {split: content_digest(repo / "data" / "lmdb" / split) for split in SPLITS}
    for split in SPLITS:
        index = json.loads((repo / "data" / "shards" / split / "shards.json").read_text())
        found[f"shards/{split}"] = (
            "shards:" + hashlib.sha256("".join(str(shard["digest"]) for shard in index["shards"]).encode()).hexdigest()
        )
    return found


def nothing_to_do(repo: Path) -> bool:
    plan = snakemake("-n", cwd=repo)
    return "Nothing to be done" in plan.stdout + plan.stderr


def replace_in_params(repo: Path, old: str, new: str) -> None:
    text = (repo / "params.yaml").read_text()
    assert old in text, old
    (repo / "params.yaml").write_text(text.replace(old, new, 1))


def killing_shim(folder: Path, step: str) -> dict[str, str]:
    """An environment whose `datumdb` (``$DATUMDB_COMMAND``) kills itself (SIGKILL, exit 137) when running ``step``."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "datumdb"
    shim.write_text(f'#!/bin/sh\ncase "$*" in *"pipeline {step} "*) kill -9 $$ ;; esac\nexec "{BIN}/datumdb" "$@"\n')
    shim.chmod(0o755)
    return {**ENV, "DATUMDB_COMMAND": str(shim)}


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
    dvc("pull", "--allow-missing", cwd=repo)  # the shard sets
    dvc("repro", cwd=repo)  # assembles each split's database (nothing else reruns)
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
    failed = run_with(killing_shim(tmp_path / "shim", "shards"), [str(BIN / "snakemake"), "--cores", "2"], repo)
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
    assert metrics["encoding"] == "jpg" and metrics["digest"] == digests(repo)["shards/val"]


def test_a_killed_dvc_repro_after_a_param_change_then_a_rerun_ends_fresh(built: Path, tmp_path: Path) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    replace_in_params(repo, "encoding: png", "encoding: jpg")
    failed = run_with(killing_shim(tmp_path / "shim", "shards"), [str(BIN / "dvc"), "repro"], repo)
    assert failed.returncode != 0
    assert encodings(repo) == {"png"}  # the previous version, untouched
    dvc("repro", cwd=repo)
    assert encodings(repo) == {"jpg"}
    run(["datumdb", "pipeline", "stale"], repo)
    assert status_clean(repo) and nothing_to_do(repo)


def test_verify_with_params_names_what_differs(built: Path, tmp_path: Path) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    run(["datumdb", "verify", "data/shards/train", "--params", "params.yaml"], repo)
    run(["datumdb", "verify", "data/lmdb/train", "--params", "params.yaml"], repo)
    replace_in_params(repo, "seed: 3", "seed: 4")
    result = run(["datumdb", "verify", "data/shards/train", "--params", "params.yaml"], repo, check=False)
    assert result.returncode == 1
    assert "seed: 3 in the output, 4 in the params" in result.stderr  # each shard says what differs
    result = run(["datumdb", "verify", "data/lmdb/train", "--params", "params.yaml"], repo, check=False)
    assert result.returncode == 1
    assert "made from another version of the shard set" in result.stderr


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
    first = json.loads((repo / "data/shards/train/shards.json").read_text())["shards"][0]["name"]
    assert (
        read_manifest(repo / "data/shards/train" / first)["metadata"]["pipeline"]["params"]["dataset"]["input_dir"]
        == folder
    )
    for place in (repo, other, tmp_path, Path.cwd()):
        assert not (place / "PWNED").exists()


def test_snakemake_starts_on_class_folders_with_symlink_loops_and_refuses_one_out_of_root(tmp_path: Path) -> None:
    """`snakemake -n` lists the class folders at start-up (the input fingerprint): two links to
    '.' made it hang, a link to /usr walk the system. Now each image is listed once, and a link
    out of ROOT is refused naming it, before any work."""
    repo = copy_worktree(tmp_path / "repo")
    shutil.copy(repo / ".test" / "params.yaml", repo / "params.yaml")
    images = repo / "inputs" / "images"
    for name in ("a/x.png", "a/sub/y.png", "b/z.png", *(f"b/more{i}.png" for i in range(30))):
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
        ["pipeline", "assemble", "--params", "params.yaml", "--split", "train", "data/shards/train", str(db)],
        ["pipeline", "shards", "--params", "params.yaml", "data/shards"],
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
    versioned = tree_bytes(built / "data" / "shards", built / "data" / "mean", built / "reports")
    derived = tree_bytes(built / "data" / "lmdb")  # the assembled databases: made here, never uploaded
    used = tree_bytes(built / "data", built / ".dvc" / "cache")
    assert used <= 1.2 * versioned + derived, (used, versioned, derived)  # the cache's files are linked
    remote = Path(dvc("remote", "list", "--local", cwd=built).stdout.split()[1])
    assert tree_bytes(remote) <= 1.2 * versioned, (tree_bytes(remote), versioned)
    stages = yaml.safe_load((built / "dvc.lock").read_text())["stages"]
    tracked = {out["path"] for stage in stages.values() for out in stage.get("outs", [])}
    assert tracked >= {f"data/shards/{s}" for s in SPLITS} | {f"data/lmdb/{s}" for s in SPLITS}
    in_remote = {p.parent.name + p.name for p in remote.rglob("*") if p.is_file()}  # files/md5/ab/cdef...
    assembled = {hashlib.md5((built / "data" / "lmdb" / s / "data.mdb").read_bytes()).hexdigest() for s in SPLITS}
    assert not assembled & in_remote  # derived locally: never uploaded
    shard = next((built / "data" / "shards" / "val").glob("*/data.mdb"))
    assert hashlib.md5(shard.read_bytes()).hexdigest() in in_remote


def test_dvc_metrics_show_prints_a_few_numbers_per_split(built: Path) -> None:
    shown = dvc("metrics", "show", "--json", cwd=built).stdout
    data = json.loads(shown)
    values = next(iter(data.values()))["data"]
    for split in SPLITS:
        metrics = values[f"reports/metrics/{split}.json"]["data"]
        assert set(metrics) == {"count", "ncm_accuracy", "chance_accuracy", "digest"}
        assert metrics["digest"] == digests(built)[f"shards/{split}"].split(":")[-1][:12]


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


# ----------------------------------------------------------------------------- called by path


def without_venv_on_path() -> dict[str, str]:
    """The environment of a shell where the venv is not activated: no `datumdb` on PATH."""
    env = {key: value for key, value in ENV.items() if key not in ("VIRTUAL_ENV", "DATUMDB_COMMAND")}
    env["PATH"] = "/usr/bin:/bin"
    assert shutil.which("datumdb", path=env["PATH"]) is None
    return env


def tracked_files(repo: Path) -> dict[str, bytes]:
    """The files git tracks in ``repo``, with their bytes (a deleted file is missing here)."""
    names = run(["git", "ls-files", "-z"], repo).stdout.split("\0")
    return {name: (repo / name).read_bytes() for name in filter(None, names) if (repo / name).is_file()}


@pytest.mark.parametrize("tool", ["snakemake", "dvc"])
def test_both_orchestrators_called_by_path_without_an_activated_venv(built: Path, tmp_path: Path, tool: str) -> None:
    repo = clone(built, tmp_path / "repo")
    env = without_venv_on_path()
    command = [str(BIN / "snakemake"), "--cores", "2"] if tool == "snakemake" else [str(BIN / "dvc"), "repro"]
    result = run_with(env, command, repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "command not found" not in result.stdout + result.stderr
    assert digests(repo) == digests(built)
    assert run(["datumdb", "pipeline", "stale"], repo).returncode == 0


def test_dvc_stages_that_cannot_find_datumdb_say_so_and_delete_nothing(built: Path, tmp_path: Path) -> None:
    """The stages' launcher, run where nothing provides datumdb: one line, exit 127, outputs kept."""
    repo = pulled_clone(built, tmp_path / "repo")
    before = tracked_files(repo)
    databases = digests(repo)
    env = {**without_venv_on_path(), "DVC_ROOT": str(tmp_path / "elsewhere")}
    replace_in_params(repo, "encoding: png", "encoding: jpg")  # every stage must run
    # DVC itself needs its venv, so it is the launcher run as the stage would, not under DVC.
    found = run_with(env, ["sh", "workflow/datumdb", "pipeline", "shards", "--params", "params.yaml", "x"], repo)
    assert found.returncode == 127
    assert found.stderr.count("\n") == 1 and "datumdb: command not found" in found.stderr
    # Under DVC, with a datumdb that fails before any work (as a missing one does): nothing deleted.
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\nexit 127\n")
    failing.chmod(0o755)
    result = run_with({**ENV, "DATUMDB_COMMAND": str(failing)}, [str(BIN / "dvc"), "repro"], repo)
    assert result.returncode != 0
    replace_in_params(repo, "encoding: jpg", "encoding: png")
    assert tracked_files(repo) == before
    assert digests(repo) == databases


@pytest.mark.parametrize(("old", "new"), [("seed: 3", "seed: 010"), ("count: 240", "count: 7.0")])
def test_a_refused_params_file_deletes_nothing_under_either_orchestrator(
    built: Path, tmp_path: Path, old: str, new: str
) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    before, databases = tracked_files(repo), digests(repo)
    mean = (repo / "data" / "mean" / "mean.npy").read_bytes()
    replace_in_params(repo, old, new)
    for command in ([str(BIN / "dvc"), "repro"], [str(BIN / "snakemake"), "--cores", "2"]):
        result = run_with(ENV, command, repo)
        assert result.returncode != 0
        assert "params.yaml: " in result.stdout + result.stderr
        assert digests(repo) == databases and (repo / "data" / "mean" / "mean.npy").read_bytes() == mean
        assert {**tracked_files(repo), "params.yaml": before["params.yaml"]} == before


# ----------------------------------------------------------------------------- two orchestrators, one clone


def dvc_repro_runs_nothing(repo: Path) -> bool:
    result = dvc("repro", cwd=repo)
    return "Running stage" not in result.stdout + result.stderr


def test_snakemake_and_dvc_in_one_clone_rebuild_nothing_that_is_fresh(built: Path, tmp_path: Path) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    shutil.copytree(built / ".snakemake", repo / ".snakemake")  # Snakemake has run here before
    assert nothing_to_do(repo) and status_clean(repo)
    # a param change rebuilt by DVC: fresh for Snakemake too (its records of the params are older)
    replace_in_params(repo, "encoding: png", "encoding: jpg")
    dvc("repro", cwd=repo)
    assert encodings(repo) == {"jpg"} and nothing_to_do(repo)
    # back to the committed version by git and dvc checkout: fresh for both
    run(["git", "checkout", "--", "."], repo)
    dvc("checkout", cwd=repo, check=False)  # the shard sets; the assembled databases are derived:
    dvc("repro", cwd=repo)  # assembled again from them
    assert encodings(repo) == {"png"} and nothing_to_do(repo) and status_clean(repo)
    # a param change rebuilt by plain Snakemake: recorded in DVC, so dvc repro runs no stage
    replace_in_params(repo, "seed: 3", "seed: 4")
    made = snakemake("--cores", "2", cwd=repo)
    assert "recording the outputs in DVC" in made.stdout + made.stderr
    assert status_clean(repo) and dvc_repro_runs_nothing(repo) and nothing_to_do(repo)
    # and dvc pull in a clone of that state, where Snakemake ran an older version
    commit_all(repo)
    dvc("push", cwd=repo)
    other = pulled_clone(built, tmp_path / "other")  # the older version, and Snakemake's records of it
    shutil.copytree(built / ".snakemake", other / ".snakemake")
    run(["git", "pull", "-q", str(repo), "main"], other)
    dvc("pull", "--allow-missing", cwd=other)
    dvc("repro", cwd=other)  # assembles the pulled shard sets
    assert digests(other) == digests(repo) and nothing_to_do(other) and status_clean(other)
    assert dvc_repro_runs_nothing(other)


def test_snakemake_on_another_params_file_or_targets_does_not_record_in_dvc(built: Path, tmp_path: Path) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    lock = (repo / "dvc.lock").read_text()
    replace_in_params(repo, "sample: 8", "sample: 5")  # only the reports are stale
    one = snakemake("--cores", "2", "reports/verify/train.json", cwd=repo)
    assert "not recorded in DVC" in one.stdout + one.stderr
    assert (repo / "dvc.lock").read_text() == lock
    other = repo / "other.yaml"
    shutil.copy(repo / "params.yaml", other)
    snakemake("--cores", "2", "--configfile", "other.yaml", cwd=repo)
    assert (repo / "dvc.lock").read_text() == lock


def test_pipeline_stale_lists_missing_outputs_in_a_fresh_clone(built: Path, tmp_path: Path) -> None:
    repo = clone(built, tmp_path / "repo")  # no dvc pull yet: the databases and the mean are missing
    result = run(["datumdb", "pipeline", "stale"], repo, check=False)
    assert result.returncode == 1
    missing = {line.removesuffix(": missing") for line in result.stdout.splitlines() if line.endswith(": missing")}
    assert missing == {f"data/lmdb/{s}/{n}" for s in SPLITS for n in ("data.mdb", "datumdb.json")} | {
        *(f"data/shards/{s}/shards.json" for s in SPLITS),
        "data/mean/mean.binaryproto",
        "data/mean/mean.npy",
        "reports/verify/train_samples.png",
        "reports/verify/val_samples.png",
        "reports/verify/test_samples.png",
    }


# ----------------------------------------------------------------------------- defaults and typos


def test_a_key_left_out_takes_its_default_under_both_orchestrators(built: Path, tmp_path: Path) -> None:
    repo = clone(built, tmp_path / "repo")
    replace_in_params(repo, "encoding: png\n", "")  # the documented default: none
    replace_in_params(repo, "verify:\n  sample: 8\n", "")  # verify.sample: 64
    commit_all(repo)
    other = clone(repo, tmp_path / "other")
    snakemake("--cores", "2", cwd=repo)
    dvc("repro", cwd=other)
    assert encodings(repo) == encodings(other) == {"none"}
    assert digests(repo) == digests(other)
    for folder in (repo, other):
        assert json.loads((folder / "reports" / "params.json").read_text())["verify"]["sample"] == 64
        assert status_clean(folder) and nothing_to_do(folder)


def test_a_misspelt_key_is_one_useful_line_under_both_orchestrators(built: Path, tmp_path: Path) -> None:
    repo = pulled_clone(built, tmp_path / "repo")
    replace_in_params(repo, "encoding: png", "encodng: png")
    for result in (snakemake("--cores", "2", cwd=repo, check=False), dvc("repro", cwd=repo, check=False)):
        assert result.returncode != 0
        said = (result.stdout + result.stderr).splitlines()
        useful = [line for line in said if "params.yaml" in line and "'encodng' was unexpected" in line]
        assert len(useful) == 1, said
        assert len(said) < 15 and "properties" not in "\n".join(line for line in said if line not in useful), said
    assert encodings(repo) == {"png"}


# ----------------------------------------------------------------------------- killed under DVC


def processes_in(folder: Path) -> list[int]:
    """The processes whose working directory is ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == folder:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _shards_process(repo: Path) -> int | None:
    """The `datumdb pipeline shards` process DVC runs in ``repo`` (the parent of its workers)."""
    for pid in processes_in(repo.resolve()):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"shards" in command and any(part.endswith(b"datumdb") for part in command[:2]):
            return pid
    return None


def test_a_killed_build_under_dvc_leaves_no_process_and_no_folder_behind(built: Path, tmp_path: Path) -> None:
    """kill -9 of the shards stage while its parts write: its workers die with it, nothing of the
    previous version is lost, and the next run removes the killed writers' partial folders and the
    shards no longer planned, ending fresh."""
    repo = pulled_clone(built, tmp_path / "repo")
    before = {p: p.read_bytes() for p in (repo / "data" / "shards").rglob("*") if p.is_file()}
    replace_in_params(repo, "count: 240", "count: 60000")  # long enough to be killed mid-way
    replace_in_params(repo, "  - 1\n", "  - 1\n  - 2\n  - 3\n")  # partition.shards: four workers' worth
    running = subprocess.Popen(
        [str(BIN / "dvc"), "repro"], cwd=repo, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not any((repo / "data" / "shards").glob("*/.*.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        builder = _shards_process(repo)
        assert builder is not None
        os.kill(builder, signal.SIGKILL)
        running.wait(60)
    finally:
        running.kill()
    time.sleep(1)
    assert running.returncode != 0
    assert processes_in(repo.resolve()) == []  # the workers died with the build
    assert encodings(repo) == {"png"} and digests(repo) == digests(built)  # persist: nothing deleted
    assert all(p.is_file() for p in before)  # every shard of the previous version is still whole
    replace_in_params(repo, "count: 60000", "count: 300")
    dvc("repro", cwd=repo)
    assert not any((repo / "data" / "shards").glob("*/.*.partial-*"))  # the next build removed them
    for split in SPLITS:  # and every shard folder is one the index lists
        listed = {s["name"] for s in json.loads((repo / "data/shards" / split / "shards.json").read_text())["shards"]}
        assert {p.name for p in (repo / "data/shards" / split).iterdir() if p.is_dir()} == listed
    assert status_clean(repo) and nothing_to_do(repo)


def data_files(repo: Path) -> list[Path]:
    """The files DVC caches (the assembled databases are derived: `cache: false`, one link)."""
    return [path for path in (repo / "data").rglob("*") if path.is_file() and "lmdb" not in path.parts]


def test_the_data_is_on_disk_once_after_snakemake_and_after_dvc_repro(built: Path, tmp_path: Path) -> None:
    assert all(path.stat().st_nlink == 2 for path in data_files(built))  # snakemake, then its dvc commit
    repo = pulled_clone(built, tmp_path / "repo")
    assert all(path.stat().st_nlink == 2 for path in data_files(repo))  # dvc pull
    replace_in_params(repo, "encoding: png", "encoding: jpg")
    dvc("repro", cwd=repo)
    assert data_files(repo) and all(path.stat().st_nlink == 2 for path in data_files(repo))  # dvc repro


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_add_of_an_input_folder_reruns_no_build(built: Path, tmp_path: Path) -> None:
    """inputs/README.md's advice: `dvc add inputs/images` writes inputs/images.dvc and
    inputs/.gitignore inside the `inputs` dependency; only the files the source reads count."""
    repo = pulled_clone(built, tmp_path / "repo")
    images = repo / "inputs" / "images"
    images.mkdir()
    for index in range(3):
        (images / f"{index}.txt").write_text(f"not read by the synthetic source {index}")
    dvc("add", "inputs/images", cwd=repo)
    assert (repo / "inputs" / "images.dvc").is_file() and (repo / "inputs" / ".gitignore").is_file()
    commit_all(repo)
    result = dvc("repro", cwd=repo)
    assert ran_stages(result.stdout + result.stderr) <= {"params"}
    assert status_clean(repo) and nothing_to_do(repo)
    assert digests(repo) == digests(built)


# ----------------------------------------------------------------------------- killed or failed under Snakemake


def output_bytes(repo: Path) -> dict[str, bytes]:
    """Every database file, mean and report, with its bytes (a deleted one is missing here)."""
    folders = [repo / "data" / "lmdb" / split for split in SPLITS] + [repo / "data" / "mean", repo / "reports"]
    return {
        str(path.relative_to(repo)): path.read_bytes()
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file()
    }


def leftovers(repo: Path) -> list[str]:
    """Build folders, asides and record files an interrupted job could leave behind."""
    lmdb = repo / "data" / "lmdb"
    found = [*lmdb.glob(".*.partial-*"), *lmdb.glob(".*.old-*"), *lmdb.glob(".records-*")]
    found += [path for path in (repo / "data" / "tmp").rglob("*") if path.is_file()]
    return sorted(str(path.relative_to(repo)) for path in found)


def snakemake_with_previous_run(built: Path, target: Path) -> Path:
    repo = clone(built, target)
    for folder in ("data", "reports", ".snakemake"):  # the outputs, and Snakemake's own records
        shutil.copytree(built / folder, repo / folder, dirs_exist_ok=True)
    return repo


def test_killing_snakemake_while_a_build_runs_deletes_nothing_and_leaves_nothing(built: Path, tmp_path: Path) -> None:
    """SIGTERM, then SIGKILL, to Snakemake's process group while a build job writes its database:
    the previous databases and reports stay byte for byte (Snakemake deletes a job's outputs
    before it runs it; a build's output is its receipt), no process is left, and the rerun
    removes the killed writer's folder and ends fresh, recorded in DVC."""
    repo = snakemake_with_previous_run(built, tmp_path / "repo")
    before = output_bytes(repo)
    replace_in_params(repo, "count: 240", "count: 60000")  # a build long enough to be killed mid-way
    running = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "2"],
        cwd=repo,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the jobs are in it too
    )
    try:
        deadline = time.monotonic() + 300
        while not any((repo / "data" / "lmdb").glob(".*.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any((repo / "data" / "lmdb").glob(".*.partial-*")), "no build job started"
        os.killpg(running.pid, signal.SIGTERM)  # Snakemake's own shutdown, then no more chances
        with contextlib.suppress(subprocess.TimeoutExpired):
            running.wait(10)
        os.killpg(running.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group had ended after the SIGTERM
    finally:
        running.kill()
        running.wait(60)
    time.sleep(1)
    assert running.returncode != 0
    assert processes_in(repo.resolve()) == []  # no datumdb (nor anything else) left running there
    assert output_bytes(repo) == before  # every previous database file and report, byte for byte
    replace_in_params(repo, "count: 60000", "count: 300")
    made = snakemake("--cores", "2", cwd=repo)
    assert "recording the outputs in DVC" in made.stdout + made.stderr
    assert leftovers(repo) == []
    assert read_manifest(repo / "data" / "lmdb" / "train")["count"] < 300 < 60000
    assert run(["datumdb", "pipeline", "stale"], repo).returncode == 0
    assert nothing_to_do(repo) and status_clean(repo)


@pytest.mark.parametrize(
    ("step", "old", "new"),
    [
        ("shards", "encoding: png", "encoding: jpg"),
        ("assemble", "encoding: png", "encoding: jpg"),
        ("verify", "sample: 8", "sample: 5"),
    ],
)
def test_a_failing_job_under_snakemake_leaves_the_previous_outputs_in_place(
    built: Path, tmp_path: Path, step: str, old: str, new: str
) -> None:
    repo = snakemake_with_previous_run(built, tmp_path / "repo")
    before = output_bytes(repo)
    replace_in_params(repo, old, new)  # the step must run again
    failed = run_with(killing_shim(tmp_path / "shim", step), [str(BIN / "snakemake"), "--cores", "2"], repo)
    assert failed.returncode != 0
    assert f"Error in rule {step}" in failed.stdout + failed.stderr
    after = output_bytes(repo)
    if step == "assemble":  # verify and mean read the shard sets: they may have run beside it
        before, after = ({k: v for k, v in files.items() if k.startswith("data/lmdb/")} for files in (before, after))
    assert after == before  # the failed job's outputs are the previous ones, byte for byte
    made = snakemake("--cores", "2", cwd=repo)  # the rerun redoes what failed
    assert f"rule {step}:" in made.stdout + made.stderr
    assert leftovers(repo) == []
    assert run(["datumdb", "pipeline", "stale"], repo).returncode == 0
    assert nothing_to_do(repo) and status_clean(repo)


@pytest.mark.parametrize(
    ("deleted", "jobs"),
    [
        # an assembled database is derived from its shard set: only its split is assembled again (verify
        # and mean read the shard sets)
        ("data/lmdb/val/data.mdb", {"assemble": "1", "all": "1"}),
        ("data/lmdb/train/datumdb.json", {"assemble": "1", "all": "1"}),
        # a shard set's index: written again, and what reads the set runs again
        ("data/shards/test/shards.json", {"index": "1", "assemble": "1", "verify": "1", "report": "1", "all": "1"}),
        ("reports/verify/test_labels.csv", {"verify": "1", "report": "1", "all": "1"}),
        ("data/mean/mean.npy", {"mean": "1", "report": "1", "all": "1"}),
        ("reports/summary.md", {"report": "1", "all": "1"}),
    ],
)
def test_a_deleted_output_makes_its_job_rerun_under_snakemake(
    built: Path, tmp_path: Path, deleted: str, jobs: dict[str, str]
) -> None:
    repo = snakemake_with_previous_run(built, tmp_path / "repo")
    assert nothing_to_do(repo)
    (repo / deleted).unlink()
    plan = snakemake("-n", cwd=repo)
    planned = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout + plan.stderr, re.M))
    assert {k: v for k, v in planned.items() if k != "total"} == jobs
    if deleted.startswith(("data/lmdb/val", "data/shards")):  # the run puts it back: fresh for both orchestrators
        snakemake("--cores", "2", cwd=repo)
        assert digests(repo) == digests(built) and nothing_to_do(repo) and status_clean(repo)


def test_a_deleted_shard_is_rebuilt_by_its_part_alone_and_nothing_else_changes(built: Path, tmp_path: Path) -> None:
    repo = snakemake_with_previous_run(built, tmp_path / "repo")
    index = json.loads((repo / "data" / "shards" / "val" / "shards.json").read_text())
    shard = repo / "data" / "shards" / "val" / index["shards"][0]["name"]
    shutil.rmtree(shard)
    plan = snakemake("-n", cwd=repo)
    planned = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout + plan.stderr, re.M))
    assert planned.get("shards") == "1", planned  # the one part holding it
    made = snakemake("--cores", "2", cwd=repo)
    logs = "".join(p.read_text() for p in (repo / "logs" / "shards").glob("*.log"))
    assert re.search(r": 1 of \d+ shards built", logs), logs
    assert digests(repo) == digests(built)
    assert "recording the outputs in DVC" in made.stdout + made.stderr
    assert nothing_to_do(repo) and status_clean(repo)
