"""The workflow for real: Snakemake and DVC over one params.yaml, in throwaway copies of the repo.

This is the reproducibility check CI runs (`.ci/run` -> `make test`): the committed dvc.lock is
reproduced by `dvc repro` from a fresh copy; on the small params of `.test/params.yaml`,
Snakemake and DVC make identical bytes, `dvc status` stays clean after builds and reads, a
changed parameter reruns only what depends on it, a push/clone/pull round trip gives the same
digests (and leaves Snakemake nothing to do), and bad params fail with a clear message before
any work. tests/test_workflow_scenarios.py has the failure, YAML and sharing scenarios.

The copies are made from the working tree (tracked and untracked, not ignored files), so the
check covers uncommitted changes too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lmdb
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

from datumdb import DatumReader
from datumdb.verify import content_digest

pytestmark = pytest.mark.integration


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def digests(repo: Path) -> dict[str, str]:
    """The content digests of the assembled databases and of every shard."""
    found = {split: content_digest(repo / "data" / "lmdb" / split) for split in SPLITS}
    for split in SPLITS:
        for shard in sorted((repo / "data" / "shards" / split).iterdir()):
            if shard.is_dir():
                found[f"{split}/{shard.name}"] = content_digest(shard)
    return found


ASSEMBLE = {"assemble"}  # one stage over the splits (in parallel processes: DVC runs a stage at a time)
VERIFY = {"verify"}


def metric_digests(repo: Path) -> dict[str, str]:
    return {s: json.loads((repo / "reports" / "verify" / f"{s}.json").read_text())["digest"] for s in SPLITS}


def nothing_to_do(repo: Path) -> bool:
    plan = snakemake("-n", cwd=repo)
    return "Nothing to be done" in plan.stdout + plan.stderr


def set_params(repo: Path, **changes: object) -> None:
    """Change params.yaml keys given as dotted names with '__' (verify__sample=5)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the repo on .test/params.yaml, built by Snakemake and committed to DVC and git."""
    repo, log = tiny_built_repo(tmp_path_factory.mktemp("tiny"), tmp_path_factory.mktemp("remote"))
    assert "Execute 2 jobs" in log  # the two shards were encoded concurrently
    yield repo


def test_committed_dvc_lock_is_reproduced_by_dvc_repro_from_a_fresh_copy(tmp_path: Path) -> None:
    repo = copy_worktree(tmp_path / "fresh")
    dvc("repro", cwd=repo)
    diff = run(["git", "diff", "--exit-code", "--stat", "dvc.lock"], repo, check=False)
    assert diff.returncode == 0, f"dvc.lock is stale; run `make dataset` and commit dvc.lock:\n{diff.stdout}"
    assert run(["git", "status", "--porcelain"], repo).stdout == ""  # reports/ reproduced byte for byte
    assert status_clean(repo)
    assert ran_stages(dvc("repro", cwd=repo).stdout) == set()


def test_snakemake_build_leaves_dvc_status_clean_even_after_reads(tiny: Path) -> None:
    assert status_clean(tiny)
    assert nothing_to_do(tiny)
    assert not (tiny / "data" / "tmp").exists() or not any((tiny / "data" / "tmp").rglob("*.rec"))  # temp()
    for split in SPLITS:
        db = tiny / "data" / "lmdb" / split
        assert sorted(p.name for p in db.iterdir()) == ["data.mdb", "datumdb.json"]
        run(["datumdb", "verify", str(db)], tiny)
        run(["datumdb", "inspect", str(db)], tiny)
        with DatumReader(db) as reader:
            list(reader)
    assert status_clean(tiny)
    # A careless locking reader creates lock.mdb inside an output: .dvcignore keeps the status clean.
    db = tiny / "data" / "lmdb" / "val"
    env = lmdb.open(str(db), readonly=True, lock=True)
    env.close()
    assert (db / "lock.mdb").exists()
    try:
        assert status_clean(tiny)
    finally:
        (db / "lock.mdb").unlink()


def test_dvc_repro_in_a_fresh_clone_makes_what_snakemake_made(tiny: Path, tmp_path: Path) -> None:
    fresh = clone(tiny, tmp_path / "clone")
    assert not (fresh / "data").exists()
    output = dvc("repro", cwd=fresh).stdout
    # report's inputs come out byte-identical (they are in git), so DVC does not rerun it
    assert ran_stages(output) == {"shards", *ASSEMBLE, *VERIFY, "mean"}
    assert run(["git", "diff", "--exit-code", "dvc.lock"], fresh, check=False).returncode == 0
    assert run(["git", "status", "--porcelain"], fresh).stdout == ""
    assert digests(fresh) == digests(tiny)
    assert metric_digests(fresh) == metric_digests(tiny)
    for split in SPLITS:
        for name in ("data.mdb", "datumdb.json"):
            assert (fresh / "data/lmdb" / split / name).read_bytes() == (tiny / "data/lmdb" / split / name).read_bytes()
    assert (fresh / "data/mean/mean.binaryproto").read_bytes() == (tiny / "data/mean/mean.binaryproto").read_bytes()
    assert status_clean(fresh)
    assert ran_stages(dvc("repro", cwd=fresh).stdout) == set()
    assert nothing_to_do(fresh)  # one state: Snakemake accepts what DVC made


def test_push_then_pull_in_a_fresh_clone_gives_the_same_digests(tiny: Path, tmp_path: Path) -> None:
    dvc("push", cwd=tiny)
    remote = dvc("remote", "list", "--local", cwd=tiny).stdout.split()[1]
    fresh = clone(tiny, tmp_path / "pulled")
    dvc("remote", "modify", "--local", "storage", "url", remote, cwd=fresh)
    dvc("pull", "--allow-missing", cwd=fresh)  # the shard sets: the remote holds no assembled database
    assert not (fresh / "data" / "lmdb" / "train").exists() and not status_clean(fresh)
    assert ran_stages(dvc("repro", cwd=fresh).stdout) == ASSEMBLE  # derived locally, nothing else reruns
    assert digests(fresh) == digests(tiny)
    assert status_clean(fresh)
    assert run(["git", "status", "--porcelain"], fresh).stdout == ""  # dvc.lock: the same bytes
    assert ran_stages(dvc("repro", cwd=fresh).stdout) == set()
    assert nothing_to_do(fresh)  # file times from the pull do not matter to Snakemake
    run(["datumdb", "verify", "data/lmdb/train", "--params", "params.yaml"], fresh)
    # dvc checkout after losing the data: the same.
    shutil.rmtree(fresh / "data")
    dvc("checkout", cwd=fresh, check=False)  # the cached outputs (the assembled databases are not cached)
    assert ran_stages(dvc("repro", cwd=fresh).stdout) == ASSEMBLE
    assert digests(fresh) == digests(tiny)
    assert nothing_to_do(fresh)


def _remote_files(remote: Path) -> set[str]:
    return {str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()}


def test_appended_samples_rebuild_and_push_only_the_shards_they_fall_in(tiny: Path, tmp_path: Path) -> None:
    """A version's cost follows the change: 4 samples appended to 240 rebuild the last shards of
    their splits (every other shard keeps its file), `dvc push` uploads only those, and both
    orchestrators then agree there is nothing to do."""
    dvc("push", cwd=tiny)
    remote = Path(dvc("remote", "list", "--local", cwd=tiny).stdout.split()[1])
    repo = clone(tiny, tmp_path / "append")
    dvc("remote", "modify", "--local", "storage", "url", str(remote), cwd=repo)
    dvc("pull", "--allow-missing", cwd=repo)
    dvc("repro", cwd=repo)
    before = {p: p.stat().st_ino for p in (repo / "data" / "shards").rglob("data.mdb")}
    pushed = _remote_files(remote)
    set_params(repo, dataset__count=244)
    snakemake("--cores", "2", cwd=repo)
    logs = "".join(p.read_text() for p in (repo / "logs" / "shards").glob("*.log"))
    built = [int(n) for n in re.findall(r"(\d+) of \d+ shards built", logs)]
    after = {p: p.stat().st_ino for p in (repo / "data" / "shards").rglob("data.mdb")}
    kept = [p for p in after if before.get(p) == after[p]]
    assert len(after) - len(kept) <= 6 and len(kept) >= len(before) - 3, (len(before), len(after), len(kept))
    assert status_clean(repo)  # recorded in DVC by Snakemake's success hook
    recorded = (repo / "dvc.lock").read_bytes()  # by datumdb.pipeline.record: dvc commit, no run cache
    dvc("commit", "--force", cwd=repo)
    assert (repo / "dvc.lock").read_bytes() == recorded
    assert nothing_to_do(repo)
    dvc("push", cwd=repo)
    new = _remote_files(remote) - pushed
    assert 1 <= len(new) <= 2 * (len(after) - len(kept)) + 6, sorted(new)  # the new shards' files, the .dir lists
    assert sum(built) == len(after) - len(kept)  # what the part jobs say they built: only those
    assert ran_stages(dvc("repro", cwd=repo).stdout) == set()


def test_a_changed_param_reruns_only_the_stages_that_depend_on_it(tiny: Path, tmp_path: Path) -> None:
    repo = clone(tiny, tmp_path / "params")
    remote = dvc("remote", "list", "--local", cwd=tiny).stdout.split()[1]
    dvc("remote", "modify", "--local", "storage", "url", remote, cwd=repo)
    dvc("pull", "--allow-missing", cwd=repo)
    dvc("repro", cwd=repo)  # assembles the databases
    set_params(repo, verify__sample=5)
    status = dvc("status", cwd=repo).stdout  # the params stage resolves params.yaml for the others
    assert set(re.findall(r"^(\S+):$", status, re.M)) == {"params"}
    ran = ran_stages(dvc("repro", cwd=repo).stdout)
    assert ran == {"params", *VERIFY, "report"}
    set_params(repo, encoding="none")
    ran = ran_stages(dvc("repro", cwd=repo).stdout)
    assert ran == {"params", "shards", *ASSEMBLE, *VERIFY, "mean", "report"}
    set_params(repo, partition__shards=[0, 1, 2])  # cuts the work differently; the bytes do not change
    assert ran_stages(dvc("repro", cwd=repo).stdout) == {"params"}
    # Snakemake sees the same dependency: a new verify sample size reruns only verify (and what follows).
    set_params(tiny, verify__sample=5)
    try:
        plan = snakemake("-n", cwd=tiny)
        jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout + plan.stderr, re.M))
        assert {k: v for k, v in jobs.items() if k != "total"} == {"verify": "3", "report": "1", "all": "1"}
        set_params(tiny, verify__sample=8, partition__shards=[0, 1, 2])
        assert nothing_to_do(tiny)
    finally:
        run(["git", "checkout", "params.yaml"], tiny)


def test_a_code_change_reruns_the_params_stage_then_only_the_stages_of_that_step(tiny: Path, tmp_path: Path) -> None:
    """The stages take their step's code digest from the params stage, which lists the code files:
    an edit of the assemble step's code reruns params and assemble, and nothing else."""
    repo = clone(tiny, tmp_path / "code")  # (DVC builds its outputs: none were pushed)
    # the stages run this clone's own code (as in a user's checkout with an editable install)
    command = tmp_path / "datumdb-of-the-clone"
    command.write_text(f'#!/bin/sh\nPYTHONPATH={repo / "src"} exec {sys.executable} -P -m datumdb "$@"\n')
    command.chmod(0o755)
    env = {**ENV, "DATUMDB_COMMAND": str(command)}

    def repro() -> set[str]:
        done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, text=True, capture_output=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return ran_stages(done.stdout)

    repro()
    assert repro() == set()
    databases = {split: (repo / "data/lmdb" / split / "data.mdb").read_bytes() for split in SPLITS}
    with (repo / "src/datumdb/pipeline/assemble.py").open("a") as code:
        code.write("# an edit of the assemble step's code\n")
    status = dvc("status", cwd=repo).stdout
    assert set(re.findall(r"^(\S+):$", status, re.M)) == {"params"}
    assert repro() == {"params", *ASSEMBLE}
    assert {split: (repo / "data/lmdb" / split / "data.mdb").read_bytes() for split in SPLITS} == databases
    assert repro() == set() and status_clean(repo)


