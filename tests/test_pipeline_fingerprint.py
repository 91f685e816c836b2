"""datumdb.pipeline.fingerprint and .outputs: what each output records, which outputs are stale, STEP_CODE."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from datumdb.cli import main
from datumdb.errors import InputError
from datumdb.pipeline import outputs
from datumdb.pipeline.config import load_config
from datumdb.pipeline.fingerprint import PACKAGE_DIR, STEP_CODE, code_digest, file_sha256, fingerprint, input_digest
from datumdb.pipeline.outputs import (
    RESOLVED_PARAMS,
    database_matches_params,
    missing_outputs,
    output_files,
    stale_outputs,
)
from datumdb.pipeline.plan import make_plan
from datumdb.pipeline.splits import SPLITS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
INDEXES = {f"{outputs.shard_set(split)}/shards.json" for split in SPLITS}
DATABASES = {f"{outputs.database(split)}/datumdb.json" for split in SPLITS}
VERIFY = {outputs.verify_details(split) for split in SPLITS}
ALL = INDEXES | DATABASES | VERIFY | {outputs.MEAN_JSON}


def _params(root: Path, **changes: Any) -> Path:
    """A tiny arrays dataset's params under ``root`` (inputs in root/in), with top-level ``changes``."""
    params: dict[str, Any] = {
        "dataset": {"source": "arrays", "input_dir": str(root / "in")},
        "seed": 2,
        "partition": {"shards": [0, 1]},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        "encoding": "none",
        "build": {"batch_size": 5, "map_size": 1 << 20, "shard_size": 4},
        "verify": {"sample": 4},
    }
    params.update(changes)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _inputs(root: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 30)
    images = (labels[:, None, None, None] * 60 + rng.integers(0, 40, (30, 3, 5, 5))).astype(np.uint8)
    (root / "in").mkdir(parents=True, exist_ok=True)
    np.save(root / "in" / "X.npy", images)
    np.save(root / "in" / "y.npy", labels)


