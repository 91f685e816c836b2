"""Image folders through the pipeline: varied sizes, original bytes, Caffe keys, bad files, class folders.

Photos of many sizes are made from the Caffe fixture images (scaled and cropped, some PNG, some
JPEG), built with ``pipeline shards`` and ``assemble`` and checked with the pipeline's own verify, mean and
report steps, then read back record by record against the files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from conftest import read_lmdb_items

from datumdb import DatumReader
from datumdb.cli import main
from datumdb.codec import decode, decode_image
from datumdb.errors import InputError, UnsafeInputError
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import load_config
from datumdb.pipeline.fingerprint import input_digest, input_files
from datumdb.pipeline.mean import CHANNEL_MEAN_SAMPLE
from datumdb.pipeline.plan import make_plan, write_plan
from datumdb.pipeline.sheet import TEXT_WIDTH, contact_sheet
from datumdb.pipeline.sources import listed_images
from datumdb.pipeline.splits import SPLITS

pytestmark = pytest.mark.integration

FIXTURE_IMAGES = Path(__file__).parent / "fixtures" / "caffe" / "images"
KEY = re.compile(rb"(\d{8})_(.+)", re.DOTALL)


def _photos(folder: Path, count: int = 24, classes: int = 3) -> list[tuple[str, int]]:
    """``count`` images of varied sizes under ``folder/c<k>/`` (labels k), PNG and JPEG, colour and grey."""
    sources = sorted(p for p in FIXTURE_IMAGES.rglob("*") if p.suffix in (".png", ".jpg"))
    assert sources, "the Caffe fixture images are missing"
    rng = np.random.default_rng(7)
    listed = []
    for i in range(count):
        image = cv2.imread(str(sources[i % len(sources)]), cv2.IMREAD_COLOR)
        height, width = int(rng.integers(9, 40)), int(rng.integers(9, 40))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        image = np.clip(image.astype(np.int16) + i * 7 % 50, 0, 255).astype(np.uint8)  # all files differ
        if i % 5 == 4:  # some grey photos among the colour ones (Caffe reads them as 3 channels)
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        label = i % classes
        name = f"c{label}/img {i:02d}.{'png' if i % 3 else 'jpg'}"  # a space: paths are taken as listed
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(folder / name), image)
        listed.append((name, label))
    return listed


def _params(root: Path, *, encoding: str = "original", imageset: dict[str, Any] | None = None) -> Path:
    params = {
        "dataset": {"source": "imageset", "input_dir": str(root / "inputs"), "imageset": imageset or {}},
        "seed": 5,
        "partition": {"shards": [0, 1, 2]},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25},
        "encoding": encoding,
        "build": {"batch_size": 5, "map_size": 1 << 20, "shard_size": 4},
        "verify": {"sample": 100},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _inputs(root: Path, count: int = 24) -> list[tuple[str, int]]:
    images = root / "inputs" / "images"
    images.mkdir(parents=True)
    listed = _photos(images, count)
    (root / "inputs" / "list.txt").write_text("".join(f"{name} {label}\n" for name, label in listed))
    return listed


def _shards_of(lmdb: Path) -> Path:
    """Where the tests keep the shard sets the assembled databases at ``lmdb`` come from."""
    return lmdb.with_name(lmdb.name + "_shards")


def _shards_argv(params: Path, out: Path, jobs: int = 2) -> list[str]:
    return ["--no-progress", "pipeline", "shards", "--params", str(params), str(_shards_of(out)), "--jobs", str(jobs)]


def _build(params: Path, out: Path) -> Path:
    """Shard sets beside ``out``, and the assembled databases in ``out/<split>``."""
    assert main(_shards_argv(params, out)) == 0
    for split in SPLITS:
        argv = ["--no-progress", "pipeline", "assemble", "--params", str(params), "--split", split]
        assert main([*argv, str(_shards_of(out) / split), str(out / split)]) == 0
    return out


def _check_and_report(params: Path, lmdb: Path, out: Path) -> tuple[str, dict[str, Any]]:
    """Run verify on every split, mean and report through the CLI; (report text, mean JSON)."""
    lmdb = _shards_of(lmdb)  # the steps read the shard sets
    for split in SPLITS:
        argv = [
            "--no-progress", "pipeline", "verify", "--params", str(params), "--split", split, str(lmdb / split),
            "--train-db", str(lmdb / "train"), "--details", str(out / f"{split}.json"),
            "--metrics", str(out / "metrics" / f"{split}.json"), "--histogram", str(out / f"{split}.csv"),
            "--sheet", str(out / f"{split}.png"),
        ]  # fmt: skip
        assert main(argv) == 0, split
    mean = ["pipeline", "mean", "--params", str(params), str(lmdb / "train"), "--binaryproto", str(out / "m.bp")]
    assert main([*mean, "--npy", str(out / "m.npy"), "--json", str(out / "m.json")]) == 0
    details = [str(out / f"{split}.json") for split in SPLITS]
    report = ["pipeline", "report", "--params", str(params), *details, "--mean", str(out / "m.json")]
    assert main([*report, "--output", str(out / "summary.md")]) == 0
    return (out / "summary.md").read_text(), json.loads((out / "m.json").read_text())


def test_original_bytes_of_varied_sizes_keyed_by_file_each_in_one_split(tmp_path: Path) -> None:
    listed = _inputs(tmp_path)
    params = _params(tmp_path)
    lmdb = _build(params, tmp_path / "lmdb")
    images = tmp_path / "inputs" / "images"
    seen: dict[str, str] = {}
    for split in SPLITS:
        items = read_lmdb_items(lmdb / split)
        numbers = []
        for key, value in items:
            match = KEY.fullmatch(key)
            assert match, key
            numbers.append(int(match.group(1)))
            path = match.group(2).decode()
            datum = decode(value)
            assert datum.encoded and bytes(datum.data) == (images / path).read_bytes()  # the file, unchanged
            assert datum.label == dict(listed)[path]
            assert (datum.channels, datum.height, datum.width) == (0, 0, 0)  # as Caffe leaves an encoded Datum
            assert path not in seen, f"{path} in {seen.get(path)} and {split}"
            seen[path] = split
        assert numbers == list(range(len(items)))  # numbered within the split (in its seeded shuffled order)
        manifest = read_manifest(lmdb / split)
        assert manifest["metadata"]["skipped"] == []
        assert len(manifest["shapes"]) > 1  # the decoded sizes are recorded, and they vary
    assert sorted(seen) == sorted(name for name, _ in listed)  # every listed image in exactly one split

    text, mean = _check_and_report(params, lmdb, tmp_path / "reports")
    assert "No train mean image (mean.binaryproto is empty): the train images have" in text and "| NO |" not in text
    assert mean["skipped"] and (tmp_path / "reports" / "m.bp").read_bytes() == b""  # as Caffe: no mean image
    assert np.load(tmp_path / "reports" / "m.npy").size == 0
    # ... but the per-channel mean over every pixel of every train image (Caffe's mean_value), as NumPy has it
    with DatumReader(lmdb / "train") as reader:
        pixels = np.concatenate([array.reshape(3, -1) for array, _ in reader], axis=1)
    assert mean["channel_means"] == pytest.approx(pixels.astype(np.float64).mean(axis=1).tolist(), rel=1e-12)
    assert mean["channel_means_images"] == len(read_lmdb_items(lmdb / "train"))
    assert "Train mean per channel over every pixel of every image" in text
    assert ", ".join(f"{v:.4f}" for v in mean["channel_means"]) in text
    # the files' own bytes, said as what they are (not "mixed")
    for split in SPLITS:
        details = json.loads((tmp_path / "reports" / f"{split}.json").read_text())
        kinds = {"jpg": 0, "png": 0}
        for key, _ in read_lmdb_items(lmdb / split):
            kinds["png" if key.endswith(b".png") else "jpg"] += 1
        assert details["encodings"] == {k: v for k, v in kinds.items() if v}
        assert details["shape_summary"]["distinct"] == len(details["shapes"]) > 1
    assert "| mixed |" not in text and re.search(r"\| original file bytes: \d+% (JPEG|PNG), \d+% (JPEG|PNG) \|", text)
    assert "Image sizes" in text
    sheet = cv2.imread(str(tmp_path / "reports" / "train.png"))
    assert sheet is not None and sheet.shape[1] <= 8 * (TEXT_WIDTH + 8)  # letterboxed: no tile wider than the box


@pytest.mark.parametrize("planned", [False, True], ids=["planning-again", "plan-files"])
def test_verify_notices_a_record_that_is_not_its_file(tmp_path: Path, planned: bool) -> None:
    """Also with Snakemake's plan files, which resolve and read only the sampled files."""
    _inputs(tmp_path, count=12)
    params = _params(tmp_path)
    lmdb = _build(params, tmp_path / "lmdb")
    plan = ["--plan", str(tmp_path / "plan")] if planned else []
    if planned:
        write_plan(make_plan(load_config(params), {}), tmp_path / "plan")
    import lmdb as py_lmdb

    sets = _shards_of(lmdb)
    shard = next(p for p in sorted((sets / "val").iterdir()) if p.is_dir() and len(read_lmdb_items(p)) >= 2)
    items = read_lmdb_items(shard)
    (key_a, value_a), (key_b, value_b) = items[0], items[1]
    argv = [
        "--no-progress", "pipeline", "verify", "--params", str(params), "--split", "val", str(sets / "val"),
        "--train-db", str(sets / "train"), "--details", str(tmp_path / "v.json"), "--metrics", str(tmp_path / "m.json"),
        "--histogram", str(tmp_path / "h.csv"), "--sheet", str(tmp_path / "s.png"), *plan,
    ]  # fmt: skip
    assert main(argv) == 0  # before: it passes
    env = py_lmdb.open(str(shard), lock=False)
    with env.begin(write=True) as txn:  # two files' bytes swapped: every record still decodes
        txn.put(key_a, value_b)
        txn.put(key_b, value_a)
    env.close()
    assert main(argv) == 1