def test_snakemake_lint_has_only_the_explained_warning(tiny: Path) -> None:
    lint = snakemake("--lint", cwd=tiny, check=False)
    kinds = set(re.findall(r"^\s+\* (.+?):$", lint.stdout + lint.stderr, re.M))
    assert kinds == {"Specify a conda environment or container for each rule."}  # see README, "Lint"


def test_snakemake_report_shows_contact_sheets_and_metrics(tiny: Path) -> None:
    snakemake("--report", "report.html", cwd=tiny)
    html = (tiny / "report.html").read_text(encoding="utf-8", errors="replace")
    for name in ("val_samples.png", "val.json", "val_labels.csv", "mean.json", "summary.md"):
        assert name in html
    (tiny / "report.html").unlink()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"verify": {"sample": 8, "samples": 3}}, "'samples' was unexpected"),
        ({"build": {"batch_size": "big"}}, "'big' is not of type 'integer'"),
        ({"split": {"train": 0.5, "val": 0.3, "test": 0.3}}, "split.train + split.val + split.test must be 1"),
        ({"dataset": {"source": "mnist"}}, "inputs/train-images-idx3-ubyte"),
        ({"partition": {"shards": [0, 2]}}, "partition.shards must be the ids 0, 1, ..., n-1"),
        ({"encoding": "webp"}, "'webp' is not one of"),
    ],
)
def test_bad_params_fail_with_a_clear_message_before_any_work(
    tiny: Path, tmp_path: Path, bad: dict[str, object], message: str
) -> None:
    repo = clone(tiny, tmp_path / "bad")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for group, values in bad.items():  # a whole params file with the bad values in it
        params[group] = {**params[group], **values} if isinstance(values, dict) else values
    (repo / "bad.yaml").write_text(yaml.safe_dump(params))
    result = snakemake("--cores", "1", "--configfile", "bad.yaml", cwd=repo, check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (repo / "data").exists() and not (repo / "logs").exists()


def test_a_local_mnist_source_runs_through_both_orchestrators(tiny: Path, tmp_path: Path) -> None:
    repo = clone(tiny, tmp_path / "mnist")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60).astype(np.uint8)
    images = (labels[:, None, None] * 80 + rng.integers(0, 40, (60, 8, 8))).astype(np.uint8)
    (repo / "inputs" / "train-images-idx3-ubyte").write_bytes(
        b"\0\0\x08\x03" + struct_sizes(60, 8, 8) + images.tobytes()
    )
    (repo / "inputs" / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + struct_sizes(60) + labels.tobytes())
    set_params(repo, dataset__source="mnist")
    snakemake("--cores", "2", cwd=repo)
    metrics = json.loads((repo / "reports" / "verify" / "val.json").read_text())  # the full report
    assert (metrics["source"], metrics["shape"]) == ("mnist", [1, 8, 8])
    assert 5 <= metrics["count"] <= 25  # about a quarter of 60: a hash of each sample's identity decides
    assert metrics["ncm_accuracy"] > 0.9
    dvc("commit", "--force", cwd=repo)
    assert status_clean(repo)
    commit_all(repo)
    again = clone(repo, tmp_path / "mnist-repro")
    dvc("repro", cwd=again)
    assert digests(again) == digests(repo)
    assert run(["git", "diff", "--exit-code", "dvc.lock"], again, check=False).returncode == 0