def _run_pipeline(params: Path, root: Path) -> None:
    """Every step the workflow runs, writing to the paths of datumdb.pipeline.outputs under ``root``."""
    p = ["--no-progress", "pipeline"]
    assert main([*p, "shards", "--params", str(params), str(root / outputs.SHARDS), "--jobs", "1"]) == 0
    for split in SPLITS:
        argv = [*p, "assemble", "--params", str(params), "--split", split, str(root / outputs.shard_set(split))]
        assert main([*argv, str(root / outputs.database(split))]) == 0
    for split in SPLITS:
        argv = [*p, "verify", "--params", str(params), "--split", split, str(root / outputs.shard_set(split))]
        argv += ["--train-db", str(root / outputs.shard_set("train"))]
        argv += ["--details", str(root / outputs.verify_details(split))]
        argv += ["--metrics", str(root / outputs.metrics(split)), "--histogram", str(root / outputs.histogram(split))]
        assert main([*argv, "--sheet", str(root / outputs.sheet(split))]) == 0
    argv = [*p, "mean", "--params", str(params), str(root / outputs.shard_set("train"))]
    argv += ["--binaryproto", str(root / outputs.MEAN_BINARYPROTO), "--npy", str(root / outputs.MEAN_NPY)]
    assert main([*argv, "--json", str(root / outputs.MEAN_JSON)]) == 0
    argv = [*p, "report", "--params", str(params), *(str(root / outputs.verify_details(s)) for s in SPLITS)]
    assert main([*argv, "--mean", str(root / outputs.MEAN_JSON), "--output", str(root / outputs.SUMMARY)]) == 0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with inputs, params.yaml and every output of one pipeline run (read only)."""
    root = tmp_path_factory.mktemp("built")
    _inputs(root)
    _run_pipeline(_params(root), root)
    return root


# ----------------------------------------------------------------------------- stale outputs


def test_nothing_is_stale_right_after_a_run(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(built / "params.yaml")
    assert all((built / name).is_file() for name in ALL)
    assert stale_outputs(config, built) == {}
    capsys.readouterr()
    assert main(["pipeline", "stale", "--params", str(built / "params.yaml"), "--root", str(built)]) == 0
    assert "every output exists and matches the params" in capsys.readouterr().out


def test_missing_outputs_are_not_stale_but_the_stale_step_lists_them(
    tmp_path: Path, built: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stale_outputs(load_config(built / "params.yaml"), tmp_path) == {}
    capsys.readouterr()
    assert main(["pipeline", "stale", "--params", str(built / "params.yaml"), "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines()[:2] == [
        "data/shards/train/shards.json: missing",
        "data/shards/val/shards.json: missing",
    ]
    assert missing_outputs(tmp_path) == output_files()
    assert missing_outputs(built) == []
    (built / "reports" / "summary.md").rename(tmp_path / "summary.md")
    try:
        assert main(["pipeline", "stale", "--params", str(built / "params.yaml"), "--root", str(built)]) == 1
        assert capsys.readouterr().out == "reports/summary.md: missing\n"
    finally:
        (tmp_path / "summary.md").rename(built / "reports" / "summary.md")


@pytest.mark.parametrize(
    ("changes", "stale", "reason"),
    [
        ({"encoding": "png"}, ALL, 'encoding: "none" in the output, "png" in the params'),
        ({"seed": 3}, ALL, None),
        ({"split": {"train": 0.5, "val": 0.3, "test": 0.2}}, ALL, None),
        ({"build": {"batch_size": 6, "map_size": 1 << 20, "shard_size": 4}}, ALL, None),
        ({"verify": {"sample": 5}}, VERIFY, "verify.sample: 4 in the output, 5 in the params"),
        ({"partition": {"shards": [0, 1, 2]}}, set(), None),  # cuts the work only
    ],
)
def test_changed_params_make_exactly_the_outputs_they_shape_stale(
    built: Path, tmp_path: Path, changes: dict[str, Any], stale: set[str], reason: str | None
) -> None:
    params = _params(tmp_path, **{**changes, "dataset": {"source": "arrays", "input_dir": str(built / "in")}})
    found = stale_outputs(load_config(params), built)
    assert set(found) == stale
    for name in stale & (DATABASES | {outputs.MEAN_JSON} | (VERIFY - VERIFY if "verify" in changes else VERIFY)):
        assert any(r.startswith(("made from an older ", "made from another version")) for r in found[name]), found
    if reason is not None and "verify" in changes:
        assert all(any(r.startswith(reason) for r in found[name]) for name in VERIFY), found
    if reason is not None and "encoding" in changes:  # the shards themselves say which key differs
        problems = database_matches_params(built / outputs.shard_set("val"), params)
        assert problems and all(reason in problem for problem in problems), problems


def test_changed_input_bytes_make_the_outputs_of_their_split_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path
    _inputs(root)
    params = _params(root)
    _run_pipeline(params, root)
    config = load_config(params)
    np.save(root / "in" / "y.npy", np.load(root / "in" / "y.npy"))  # rewritten, same bytes: not stale
    assert stale_outputs(config, root) == {}
    plan = make_plan(config, {})
    split = next(s for s in SPLITS for task in plan.shards[s] for member in task.members if member[0] == 0)
    labels = np.load(root / "in" / "y.npy")
    labels[0] = (labels[0] + 1) % 3
    np.save(root / "in" / "y.npy", labels)
    found = stale_outputs(config, root)
    expected = {f"{outputs.shard_set(split)}/shards.json", f"{outputs.database(split)}/datumdb.json"}
    expected |= VERIFY if split == "train" else {outputs.verify_details(split)}
    expected |= {outputs.MEAN_JSON} if split == "train" else set()
    assert set(found) == expected  # the other splits' outputs stay current
    capsys.readouterr()
    assert main(["pipeline", "stale", "--params", str(params), "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert all(f"{name}: stale:" in out for name in expected)
    problems = database_matches_params(root / outputs.shard_set(split), params)
    assert len(problems) == 1 and "its members (samples, labels or file contents) changed" in problems[0], problems


def test_a_damaged_record_of_the_fingerprint_is_stale(tmp_path: Path, built: Path) -> None:
    root = shutil.copytree(built, tmp_path / "copy")
    (root / outputs.MEAN_JSON).write_text("{not json")
    found = stale_outputs(load_config(built / "params.yaml"), root)
    assert set(found) == {outputs.MEAN_JSON}
    assert "no pipeline fingerprint recorded" in found[outputs.MEAN_JSON][0]


# ----------------------------------------------------------------------------- database vs params


def test_database_matches_params_and_the_verify_command(
    tmp_path: Path, built: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = built / "params.yaml"
    for split in SPLITS:
        for db in (built / outputs.shard_set(split), built / outputs.database(split)):
            assert database_matches_params(db, params) == []
            assert main(["--no-progress", "verify", str(db), "--params", str(params)]) == 0
    capsys.readouterr()
    other = _params(tmp_path, encoding="png", dataset={"source": "arrays", "input_dir": str(built / "in")})
    db = built / outputs.database("val")
    problems = database_matches_params(db, other)
    assert problems == [f"{db}: does not match {other}: made from another version of the shard set"]
    assert main(["--no-progress", "verify", str(db), "--params", str(other)]) == 1
    err = capsys.readouterr().err
    assert "made from another version of the shard set" in err and "FAILED" in err
    assert main(["--no-progress", "verify", str(db), "--params", str(tmp_path / "missing.yaml")]) == 2


def test_a_database_not_built_by_the_pipeline_does_not_match(tmp_path: Path, built: Path) -> None:
    db = tmp_path / "db"
    assert (
        main(["--no-progress", "convert-arrays", str(built / "in" / "X.npy"), str(built / "in" / "y.npy"), str(db)])
        == 0
    )
    problems = database_matches_params(db, built / "params.yaml")
    assert len(problems) == 1 and "not built by the datumdb pipeline" in problems[0]
    assert main(["--no-progress", "verify", "--in-process", str(db), "--params", str(built / "params.yaml")]) == 1


def test_each_shard_records_what_the_plan_says(built: Path) -> None:
    config = load_config(built / "params.yaml")
    plan = make_plan(config, {})
    for task in plan.shards["test"]:
        manifest = json.loads((built / outputs.shard_set("test") / task.name / "datumdb.json").read_text())
        assert manifest["metadata"]["pipeline"] == task.record
        what = {k: v for k, v in task.record.items() if k != "fingerprint"}
        assert task.record["fingerprint"] == fingerprint(what)
    index = json.loads((built / outputs.shard_set("test") / "shards.json").read_text())
    assert index["pipeline"] == {"fingerprint": plan.split_fingerprints["test"]}


# ----------------------------------------------------------------------------- fingerprints and digests


@given(
    what=st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers())),
        min_size=1,
    )
)
def test_fingerprint_is_canonical_and_sees_every_value(what: dict[str, Any]) -> None:
    reordered = dict(reversed(list(what.items())))
    assert fingerprint(reordered) == fingerprint(what)
    assert fingerprint(what).startswith("sha256:") and len(fingerprint(what)) == 7 + 64
    key = next(iter(what))
    assert fingerprint({**what, key: [what[key]]}) != fingerprint(what)


def test_input_digest_sees_names_and_bytes_and_its_cache_skips_unchanged_files(tmp_path: Path) -> None:
    _inputs(tmp_path)
    config = load_config(_params(tmp_path))
    first = input_digest(config)
    cache: dict[str, Any] = {}
    assert input_digest(config, cache) == first
    assert set(cache) == {str((tmp_path / "in" / name).absolute()) for name in ("X.npy", "y.npy")}
    cached_y = str((tmp_path / "in" / "y.npy").absolute())
    cache[cached_y][3] = "0" * 64  # a cached hash is used while the file's stat is unchanged
    assert input_digest(config, cache) != first
    shutil.copy(tmp_path / "in" / "y.npy", tmp_path / "in" / "labels.npy")
    renamed = _params(
        tmp_path, dataset={"source": "arrays", "input_dir": str(tmp_path / "in"), "arrays": {"labels": "labels.npy"}}
    )
    assert input_digest(load_config(renamed)) != first  # same bytes under another name
    synthetic = load_config(_params(tmp_path / "s", dataset={"source": "synthetic"}))
    assert input_digest(synthetic) == "sha256:" + hashlib.sha256(b"").hexdigest()  # no files


# ----------------------------------------------------------------------------- STEP_CODE


def test_every_step_code_file_exists() -> None:
    assert set(STEP_CODE) == {"shards", "assemble", "verify", "mean", "report"}
    for step, files in STEP_CODE.items():
        assert list(files) == sorted(set(files)), step
        for name in files:
            assert (PACKAGE_DIR / name).is_file(), f"{step}: {name}"


_LOADED = """
import json, sys
{call}
print(json.dumps(sorted(m for m in sys.modules if m == "datumdb" or m.startswith("datumdb."))))
"""


def _loaded(call: str, cwd: Path) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _LOADED.format(call=call)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _module_file(name: str) -> str:
    import importlib

    path = Path(importlib.import_module(name).__file__).resolve()  # type: ignore[arg-type]
    return path.relative_to(PACKAGE_DIR).as_posix()


STEP_MODULE = {
    "shards": "datumdb.pipeline.shards",
    "assemble": "datumdb.pipeline.assemble",
    "verify": "datumdb.pipeline.check",
    "mean": "datumdb.pipeline.mean",
    "report": "datumdb.pipeline.summary",
}


def test_step_code_lists_every_datumdb_module_a_step_loads(built: Path, tmp_path: Path) -> None:
    params = str(built / "params.yaml")
    sets = built / outputs.SHARDS
    verify = [str(sets / "val"), "--train-db", str(sets / "train"), "--details", "v.json", "--metrics", "m.json"]
    verify += ["--histogram", "h.csv", "--sheet", "s.png"]
    mean = [str(sets / "train"), "--binaryproto", "m.bp", "--npy", "m.npy", "--json", "m.json"]
    report = [str(built / outputs.verify_details(s)) for s in SPLITS]
    report += ["--mean", str(built / outputs.MEAN_JSON), "--output", "summary.md"]
    argv = {
        "shards": ["shards", "--params", params, "shards", "--jobs", "1"],
        "assemble": ["assemble", "--params", params, "--split", "val", str(sets / "val"), "val"],
        "verify": ["verify", "--params", params, "--split", "val", *verify],
        "mean": ["mean", "--params", params, *mean],
        "report": ["report", "--params", params, *report],
    }
    baseline = _loaded("import datumdb", tmp_path) | {"datumdb.cli", "datumdb._progress"}
    assert "datumdb" in baseline
    missing = {}
    for step, args in argv.items():
        call = f"from datumdb.cli import main\nassert main(['--no-progress', 'pipeline', *{args!r}]) == 0"
        loaded = _loaded(call, tmp_path) - baseline
        assert STEP_MODULE[step] in loaded, step  # the step really ran in the child
        files = {_module_file(name) for name in loaded}
        missing[step] = sorted(files - set(STEP_CODE[step]))
    assert missing == {step: [] for step in argv}


def test_dvc_stages_take_their_step_code_digest_from_the_params_stage() -> None:
    """The params stage lists every step's code files (a change reruns it); each step's stage
    takes ``code.<step>`` from what it writes and lists no code file of its own."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    code = [dep for dep in stages["params"]["deps"] if dep.startswith("src/")]
    assert code == [f"src/datumdb/{name}" for name in sorted({n for files in STEP_CODE.values() for n in files})]
    for step in STEP_CODE:
        stage = stages[step]
        assert [dep for dep in stage.get("deps", []) if dep.startswith("src/")] == [], step
        (params,) = stage["params"]
        assert f"code.{step}" in params[RESOLVED_PARAMS], step