def test_lazily_listed_files_are_resolved_and_checked_when_read(tmp_path: Path) -> None:
    """verify with the plan files reads a sample: only those files are resolved, as strictly."""
    listed = _inputs(tmp_path, count=6)
    with (tmp_path / "inputs" / "list.txt").open("a") as handle:
        handle.write("../params.yaml 0\n")
    dataset = load_config(_params(tmp_path)).dataset
    with pytest.raises(InputError, match=r"list\.txt:7: path '\.\./params\.yaml' escapes ROOT"):
        listed_images(dataset)
    entries, paths, _, _ = listed_images(dataset, lazy=True)
    assert len(paths) == len(entries) == 7
    assert paths[2] == str(tmp_path / "inputs" / "images" / listed[2][0])
    assert paths[-2] == str(tmp_path / "inputs" / "images" / listed[5][0])
    with pytest.raises(InputError, match=r"list\.txt:7: path '\.\./params\.yaml' escapes ROOT"):
        paths[6]


def test_png_encoding_keeps_png_files_and_reencodes_the_others(tmp_path: Path) -> None:
    listed = _inputs(tmp_path, count=12)
    params = _params(tmp_path, encoding="png")
    lmdb = _build(params, tmp_path / "lmdb")
    images = tmp_path / "inputs" / "images"
    for split in SPLITS:
        for key, value in read_lmdb_items(lmdb / split):
            path = KEY.fullmatch(key).group(2).decode()  # type: ignore[union-attr]
            datum = decode(value)
            data = bytes(datum.data)
            assert data.startswith(b"\x89PNG")
            if path.endswith(".png"):  # Caffe's rule: a file of the wanted type, not resized, is stored as is
                assert data == (images / path).read_bytes()
            else:
                expected = cv2.imread(str(images / path), cv2.IMREAD_COLOR)
                assert np.array_equal(decode_image(data, "color"), expected.transpose(2, 0, 1))
    assert len(listed) == 12
    _check_and_report(params, lmdb, tmp_path / "reports")