def test_photos_of_varied_sizes_stored_unchanged_through_both_orchestrators(tiny: Path, tmp_path: Path) -> None:
    """The image-folder case: real photos, many sizes, ``encoding: original``, no resize."""
    from test_pipeline_imageset import KEY, _photos

    repo = clone(tiny, tmp_path / "photos")
    images = repo / "inputs" / "images"
    listed = _photos(images, count=30)
    (repo / "inputs" / "list.txt").write_text("".join(f"{name} {label}\n" for name, label in listed))
    set_params(repo, dataset__source="imageset", encoding="original")
    snakemake("--cores", "2", cwd=repo)
    stored: dict[str, str] = {}
    for split in SPLITS:
        with DatumReader(repo / "data" / "lmdb" / split) as reader:
            for key, datum in reader.datums():
                path = KEY.fullmatch(key).group(2).decode()  # type: ignore[union-attr]
                assert datum.encoded and bytes(datum.data) == (images / path).read_bytes()
                assert path not in stored
                stored[path] = split
    assert sorted(stored) == sorted(name for name, _ in listed)  # each listed photo in exactly one split
    summary = (repo / "reports" / "summary.md").read_text()
    assert "| NO |" not in summary and "No train mean" in summary
    dvc("commit", "--force", cwd=repo)
    assert status_clean(repo)
    assert not list((repo / "data").rglob("lock.mdb"))
    commit_all(repo)
    again = clone(repo, tmp_path / "photos-repro")
    shutil.copytree(repo / "inputs", again / "inputs", dirs_exist_ok=True)
    dvc("repro", cwd=again)
    assert digests(again) == digests(repo)