def test_the_params_step_writes_each_step_code_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the stages read as ``code.<step>`` is the digest the step's outputs record."""
    monkeypatch.chdir(tmp_path)  # (the step keeps its input-hash cache in the working directory)
    params = tmp_path / "params.yaml"
    params.write_text("dataset:\n  source: synthetic\n  count: 40\n", encoding="utf-8")
    written = tmp_path / "params.json"
    assert main(["--no-progress", "pipeline", "check", "--params", str(params), "--output", str(written)]) == 0
    recorded = json.loads(written.read_text(encoding="utf-8"))
    assert recorded["code"] == {step: code_digest(step) for step in STEP_CODE}
    assert len(set(recorded["code"].values())) == len(STEP_CODE)  # each step its own code


def _imported_files(path: Path) -> set[str]:
    """The datumdb files a module imports at its top level (relative to src/datumdb)."""
    import ast

    files = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "datumdb":
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] == "datumdb"]
        for name in names:
            parts = name.split(".")[1:]
            for candidate in (
                PACKAGE_DIR.joinpath(*parts).with_suffix(".py"),
                PACKAGE_DIR.joinpath(*parts, "__init__.py"),
            ):
                if parts and candidate.is_file():
                    files.add(candidate.relative_to(PACKAGE_DIR).as_posix())
    return files - {"_progress.py", "cli.py"}  # neither shapes an output (see STEP_CODE)