def test_raw_pixels_need_one_shape_or_a_resize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _inputs(tmp_path, count=9)
    params = _params(tmp_path, encoding="none")
    assert main(_shards_argv(params, tmp_path / "a", jobs=1)) == 2
    assert "need one shape" in capsys.readouterr().err
    params = _params(tmp_path, encoding="none", imageset={"resize_height": 12, "resize_width": 16})
    lmdb = _build(params, tmp_path / "b")
    assert read_manifest(lmdb / "train")["shapes"] == {"3x12x16": read_manifest(lmdb / "train")["count"]}
    text, mean = _check_and_report(params, lmdb, tmp_path / "reports")
    assert mean["shape"] == [3, 12, 16] and "3x12x16" in text


def test_original_cannot_resize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _inputs(tmp_path, count=3)
    params = _params(tmp_path, imageset={"resize_height": 12, "resize_width": 16})
    assert main(["pipeline", "check", "--params", str(params)]) == 2
    assert "cannot resize" in capsys.readouterr().err


def _break_files(images: Path, listed: list[tuple[str, int]]) -> dict[str, str]:
    """Damage three files: garbage, a truncated JPEG, an empty file. Their list lines, by path."""
    jpgs = [name for name, _ in listed if name.endswith(".jpg")]
    pngs = [name for name, _ in listed if name.endswith(".png")]
    (images / pngs[0]).write_bytes(b"this is not an image")
    data = (images / jpgs[0]).read_bytes()
    (images / jpgs[0]).write_bytes(data[:20])  # cut inside the header: no decoder can make an image of it
    (images / pngs[1]).write_bytes(b"")
    lines = {name: i + 1 for i, (name, _) in enumerate(listed)}
    return {name: lines[name] for name in (pngs[0], jpgs[0], pngs[1])}