def struct_sizes(*sizes: int) -> bytes:
    """Big-endian uint32 sizes of an idx header."""
    return b"".join(size.to_bytes(4, "big") for size in sizes)


def test_snakemake_and_dvc_pass_no_values_on_their_command_lines(tiny: Path) -> None:
    """Both run `datumdb pipeline STEP --params params.yaml` with fixed paths: no value to quote."""
    plan = snakemake("-n", "-p", "--forceall", cwd=tiny)
    snakemake_commands = re.findall(r"^Shell command: (\S*datumdb .+)$", plan.stdout + plan.stderr, re.M)
    lock = yaml.safe_load((tiny / "dvc.lock").read_text())
    dvc_commands = [stage["cmd"] for stage in lock["stages"].values()]
    # Snakemake: the parts that have work (two at most), 3 index, 3 assemble, 3 verify, mean, report;
    # DVC: params, shards, assemble, verify (every split each), mean, report
    assert 1 + 3 + 3 + 3 + 1 + 1 <= len(snakemake_commands) <= 2 + 3 + 3 + 3 + 1 + 1
    assert len(dvc_commands) == 1 + 1 + 1 + 1 + 1 + 1
    params = yaml.safe_load((tiny / "params.yaml").read_text())
    values = {str(params["seed"]), params["encoding"], str(params["build"]["batch_size"])}
    for command in snakemake_commands + dvc_commands:
        runner = f"{BIN / 'datumdb'} " if command in snakemake_commands else "sh workflow/datumdb "
        assert command.startswith(f"{runner}--no-progress pipeline ") and "--params params.yaml" in command
        assert not values & set(command.split()), command


def test_the_record_in_dvc_fails_in_one_line_outside_a_dvc_repository(tmp_path: Path) -> None:
    """What Snakemake's success hook runs; its failure is one line (the hook then says to run
    `dvc commit` by hand), never a traceback."""
    done = subprocess.run(
        [sys.executable, "-P", "-m", "datumdb.pipeline.record"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("datumdb: dvc commit failed: ") and done.stderr.count("\n") == 1, done.stderr