def test_step_code_is_closed_under_imports() -> None:
    """What a listed module imports shapes the step too (the reader's B-tree check, the codec's
    header bounds), even where ``import datumdb`` loads it anyway and the run-time test above
    cannot tell it apart."""
    for step, files in STEP_CODE.items():
        missing = {
            name: sorted(_imported_files(PACKAGE_DIR / name) - set(files))
            for name in files
            if name.endswith(".py") and name != "__init__.py"  # listed for the version; its imports re-export
        }
        assert {name: found for name, found in missing.items() if found} == {}, step


def test_file_sha256_trusts_its_cache_only_for_the_same_regular_file(tmp_path: Path) -> None:
    """A cached file is only stat-ed (the plan looks up every input of every version); another
    size, mtime or inode is read again; a folder or FIFO is refused, never opened to block."""
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"first")
    cache: dict[str, Any] = {}
    first = file_sha256(photo, cache)
    assert first == hashlib.sha256(b"first").hexdigest() and list(cache) == [str(photo.absolute())]
    cache[str(photo.absolute())][3] = "cached"  # same identity: the cache answers, the file is not read
    assert file_sha256(photo, cache) == "cached"
    info = photo.stat()
    os.utime(photo, ns=(info.st_atime_ns, info.st_mtime_ns + 1))  # touched: read again
    assert file_sha256(photo, cache) == first and cache[str(photo.absolute())][3] == first
    replaced = tmp_path / "b.jpg"
    replaced.write_bytes(b"other")
    os.utime(replaced, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    replaced.replace(photo)  # same size and mtime, another inode: read again
    assert file_sha256(photo, cache) == hashlib.sha256(b"other").hexdigest()
    os.mkfifo(tmp_path / "pipe")
    for bad in (tmp_path / "pipe", tmp_path, tmp_path / "gone.jpg"):
        with pytest.raises(InputError, match=str(bad.name)):
            file_sha256(bad, cache)