def test_on_error_skip_records_each_bad_file_and_the_rest_builds(tmp_path: Path) -> None:
    listed = _inputs(tmp_path)
    broken = _break_files(tmp_path / "inputs" / "images", listed)
    params = _params(tmp_path, imageset={"on_error": "skip"})
    lmdb = _build(params, tmp_path / "lmdb")
    skipped = [s for split in SPLITS for s in read_manifest(lmdb / split)["metadata"]["skipped"]]
    assert {s["path"]: s["line"] for s in skipped} == broken
    assert all(s["reason"] for s in skipped)
    stored = [KEY.fullmatch(k).group(2).decode() for split in SPLITS for k, _ in read_lmdb_items(lmdb / split)]  # type: ignore[union-attr]
    assert sorted(stored) == sorted(name for name, _ in listed if name not in broken)
    text, _ = _check_and_report(params, lmdb, tmp_path / "reports")
    assert "Skipped images (3" in text and all(f"| {line} |" in text for line in broken.values())


def test_on_error_stop_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listed = _inputs(tmp_path, count=9)
    broken = _break_files(tmp_path / "inputs" / "images", listed)
    params = _params(tmp_path)
    assert main(_shards_argv(params, tmp_path / "lmdb", jobs=1)) == 2
    err = capsys.readouterr().err
    assert any(f"list.txt:{line}:" in err and name in err for name, line in broken.items()), err
    assert not (_shards_of(tmp_path / "lmdb") / "train" / "shards.json").exists()


def test_class_folders_give_sorted_labels_and_the_manifest_names_the_classes(tmp_path: Path) -> None:
    listed = _inputs(tmp_path, count=12)
    (tmp_path / "inputs" / "list.txt").unlink()  # not needed: labels come from the folders
    params = _params(tmp_path, imageset={"layout": "folders"})
    lmdb = _build(params, tmp_path / "lmdb")
    for split in SPLITS:
        manifest = read_manifest(lmdb / split)
        assert manifest["metadata"]["classes"] == ["c0", "c1", "c2"]
        for key, value in read_lmdb_items(lmdb / split):
            path = KEY.fullmatch(key).group(2).decode()  # type: ignore[union-attr]
            assert decode(value).label == int(path.split("/")[0][1:]) == dict(listed)[path]
    reports = tmp_path / "reports"
    text, _ = _check_and_report(params, lmdb, reports)
    # the class names, not only the numbers: report, histogram CSV (a column), verify JSON
    for split in SPLITS:
        histogram = read_manifest(lmdb / split)["label_histogram"]
        rows = (reports / f"{split}.csv").read_text().splitlines()
        assert rows == ["label,class,count", *(f"{label},c{label},{n}" for label, n in histogram.items())]
        assert json.loads((reports / f"{split}.json").read_text())["classes"] == ["c0", "c1", "c2"]
    assert "| label | class | train | val | test |" in text
    for label in range(3):
        counts = [read_manifest(lmdb / split)["label_histogram"].get(str(label), 0) for split in SPLITS]
        assert f"| {label} | c{label} | " + " | ".join(map(str, counts)) + " |" in text


def test_class_folders_with_symlinks_are_listed_once_and_never_leave_root(tmp_path: Path, capsys) -> None:
    """Links to '.', to a class and to ROOT made the listing (the build, the input fingerprint,
    Snakemake's start-up) grow without bound or repeat images; a link out of ROOT walked it."""
    listed = _inputs(tmp_path, count=9)
    images = tmp_path / "inputs" / "images"
    (images / "c0" / "here").symlink_to(".", target_is_directory=True)
    (images / "c1" / "again").symlink_to(".", target_is_directory=True)
    (images / "c1" / "other").symlink_to("../c2", target_is_directory=True)
    (images / "c2" / "root").symlink_to("..", target_is_directory=True)
    params = _params(tmp_path, imageset={"layout": "folders"})
    config = load_config(params)
    files = [name for name, _ in input_files(config)]  # what Snakemake lists at start-up
    assert sorted(files) == sorted(f"images/{name}" for name, _ in listed)
    lmdb = _build(params, tmp_path / "lmdb")
    keys = [KEY.fullmatch(k).group(2).decode() for s in SPLITS for k, _ in read_lmdb_items(lmdb / s)]  # type: ignore[union-attr]
    assert sorted(keys) == sorted(name for name, _ in listed)
    (images / "c2" / "usr").symlink_to("/usr", target_is_directory=True)
    with pytest.raises(UnsafeInputError, match="c2/usr: a symlink to the folder /usr, outside ROOT"):
        input_digest(config)
    capsys.readouterr()
    assert main(_shards_argv(params, tmp_path / "again")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c2/usr: a symlink to the folder /usr, outside ROOT" in err, err


def test_an_image_over_the_decode_time_bound_is_skipped_and_named(tmp_path: Path) -> None:
    listed = _inputs(tmp_path, count=9)
    y, x = np.mgrid[0:8000, 0:8000]
    plane = ((x // 7 + y // 5) % 256).astype(np.uint8)  # about half a second to decode
    slow = listed[4][0]
    assert slow.endswith(".png")  # replaced by a large PNG of the same name
    assert cv2.imwrite(str(tmp_path / "inputs" / "images" / slow), cv2.merge([plane, 255 - plane, plane]))
    params = _params(tmp_path, imageset={"on_error": "skip", "decode_timeout": 0.1})
    lmdb = _build(params, tmp_path / "lmdb")
    skipped = [s for split in SPLITS for s in read_manifest(lmdb / split)["metadata"]["skipped"]]
    assert [(s["path"], s["line"]) for s in skipped] == [(slow, 5)]
    assert "decoding took longer than 0.1 s" in skipped[0]["reason"]
    text, _ = _check_and_report(params, lmdb, tmp_path / "reports")
    assert f"| {slow} | 5 |" in text


@pytest.mark.unit
def test_contact_sheet_shows_whole_keys_and_class_names() -> None:
    """Keys that differ only at their end (Caffe's keys: index, folder, file name) give different
    sheets: the whole key is drawn, wrapped; a class name is drawn beside the label."""
    image = np.full((3, 20, 30), 128, dtype=np.uint8)
    start = "00000012_n01440764/n01440764_"
    one = contact_sheet([image], [0], [start + "10026.JPEG"], "BGR")
    other = contact_sheet([image], [0], [start + "10027.JPEG"], "BGR")
    assert one != other
    named = contact_sheet([image], [0], [start + "10026.JPEG"], "BGR", classes=["tench"])
    decoded = [cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) for png in (one, named)]
    assert decoded[0].shape == decoded[1].shape and not np.array_equal(decoded[0], decoded[1])


PROGRESS_LINE = re.compile(
    r"(?P<desc>[^:]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+\.\d%\), [\d.]+ \w+/s, "
    r"elapsed \d+:\d\d:\d\d(, left \d+:\d\d:\d\d)?"
)


def _datumdb(argv: list[str], log: Path, interval: str | None) -> None:
    """Run the datumdb command line as the rules do: stdout and stderr into a log file."""
    env = {k: v for k, v in os.environ.items() if k != "DATUMDB_PROGRESS_INTERVAL"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    if interval is not None:
        env["DATUMDB_PROGRESS_INTERVAL"] = interval
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "datumdb", *argv], stdout=out, stderr=out, env=env, timeout=300)
    assert done.returncode == 0, log.read_text()


def test_long_jobs_write_progress_lines_to_their_logs_even_with_no_progress(tmp_path: Path) -> None:
    """Count, rate, time elapsed and left, in a log (not a terminal), under ``--no-progress`` as the
    rules run the steps; DATUMDB_PROGRESS_INTERVAL stands for a long job's 10 seconds."""
    listed = _inputs(tmp_path, count=30)
    params = _params(tmp_path)
    lmdb, logs = tmp_path / "lmdb", tmp_path / "logs"
    logs.mkdir()
    tick = "0.000001"  # a line at (almost) every step
    _datumdb(_shards_argv(params, lmdb), logs / "build.log", tick)
    _datumdb(["--no-progress", "pipeline", "mean", "--params", str(params), str(_shards_of(lmdb) / "train"),
              "--binaryproto", str(tmp_path / "m.bp"), "--npy", str(tmp_path / "m.npy"), "--json",
              str(tmp_path / "m.json")], logs / "mean.log", tick)  # fmt: skip
    (tmp_path / "list2.txt").write_text("".join(f"{name} {label}\n" for name, label in listed))
    _datumdb(["--no-progress", "convert-imageset", str(tmp_path / "inputs" / "images") + "/",
              str(tmp_path / "list2.txt"), str(tmp_path / "db"), "--encoded"], logs / "convert.log", tick)  # fmt: skip
    _datumdb(["--no-progress", "verify", str(tmp_path / "db")], logs / "verify.log", tick)
    seen: dict[str, list[re.Match[str]]] = {}
    for log in sorted(logs.iterdir()):
        text = log.read_text()
        assert "\r" not in text and "\x1b" not in text, text  # plain lines, no bar
        for line in text.splitlines():
            match = PROGRESS_LINE.fullmatch(line)
            if match:
                seen.setdefault(f"{log.stem}:{match['desc']}", []).append(match)
    with DatumReader(_shards_of(lmdb) / "train") as reader:
        train = len(reader)
    assert any(name.startswith("build:images ") for name in seen), seen  # a part's images, by list lines
    assert {
        "mean:channel-means",
        "convert:convert-imageset",
        "verify:verify",
    } <= set(seen), seen
    for name, matches in seen.items():
        if name == "build:verify":  # every shard's own check, a few records each (two processes interleave)
            continue
        counts = [int(m["done"]) for m in matches]
        assert counts == sorted(counts) and counts[-1] <= int(matches[0]["total"]), name
    assert int(seen["mean:channel-means"][0]["total"]) == min(train, CHANNEL_MEAN_SAMPLE)
    assert int(seen["convert:convert-imageset"][0]["total"]) == len(listed)
    # the default interval (10 s): a short job's log gets no progress line, only its result
    _datumdb(["--no-progress", "verify", str(tmp_path / "db")], logs / "quiet.log", None)
    assert not any(PROGRESS_LINE.fullmatch(line) for line in (logs / "quiet.log").read_text().splitlines())


@pytest.mark.parametrize("layout", ["list", "folders"])
def test_the_plan_carries_the_input_digest_without_reading_the_files_again(tmp_path: Path, layout: str) -> None:
    """What a Snakemake run records for DVC (``reports/params.json``'s inputs) comes from the
    plan's hashes; it must be the digest the DVC stage computes from the files themselves."""
    from datumdb.pipeline.plan import make_plan

    listed = _inputs(tmp_path, count=12)
    config = load_config(_params(tmp_path, imageset={"layout": layout}))
    plan = make_plan(config, {})
    assert plan.inputs == input_digest(config)
    image = tmp_path / "inputs" / "images" / listed[5][0]
    image.write_bytes(image.read_bytes() + b"\0")  # one image's bytes change: so does the digest
    assert make_plan(config, {}).inputs == input_digest(config) != plan.inputs
