"""datumdb.imageset: convert_imageset parity with the real Caffe tool, list parsing, strictness."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FIXTURE_FLAGS, FIXTURE_LMDBS, leftovers, live_processes_in_group, read_lmdb_items, wait_until
from hostile_inputs import forged_jpeg, forged_png
from hypothesis import given
from hypothesis import strategies as st

from datumdb import DatumReader, imageset
from datumdb.cli import main
from datumdb.codec import decode
from datumdb.errors import DecodeWorkerError, InputError, UnsafeInputError
from datumdb.imageset import ImagesetOptions, ListEntry, convert_imageset, ordered_entries, read_list_file
from datumdb.manifest import digest_items, read_manifest
from datumdb.verify import verify_database

pytestmark = pytest.mark.unit


def _convert(caffe_dir: Path, db: Path, *flags: str, list_file: Path | None = None) -> int:
    root = str(caffe_dir / "images") + "/"
    return main(["--no-progress", "convert-imageset", root, str(list_file or caffe_dir / "list.txt"), str(db), *flags])


# --------------------------------------------------------------------------- parity with Caffe


@pytest.mark.parametrize("name", FIXTURE_LMDBS)
def test_convert_imageset_reproduces_caffe_fixture(caffe_dir: Path, tmp_path: Path, name: str, capsys) -> None:
    db = tmp_path / name
    assert _convert(caffe_dir, db, *FIXTURE_FLAGS[name]) == 0
    produced, reference = read_lmdb_items(db), read_lmdb_items(caffe_dir / name)
    assert len(produced) == len(reference) == 12
    for (key, value), (ref_key, ref_value) in zip(produced, reference, strict=True):
        assert key == ref_key
        assert value == ref_value, key
    manifest = read_manifest(db)
    assert manifest["digest"] == digest_items(reference)
    assert manifest["count"] == 12
    assert manifest["label_histogram"] == {"0": 3, "1": 2, "2": 2, "3": 5}
    assert manifest["channel_order"] == ("gray" if name == "lmdb_gray" else "BGR")
    assert sorted(p.name for p in db.iterdir()) == ["data.mdb", "datumdb.json"]
    assert manifest["digest"] in capsys.readouterr().out


def test_encoded_without_type_keeps_the_original_png_bytes(caffe_dir: Path, tmp_path: Path) -> None:
    assert _convert(caffe_dir, tmp_path / "db", "--encoded", "--workers", "1") == 0
    assert read_lmdb_items(tmp_path / "db") == read_lmdb_items(caffe_dir / "lmdb_png")
    manifest = read_manifest(tmp_path / "db")
    assert manifest["encoding"] == "png"
    assert manifest["shapes"]["3x16x20"] == 1  # the decoded shape is recorded even though the Datum omits it


@pytest.mark.parametrize("name", [*FIXTURE_LMDBS, "unresized shuffled"])
def test_every_worker_count_writes_caffe_bytes_over_many_chunks(caffe_dir: Path, tmp_path: Path, name: str) -> None:
    """The fixture list 10 times over (120 images): several chunks per worker, sizes known
    (resized raw), learnt (encoded) or varying (unresized); every record must be Caffe's and
    data.mdb the same file for 1, 2 and 3 worker processes."""
    lines = (caffe_dir / "list.txt").read_text().splitlines()
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"{line}\n" for line in lines * 10))
    flags = FIXTURE_FLAGS.get(name, ["--shuffle", "--seed", "7"])
    for workers in (1, 2, 3):
        db = tmp_path / f"w{workers}"
        assert _convert(caffe_dir, db, *flags, "--workers", str(workers), list_file=list_file) == 0
    data = {(tmp_path / f"w{w}" / "data.mdb").read_bytes() for w in (1, 2, 3)}
    assert len(data) == 1
    # Workers make records in shared memory and tell the writer what they hold (not parsed again):
    # the manifest's counts must still be those of the one-process build, which parses each.
    assert read_manifest(tmp_path / "w1") == read_manifest(tmp_path / "w2") == read_manifest(tmp_path / "w3")
    items = read_lmdb_items(tmp_path / "w2")
    assert len(items) == 120
    if name in FIXTURE_LMDBS:
        reference = read_lmdb_items(caffe_dir / name)
        for index, (key, value) in enumerate(items):
            ref_key, ref_value = reference[index % 12]
            assert key == b"%08d" % index + ref_key[8:]
            assert value == ref_value, key
    else:
        assert [k[9:].decode() for k, _ in items] != [line.rpartition(" ")[0] for line in lines * 10]


@pytest.mark.parametrize("ring_bytes", [0, 5000, 300_000])
@pytest.mark.parametrize("name", ["lmdb_raw", "lmdb_png", "unresized"])
def test_records_that_miss_the_shared_ring_come_pickled_and_the_bytes_are_the_same(
    caffe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, ring_bytes: int
) -> None:
    """Workers make records in a shared ring; a chunk the full ring has no room for, and a
    record larger than the room its chunk got, come back through the pipe instead. No ring,
    a ring smaller than one record, and one that holds a few chunks at a time: data.mdb and the
    manifest are those of the one-process build."""
    list_file = _repeated_list(caffe_dir, tmp_path, 60)
    flags = FIXTURE_FLAGS.get(name, [])
    assert _convert(caffe_dir, tmp_path / "one", *flags, "--workers", "1", list_file=list_file) == 0
    monkeypatch.setattr(imageset, "shared_ring_bytes", lambda batch_size, record_bytes: ring_bytes)
    assert _convert(caffe_dir, tmp_path / "two", *flags, "--workers", "2", list_file=list_file) == 0
    assert (tmp_path / "two" / "data.mdb").read_bytes() == (tmp_path / "one" / "data.mdb").read_bytes()
    assert read_manifest(tmp_path / "two") == read_manifest(tmp_path / "one")


def _repeated_list(caffe_dir: Path, tmp_path: Path, count: int, replace: dict[int, str] | None = None) -> Path:
    """A list of ``count`` lines cycling through the fixture images, line N replaced by ``replace[N]``."""
    lines = (caffe_dir / "list.txt").read_text().splitlines()
    chosen = [(replace or {}).get(n, lines[(n - 1) % 12]) for n in range(1, count + 1)]
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"{line}\n" for line in chosen))
    return list_file


def test_bad_image_in_a_worker_names_file_and_line(caffe_dir: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "images"
    shutil.copytree(caffe_dir / "images", root)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    list_file = _repeated_list(caffe_dir, tmp_path, 100, {70: "broken.png 1", 90: "missing.png 1"})
    options = ImagesetOptions(resize_height=8, resize_width=8)
    with pytest.raises(InputError, match=r"list\.txt:70: .*broken\.png.*not an image OpenCV can decode"):
        convert_imageset(root, list_file, tmp_path / "db", options, workers=2, progress=False)
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []
    argv = ["--no-progress", "convert-imageset", f"{root}/", str(list_file), str(tmp_path / "db"), "--workers", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"datumdb convert-imageset: error: \S*list\.txt:70: .*broken\.png.*\n", err), err
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


def test_first_error_in_list_order_wins_across_workers(caffe_dir: Path, tmp_path: Path) -> None:
    """A key error this process finds at line 3 comes before a decoding error a worker found at
    line 5 of the same chunk, as it would in one process."""
    root = tmp_path / "images"
    shutil.copytree(caffe_dir / "images", root)
    long_name = f"{'/'.join(['d' * 60] * 8)}/{'b' * 20}.png"  # "00000002_" + 512 bytes: over LMDB's 511
    (root / long_name).parent.mkdir(parents=True)
    shutil.copy(root / "img_02.png", root / long_name)
    list_file = _repeated_list(caffe_dir, tmp_path, 40, {3: f"{long_name} 2", 5: "missing.png 0"})
    options = ImagesetOptions(resize_height=8, resize_width=8)
    for workers in (1, 2):
        with pytest.raises(InputError, match=r"list\.txt:3: key for .* LMDB allows 511"):
            convert_imageset(root, list_file, tmp_path / "db", options, workers=workers, progress=False)
        assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


def test_a_worker_that_dies_is_an_error_naming_the_image(
    caffe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A worker killed mid-image (the OOM killer, a crash in a decoder) fails the build cleanly,
    and the image it died on is named: every worker marks its current image in shared memory."""
    real = imageset._prepare

    def crash_on_img_05(image_path: str, *args: object) -> object:
        if os.path.basename(image_path) == "img_05.png":
            os._exit(9)  # what SIGKILL or a segfault looks like to the pool
        return real(image_path, *args)

    monkeypatch.setattr(imageset, "_prepare", crash_on_img_05)  # inherited by the forked workers
    lines = (caffe_dir / "list.txt").read_text().splitlines()
    others = [line for line in lines if not line.startswith("img_05.png")]
    chosen = [*others[:5], next(line for line in lines if line.startswith("img_05.png")), *(others * 3)[5:29]]
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"{line}\n" for line in chosen))
    with pytest.raises(DecodeWorkerError, match=r"list\.txt:6: img_05\.png: the decoder crashed"):
        convert_imageset(caffe_dir / "images", list_file, tmp_path / "db", workers=2, progress=False)
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []
    assert (
        main(["--no-progress", "convert-imageset", str(caffe_dir / "images"), str(list_file), str(tmp_path / "db")])
        == 2
    )
    err = capsys.readouterr().err
    assert "img_05.png: the decoder crashed" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the workers' parent-death signal is Linux's"
)
@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM", "SIGKILL"])
def test_an_interrupted_build_leaves_no_worker_behind(tmp_path: Path, how: str) -> None:
    """Ctrl-C (SIGINT to the whole process group) and SIGTERM stop the build (exit 130, nothing
    published, no build folder); even SIGKILL of the parent takes its workers with it."""
    root = tmp_path / "images"
    root.mkdir()
    gradient = np.linspace(0, 255, 1500, dtype=np.float32)
    noise = np.random.default_rng(0).integers(0, 40, (1500, 1500, 3), dtype=np.uint8)
    photo = (gradient[:, None, None] + gradient[None, :, None] / 2 + noise).astype(np.uint8)
    assert cv2.imwrite(str(root / "big.jpg"), photo)
    list_file = tmp_path / "list.txt"
    list_file.write_text("big.jpg 0\n" * 5000)  # a minute of decoding: it is stopped long before
    db = tmp_path / "db"
    argv = ["convert-imageset", "--resize-height", "64", "--resize-width", "64", "--workers", "2"]
    command = [sys.executable, "-m", "datumdb.cli", "--no-progress", *argv, str(root), str(list_file), str(db)]
    # start_new_session: its own process group, as a shell gives a job; stderr to a file, which
    # orphaned workers could not hold open the way they would a pipe
    with (
        (tmp_path / "stderr").open("w+") as err,
        subprocess.Popen(command, stderr=err, start_new_session=True) as child,
    ):
        try:
            # The build folder appears once the workers run; then the parent and 2 workers are live.
            assert wait_until(lambda: leftovers(db) != [] and len(live_processes_in_group(child.pid)) == 3)
            time.sleep(0.3)  # mid-build: chunks in flight, records being written
            if how == "SIGINT to the group":
                os.killpg(child.pid, signal.SIGINT)
            else:
                os.kill(child.pid, getattr(signal, how))
            code = child.wait(timeout=60)
            orphans_gone = wait_until(lambda: live_processes_in_group(child.pid) == [], timeout=10)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever failed, leave nothing running
                os.killpg(child.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert orphans_gone, "orphaned workers"
    assert not db.exists()
    if how == "SIGKILL":
        assert code == -signal.SIGKILL  # nothing can clean up after kill -9; the next build removes the folder
        return
    assert code == 130, stderr
    assert stderr.strip() == "datumdb convert-imageset: interrupted (a database is only ever published whole)"
    assert leftovers(db) == []


# --------------------------------------------------------------------------- list files


def _image_folder(tmp_path: Path, names: list[str], sizes: list[tuple[int, int]] | None = None) -> Path:
    root = tmp_path / "images"
    rng = np.random.default_rng(5)
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        h, w = sizes[i] if sizes else (6, 7)
        assert cv2.imwrite(str(root / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return root


def test_list_line_is_split_at_the_last_space(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, ["my cat picture.png", "plain.png"])
    list_file = tmp_path / "list.txt"
    list_file.write_text("my cat picture.png 5\nplain.png -2\n")
    assert read_list_file(list_file) == [ListEntry("my cat picture.png", 5, 1), ListEntry("plain.png", -2, 2)]
    convert_imageset(root, list_file, tmp_path / "db", progress=False)
    items = read_lmdb_items(tmp_path / "db")
    assert [k for k, _ in items] == [b"00000000_my cat picture.png", b"00000001_plain.png"]
    assert [decode(v).label for _, v in items] == [5, -2]
    with DatumReader(tmp_path / "db") as reader:
        expected = cv2.imread(str(root / "my cat picture.png")).transpose(2, 0, 1)
        np.testing.assert_array_equal(reader[0][0], expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png 0\nb.png cat\n", r"list\.txt:2: label 'cat' is not an integer"),
        ("a.png 0\nb.png 1.5\n", r"list\.txt:2: label '1.5'"),
        ("a.png 2147483648\n", r"list\.txt:1: label 2147483648 is outside int32"),
        ("a.png 0\n\nb.png 1\n", r"list\.txt:2: empty line"),
        ("a.png 0\nnospace\n", r"list\.txt:2: expected '<path> <label>'"),
        (" 3\n", r"list\.txt:1: expected"),
        ("", r"list\.txt: no images listed"),
    ],
)
def test_bad_list_lines_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    list_file = tmp_path / "list.txt"
    list_file.write_text(text)
    with pytest.raises(InputError, match=message):
        read_list_file(list_file)
    _image_folder(tmp_path, ["a.png", "b.png"])
    with pytest.raises(InputError, match=message):
        convert_imageset(tmp_path / "images", list_file, tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


@pytest.mark.parametrize("label", ["1_000", "\u0663", "\uff13"])
def test_labels_only_python_would_parse_are_errors(tmp_path: Path, label: str) -> None:
    """Python's int() accepts digit separators and non-ASCII digits; Caffe's atoi reads "1_000"
    as 1 and the others as 0. A label the two tools read differently must be an error."""
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"a.png {label}\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"list\.txt:1: "):
        read_list_file(list_file)


def test_missing_list_file_and_root(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="list file not found"):
        read_list_file(tmp_path / "absent.txt")
    (tmp_path / "list.txt").write_text("a.png 0\n")
    with pytest.raises(InputError, match="ROOT folder not found"):
        convert_imageset(tmp_path / "nowhere", tmp_path / "list.txt", tmp_path / "db", progress=False)


@pytest.mark.parametrize("content", [None, b"", b"this is not a png"])
def test_missing_or_unreadable_image_names_file_and_line(tmp_path: Path, content: bytes | None) -> None:
    root = _image_folder(tmp_path, ["a.png", "c.png"])
    if content is not None:
        (root / "b.png").write_bytes(content)
    list_file = tmp_path / "list.txt"
    list_file.write_text("a.png 0\nb.png 1\nc.png 2\n")
    with pytest.raises(InputError, match=r"list\.txt:2: .*b\.png") as info:
        convert_imageset(root, list_file, tmp_path / "db", progress=False)
    assert ("cannot read image" if content is None else "not an image") in str(info.value)
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


def test_paths_outside_root_need_allow_outside_root(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, ["inside.png"])
    outside = _image_folder(tmp_path / "other", ["out.png"]) / "out.png"
    (root / "sub").mkdir()
    for i, line in enumerate(("../other/images/out.png 1", f"{outside} 1", "sub/../../other/images/out.png 1")):
        list_file, db = tmp_path / f"list{i}.txt", tmp_path / f"db{i}"
        list_file.write_text(f"inside.png 0\n{line}\n")
        with pytest.raises(InputError, match=rf"list{i}\.txt:2: .*(absolute|escapes ROOT).*allow-outside-root"):
            convert_imageset(root, list_file, db, progress=False)
        assert not db.exists() and leftovers(db) == []
        convert_imageset(root, list_file, db, ImagesetOptions(allow_outside_root=True), progress=False)
        items = read_lmdb_items(db)
        assert items[1][0] == b"00000001_" + line.rpartition(" ")[0].encode()
        with DatumReader(db) as reader:
            np.testing.assert_array_equal(reader[1][0], cv2.imread(str(outside)).transpose(2, 0, 1))


# --------------------------------------------------------------------------- options


def test_seeded_shuffle_is_reproducible(caffe_dir: Path, tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert _convert(caffe_dir, tmp_path / name, "--shuffle", "--seed", str(seed), "--gray") == 0
    a, b, c = (read_lmdb_items(tmp_path / n) for n in "abc")
    assert (tmp_path / "a" / "data.mdb").read_bytes() == (tmp_path / "b" / "data.mdb").read_bytes()
    assert a == b
    listed = [line.rpartition(" ") for line in (caffe_dir / "list.txt").read_text().splitlines()]
    listed_pairs = sorted((path, int(label)) for path, _, label in listed)
    orders = []
    for items in (a, c):
        keys = [k.decode() for k, _ in items]
        assert [k[:9] for k in keys] == [f"{i:08d}_" for i in range(12)]
        paths = [k[9:] for k in keys]
        assert sorted((p, decode(v).label) for p, (_, v) in zip(paths, items, strict=True)) == listed_pairs
        orders.append(paths)
    assert orders[0] != orders[1], "another seed must give another order"
    assert orders[0] != [p for p, _, _ in listed], "--shuffle must shuffle"
    entries = read_list_file(caffe_dir / "list.txt")
    shuffled = ordered_entries(entries, ImagesetOptions(shuffle=True, seed=3))
    assert [e.path for e in shuffled] == orders[0]
    # the shuffled gray records hold the same pixels as the unshuffled ones
    _convert(caffe_dir, tmp_path / "plain", "--gray")
    by_path = {k[9:]: v for k, v in read_lmdb_items(tmp_path / "plain")}
    assert all(by_path[k[9:]] == v for k, v in a)


def test_check_size(caffe_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"list\.txt:2: class1/img_01\.png has 4320 values.*960.*--check-size"):
        convert_imageset(
            caffe_dir / "images",
            caffe_dir / "list.txt",
            tmp_path / "db",
            ImagesetOptions(check_size=True),
            progress=False,
        )
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []
    assert _convert(caffe_dir, tmp_path / "ok", "--check-size", "--resize-height", "8", "--resize-width", "9") == 0
    assert read_manifest(tmp_path / "ok")["shapes"] == {"3x8x9": 12}
    assert _convert(caffe_dir, tmp_path / "mixed") == 0  # different sizes are fine without --check-size
    assert len(read_manifest(tmp_path / "mixed")["shapes"]) > 1


@pytest.mark.parametrize("flags", [["--resize-height", "32"], ["--resize-width", "32"], []])
def test_resize_only_when_both_sizes_are_given(caffe_dir: Path, tmp_path: Path, flags: list[str], expected) -> None:
    assert _convert(caffe_dir, tmp_path / "db", *flags) == 0
    with DatumReader(tmp_path / "db") as reader:
        shapes = [array.shape for array, _ in reader]
    wanted = [(3, e["source_size_wh"][1], e["source_size_wh"][0]) for e in expected["lmdb_raw"]["entries"]]
    assert shapes == wanted
    with DatumReader(tmp_path / "db") as reader:
        for entry, (array, label) in zip(expected["lmdb_raw"]["entries"], reader, strict=True):
            original = cv2.imread(str(caffe_dir / entry["source_image"]), cv2.IMREAD_COLOR)
            np.testing.assert_array_equal(array, original.transpose(2, 0, 1))  # untouched pixels
            assert label == entry["label"]


def test_metadata_records_the_options(caffe_dir: Path, tmp_path: Path) -> None:
    _convert(caffe_dir, tmp_path / "db", "--gray", "--shuffle", "--seed", "9")
    metadata = read_manifest(tmp_path / "db")["metadata"]
    assert metadata["source"] == "imageset" and metadata["list_file"] == "list.txt"
    assert metadata["options"]["seed"] == 9 and metadata["options"]["gray"] is True


@given(
    paths=st.lists(
        st.text(st.sampled_from("abcXYZ019 _-./éü"), min_size=1, max_size=12).filter(lambda p: p.strip() == p),
        min_size=1,
        max_size=5,
    ),
    labels=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=5, max_size=5),
    crlf=st.booleans(),
)
def test_list_parsing_property(paths: list[str], labels: list[int], crlf: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        list_file = Path(folder) / "list.txt"
        newline = "\r\n" if crlf else "\n"
        list_file.write_text(
            "".join(f"{p} {label}{newline}" for p, label in zip(paths, labels, strict=False)), encoding="utf-8"
        )
        entries = read_list_file(list_file)
    assert [(e.path, e.label, e.line) for e in entries] == [
        (p, label, i + 1) for i, (p, label) in enumerate(zip(paths, labels, strict=False))
    ]


def _encoded_case(tmp_path: Path, case: str) -> tuple[Path, Path, ImagesetOptions]:
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    if case == "gray":
        image, options = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), ImagesetOptions(gray=True, encoded=True)
    elif case == "rgba":
        image, options = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8), ImagesetOptions(encoded=True)
    else:
        image, options = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16), ImagesetOptions(encoded=True)
    assert cv2.imwrite(str(root / "a.png"), image)
    (tmp_path / "list.txt").write_text("a.png 1\n")
    return root, tmp_path / "list.txt", options


@pytest.mark.parametrize("case", ["gray", "rgba", "png16"])
def test_every_encoded_build_passes_verify(tmp_path: Path, case: str) -> None:
    """What convert-imageset --encoded publishes must pass datumdb's own verify (or be refused).

    Without resizing, the original file bytes are stored (as Caffe does), so the manifest must
    describe what those bytes decode to, not the image as loaded for --gray / IMREAD_COLOR.
    """
    root, list_file, options = _encoded_case(tmp_path, case)
    try:
        convert_imageset(root, list_file, tmp_path / "db", options, progress=False)
    except InputError:
        assert not (tmp_path / "db").exists()
        return
    report = verify_database(tmp_path / "db")
    assert report["ok"], report["problems"]


def test_key_longer_than_lmdb_allows_names_the_line(tmp_path: Path) -> None:
    folders = "/".join(["d" * 60] * 8)
    deep, deeper = f"{folders}/a.png", f"{folders}/{'b' * 20}.png"
    assert len(f"00000000_{deep}") <= 511 < len(f"00000001_{deeper}")
    _image_folder(tmp_path, [deep, deeper])
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"{deep} 0\n{deeper} 1\n")
    too_long = len(f"00000001_{deeper}")
    with pytest.raises(InputError, match=rf"list\.txt:2: key for .* is {too_long} bytes; LMDB allows 511"):
        convert_imageset(tmp_path / "images", list_file, tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists()
    list_file.write_text(f"{deep} 0\n")
    convert_imageset(tmp_path / "images", list_file, tmp_path / "db", progress=False)
    assert read_lmdb_items(tmp_path / "db")[0][0] == f"00000000_{deep}".encode()


# --------------------------------------------------------------------------- inputs are files


def _cli_in_child(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a child process: a hang (a FIFO read, say) fails the test instead of stalling it."""
    return subprocess.run(
        [sys.executable, "-m", "datumdb.cli", "--no-progress", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_symlink_inside_root_leading_outside_is_refused(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, ["a.png"])
    secret = _image_folder(tmp_path / "elsewhere", ["secret.png"]) / "secret.png"
    (root / "escape.png").symlink_to(secret)
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(secret.parent)  # a linked folder leads out just as well
    (root / "alias.png").symlink_to(root / "a.png")  # a link that stays inside ROOT is fine
    for i, line in enumerate(("escape.png 1", "sub/up/secret.png 1")):
        list_file, db = tmp_path / f"list{i}.txt", tmp_path / f"db{i}"
        list_file.write_text(f"alias.png 0\n{line}\n")
        with pytest.raises(UnsafeInputError, match=rf"list{i}\.txt:2: .*symlink.*outside ROOT.*allow-outside-root"):
            convert_imageset(root, list_file, db, progress=False)
        assert not db.exists() and leftovers(db) == []
        convert_imageset(root, list_file, db, ImagesetOptions(allow_outside_root=True), progress=False)
        with DatumReader(db) as reader:
            np.testing.assert_array_equal(reader[0][0], cv2.imread(str(root / "a.png")).transpose(2, 0, 1))
            np.testing.assert_array_equal(reader[1][0], cv2.imread(str(secret)).transpose(2, 0, 1))
        assert read_lmdb_items(db)[1][0] == b"00000001_" + line.rpartition(" ")[0].encode()


def test_a_folder_checked_once_still_has_each_file_and_linked_folder_below_it_checked(tmp_path: Path) -> None:
    """A list's folders are checked once (a million photos in a thousand folders); a link to
    outside ROOT among the files of a checked folder, or a linked folder below it, is still refused."""
    root = _image_folder(tmp_path, ["a.png"])
    secret = _image_folder(tmp_path / "elsewhere", ["secret.png"]) / "secret.png"
    (root / "sub").mkdir()
    shutil.copy(root / "a.png", root / "sub" / "b.png")
    (root / "sub" / "c.png").symlink_to(secret)
    (root / "sub" / "up").symlink_to(secret.parent)
    for i, line in enumerate(("sub/c.png 1", "sub/up/secret.png 1")):
        list_file, db = tmp_path / f"list{i}.txt", tmp_path / f"db{i}"
        list_file.write_text(f"sub/b.png 0\na.png 0\n{line}\n")
        with pytest.raises(UnsafeInputError, match=rf"list{i}\.txt:3: .*symlink.*outside ROOT"):
            convert_imageset(root, list_file, db, progress=False)
        assert not db.exists()


def _special_file(root: Path, kind: str) -> str:
    """Make a non-regular file named in a list; returns the list line's path."""
    if kind == "fifo":
        os.mkfifo(root / "pipe.png")
        return "pipe.png"
    if kind == "folder":
        (root / "folder.png").mkdir()
        return "folder.png"
    if kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(root / "sock.png"))
        sock.close()
        return "sock.png"
    (root / "zero.png").symlink_to("/dev/zero")  # with --allow-outside-root: a device, read forever
    return "zero.png"


@pytest.mark.parametrize(
    ("kind", "what"),
    [("fifo", "FIFO"), ("folder", "folder"), ("socket", "socket"), ("devzero", "character device")],
)
def test_non_regular_image_is_refused_without_hanging(tmp_path: Path, kind: str, what: str) -> None:
    short = Path(tempfile.mkdtemp(dir="/tmp"))  # AF_UNIX paths must be short
    try:
        root = _image_folder(short, ["a.png"])
        name = _special_file(root, kind)
        (short / "list.txt").write_text(f"a.png 0\n{name} 1\n")
        result = _cli_in_child(
            "convert-imageset", "--allow-outside-root", str(root), str(short / "list.txt"), str(short / "db")
        )
        assert result.returncode == 2, result.stderr
        assert re.search(rf"list\.txt:2: .*{re.escape(name)}.*: image is a {what}", result.stderr), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (short / "db").exists()
    finally:
        shutil.rmtree(short)


def test_list_file_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, ["a.png"])
    os.mkfifo(tmp_path / "list.txt")
    result = _cli_in_child("convert-imageset", str(root), str(tmp_path / "list.txt"), str(tmp_path / "db"))
    assert result.returncode == 2
    assert "list.txt: list file is a FIFO (named pipe), not a regular file" in result.stderr


def test_inputs_over_the_size_bound_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _image_folder(tmp_path, ["a.png"], sizes=[(40, 40)])
    (tmp_path / "list.txt").write_text("a.png 0\n")
    size = (root / "a.png").stat().st_size
    monkeypatch.setenv("DATUMDB_MAX_INPUT_BYTES", str(size - 1))
    with pytest.raises(UnsafeInputError, match=rf"list\.txt:1: .*a\.png: image is {size} bytes, over the bound of"):
        convert_imageset(root, tmp_path / "list.txt", tmp_path / "db", progress=False)
    monkeypatch.setenv("DATUMDB_MAX_INPUT_BYTES", "5")
    with pytest.raises(UnsafeInputError, match=r"list\.txt: list file is 8 bytes, over the bound of 5"):
        read_list_file(tmp_path / "list.txt")
    monkeypatch.setenv("DATUMDB_MAX_INPUT_BYTES", "lots")
    with pytest.raises(InputError, match=r"DATUMDB_MAX_INPUT_BYTES must be a positive number"):
        read_list_file(tmp_path / "list.txt")
    monkeypatch.setenv("DATUMDB_MAX_INPUT_BYTES", str(size))
    convert_imageset(root, tmp_path / "list.txt", tmp_path / "db", progress=False)


@pytest.mark.parametrize("forge", [forged_jpeg, forged_png], ids=["jpeg", "png"])
def test_forged_huge_image_header_is_an_input_error_naming_the_file(tmp_path: Path, forge, capsys) -> None:
    root = _image_folder(tmp_path, ["a.png"])
    (root / "huge.img").write_bytes(forge(60000, 60000))
    (tmp_path / "list.txt").write_text("a.png 0\nhuge.img 1\n")
    with pytest.raises(InputError, match=r"list\.txt:2: .*huge\.img: not an image .*OPENCV_IO_MAX_IMAGE_PIXELS"):
        convert_imageset(root, tmp_path / "list.txt", tmp_path / "db", progress=False)
    assert main(["--no-progress", "convert-imageset", str(root), str(tmp_path / "list.txt"), str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert "huge.img" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_real_6000x8000_photo_is_resized(tmp_path: Path) -> None:
    """48 megapixels: over OpenCV's old 2**25-pixel bound here, well under the 134-megapixel one."""
    rows = np.linspace(0, 255, 6000, dtype=np.float32)[:, np.newaxis]
    cols = np.linspace(0, 255, 8000, dtype=np.float32)[np.newaxis, :]
    noise = np.random.default_rng(1).integers(0, 32, (6000, 8000), dtype=np.uint8)
    photo = np.stack([rows + 0 * cols, cols + 0 * rows, (rows + cols) / 2], axis=-1).astype(np.uint8)
    photo += noise[..., np.newaxis]
    root = tmp_path / "images"
    root.mkdir()
    assert cv2.imwrite(str(root / "big.jpg"), photo)
    del photo, noise
    (tmp_path / "list.txt").write_text("big.jpg 3\n")
    options = ImagesetOptions(resize_height=60, resize_width=80)
    convert_imageset(root, tmp_path / "list.txt", tmp_path / "db", options, progress=False)
    expected = cv2.resize(cv2.imread(str(root / "big.jpg")), (80, 60))
    with DatumReader(tmp_path / "db") as reader:
        image, label = reader[0]
    assert label == 3
    np.testing.assert_array_equal(image, expected.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- bad files, Caffe's way or ours


@pytest.fixture(scope="module")
def slow_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 8000x8000 PNG: about half a second to decode, 100 times a fixture image's time."""
    y, x = np.mgrid[0:8000, 0:8000]
    plane = ((x // 7 + y // 5) % 256).astype(np.uint8)
    path = tmp_path_factory.mktemp("slow") / "slow.png"
    assert cv2.imwrite(str(path), cv2.merge([plane, 255 - plane, plane // 2]))
    return path


def _images_with(caffe_dir: Path, tmp_path: Path, extra: dict[str, bytes | Path]) -> tuple[Path, Path, list[str]]:
    """A copy of the fixture images plus ``extra`` files, and a list of all (extras at lines 3, 7, ...)."""
    root = tmp_path / "images"
    shutil.copytree(caffe_dir / "images", root)
    for name, content in extra.items():
        if isinstance(content, Path):
            shutil.copy(content, root / name)
        else:
            (root / name).write_bytes(content)
    lines = (caffe_dir / "list.txt").read_text().splitlines()
    for position, name in enumerate(extra):
        lines.insert(2 + 4 * position, f"{name} {position}")
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"{line}\n" for line in lines))
    return root, list_file, lines


def test_skip_leaves_out_bad_images_lists_them_and_keeps_caffes_keys(caffe_dir: Path, tmp_path: Path) -> None:
    broken = {"broken.png": b"\x89PNG\r\n\x1a\n not really", "empty.jpg": b"", "text.jpg": b"hello"}
    root, list_file, lines = _images_with(caffe_dir, tmp_path, broken)
    for workers in (1, 2):
        db = tmp_path / f"db{workers}"
        convert_imageset(root, list_file, db, workers=workers, progress=False, on_error="skip")
        skipped = read_manifest(db)["metadata"]["skipped"]
        assert [(s["path"], s["line"]) for s in skipped] == [("broken.png", 3), ("empty.jpg", 7), ("text.jpg", 11)]
        assert all(s["reason"] and "list.txt" not in s["reason"] for s in skipped)
        items = read_lmdb_items(db)
        expected_keys = [b"%08d_" % i + line.rpartition(" ")[0].encode() for i, line in enumerate(lines)]
        assert [k for k, _ in items] == [k for k in expected_keys if k.split(b"_", 1)[1].decode() not in broken]
    assert (tmp_path / "db1" / "data.mdb").read_bytes() == (tmp_path / "db2" / "data.mdb").read_bytes()
    with pytest.raises(InputError, match=r"list\.txt:3: .*broken\.png: not an image"):
        convert_imageset(root, list_file, tmp_path / "stop", workers=2, progress=False)
    assert not (tmp_path / "stop").exists()


def test_a_decode_over_the_time_bound_stops_or_is_skipped(caffe_dir: Path, tmp_path: Path, slow_png: Path) -> None:
    root, list_file, lines = _images_with(caffe_dir, tmp_path, {"slow.png": slow_png})
    for workers in (1, 2):
        with pytest.raises(InputError, match=r"list\.txt:3: slow\.png: decoding took longer than 0\.1 s"):
            convert_imageset(root, list_file, tmp_path / "db", workers=workers, progress=False, decode_timeout=0.1)
        assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []
    db = tmp_path / "skipped"
    convert_imageset(root, list_file, db, workers=2, progress=False, on_error="skip", decode_timeout=0.1)
    skipped = read_manifest(db)["metadata"]["skipped"]
    assert [(s["path"], s["line"]) for s in skipped] == [("slow.png", 3)] and "longer than 0.1 s" in skipped[0][
        "reason"
    ]
    keys = [k for k, _ in read_lmdb_items(db)]
    assert len(keys) == len(lines) - 1 and b"00000002_slow.png" not in keys and keys[2].startswith(b"00000003_")
    # the same images without a bound: every one, the slow one too
    convert_imageset(root, list_file, tmp_path / "unbounded", workers=2, progress=False, on_error="skip")
    assert len(read_lmdb_items(tmp_path / "unbounded")) == len(lines)


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_time_bound_that_would_not_bound_is_refused(caffe_dir: Path, tmp_path: Path, timeout: float) -> None:
    """Issue 17: ``decode_timeout: .inf`` killed the workers' watchdog thread (and NaN never
    expires), silently switching the bound off. Refused before any worker starts."""
    with pytest.raises(InputError, match="decode_timeout must be a finite number of seconds greater than 0"):
        convert_imageset(
            caffe_dir / "images", caffe_dir / "list.txt", tmp_path / "db", progress=False, decode_timeout=timeout
        )
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


def test_skip_names_an_image_a_worker_died_on(caffe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker dies (a crash in a decoder); with skip the image is listed and the rest is built
    by a new pool, whose workers are spawned (this process may hold an LMDB environment by then)."""
    real = imageset._prepare

    def crash_on_img_05(image_path: str, *args: object) -> object:
        if os.path.basename(image_path) == "img_05.png":
            os._exit(9)
        return real(image_path, *args)

    monkeypatch.setattr(imageset, "_prepare", crash_on_img_05)  # inherited by the forked workers only
    list_file = caffe_dir / "list.txt"
    db = tmp_path / "db"
    options = ImagesetOptions(resize_height=32, resize_width=32)  # lmdb_raw's flags (FIXTURE_FLAGS)
    convert_imageset(caffe_dir / "images", list_file, db, options, workers=2, progress=False, on_error="skip")
    skipped = read_manifest(db)["metadata"]["skipped"]
    assert [(s["path"], s["line"]) for s in skipped] == [("img_05.png", 6)] and "crashed" in skipped[0]["reason"]
    expected = [(k, v) for k, v in read_lmdb_items(caffe_dir / "lmdb_raw") if not k.endswith(b"img_05.png")]
    assert read_lmdb_items(db) == expected  # the rest exactly as Caffe made it


def test_class_folders_are_labelled_by_sorted_name(caffe_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "classes"
    sources = sorted((caffe_dir / "images").rglob("*.png"), key=lambda p: p.name)
    layout = {"zebra": sources[:3], "ant": sources[3:6], ".hidden": sources[6:7], "cat": sources[7:9]}
    for name, files in layout.items():
        (root / name / "deeper").mkdir(parents=True)
        for index, source in enumerate(files):
            shutil.copy(source, root / name / ("deeper" if index == 0 else ".") / source.name)
        (root / name / "notes.txt").write_text("not an image")  # skipped by extension, as in torchvision
    (root / "README.md").write_text("files at the top level are not classes")
    entries, classes = imageset.read_class_folders(root)
    assert classes == [".hidden", "ant", "cat", "zebra"]  # torchvision: every folder, sorted
    expected = []
    for name in classes:  # sorted(os.walk(...)): the class folder's own files, then deeper/'s
        files = layout[name]
        expected += [(f"{name}/{f.name}", classes.index(name)) for f in sorted(files[1:], key=lambda f: f.name)]
        expected.append((f"{name}/deeper/{files[0].name}", classes.index(name)))
    assert [(e.path, e.label) for e in entries] == expected
    db = tmp_path / "db"
    assert main(["--no-progress", "convert-imageset", "--folders", str(root), str(db)]) == 0
    manifest = read_manifest(db)
    assert manifest["metadata"]["classes"] == classes and manifest["metadata"]["list_file"] is None
    assert [k.split(b"_", 1)[1].decode() for k, _ in read_lmdb_items(db)] == [e.path for e in entries]
    (root / "empty").mkdir()
    assert main(["--no-progress", "convert-imageset", "--folders", str(root), str(tmp_path / "db2")]) == 2


def _class_tree(caffe_dir: Path, root: Path) -> dict[str, list[str]]:
    """ROOT/a/{x.png, sub/y.png}, ROOT/b/z.png: each class's images as a listing gives them."""
    source = sorted((caffe_dir / "images").rglob("*.png"))[0]
    for name in ("a/x.png", "a/sub/y.png", "b/z.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / name)
    return {"a": ["a/x.png", "a/sub/y.png"], "b": ["b/z.png"]}


def _listing(root: Path, **options: bool) -> list[tuple[str, int]]:
    entries, _ = imageset.read_class_folders(root, **options)
    assert [e.line for e in entries] == list(range(1, len(entries) + 1))
    return [(e.path, e.label) for e in entries]


@pytest.mark.parametrize(
    "links",
    [
        {"a/loop": "."},  # once listed an image 41 times (until the name grew too long)
        {"a/loop": ".", "a/sub/loop": "."},  # two links to '.': grew without bound
        {"a/up": "..", "b/up": "../.."},  # to ROOT itself, and to the classes' parent (outside: refused)
        {"a/sibling": "../b", "b/back": "../a/sub"},  # to another class, in both directions
        {"a/sub/parent": "..", "a/sub/alias": "../sub"},  # to a folder listed on the way down
    ],
    ids=["loop-via-dot", "two-loops", "to-root", "to-sibling-class", "to-parent"],
)
def test_class_folders_list_each_real_folder_once_and_never_loop(
    caffe_dir: Path, tmp_path: Path, links: dict[str, str]
) -> None:
    """A folder link is followed only to a folder not listed yet, inside ROOT: every image once,
    under its own class, in the order of the tree without the links."""
    root = tmp_path / "root"
    layout = _class_tree(caffe_dir, root)
    expected = [(path, label) for label, name in enumerate(sorted(layout)) for path in layout[name]]
    assert _listing(root) == expected
    for link, target in links.items():
        (root / link).symlink_to(target, target_is_directory=True)
    if "../.." in links.values():  # leads out of ROOT: refused, whatever else is there
        with pytest.raises(UnsafeInputError, match=r"b/up: a symlink to the folder .*, outside ROOT"):
            imageset.read_class_folders(root)
        del links["b/up"]
        (root / "b" / "up").unlink()
    assert _listing(root) == expected
    db = tmp_path / "db"
    assert main(["--no-progress", "convert-imageset", "--folders", str(root), str(db)]) == 0
    assert [k.split(b"_", 1)[1].decode() for k, _ in read_lmdb_items(db)] == [path for path, _ in expected]


def test_a_folder_link_out_of_root_is_refused_in_one_line_unless_allowed(
    caffe_dir: Path, tmp_path: Path, capsys
) -> None:
    """A link to /usr walked the whole system (61 s, 4.4 GB); now one line, at once. With
    --allow-outside-root the outside folder is listed (once, loops there included)."""
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    layout = _class_tree(caffe_dir, root)
    shutil.copytree(root / "b", outside / "deep")
    (outside / "deep" / "again").symlink_to(outside, target_is_directory=True)  # a loop out there
    (root / "b" / "usr").symlink_to("/usr", target_is_directory=True)
    db = tmp_path / "db"
    argv = ["--no-progress", "convert-imageset", "--folders", str(root), str(db)]
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 30  # generous: the walk itself never starts
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root}/b/usr: a symlink to the folder /usr, outside ROOT" in err, err
    assert "--allow-outside-root" in err and not db.exists()
    (root / "b" / "usr").unlink()
    (root / "b" / "more").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeInputError, match="outside ROOT"):
        imageset.read_class_folders(root)
    listed = _listing(root, allow_outside_root=True)
    assert listed == [*((p, 0) for p in layout["a"]), ("b/z.png", 1), ("b/more/deep/z.png", 1)]
    assert main([*argv, "--allow-outside-root"]) == 0
    assert [k.split(b"_", 1)[1].decode() for k, _ in read_lmdb_items(db)] == [p for p, _ in listed]


def test_a_class_that_only_links_to_another_class_is_an_error_saying_so(caffe_dir: Path, tmp_path: Path) -> None:
    """Listing one folder under two labels is never what was meant: the alias holds no image."""
    root = tmp_path / "root"
    _class_tree(caffe_dir, root)
    (root / "c").symlink_to("a", target_is_directory=True)
    with pytest.raises(InputError, match=r"class folder .c. holds no image .*folder link c leads to a folder listed"):
        imageset.read_class_folders(root)


def test_cli_on_error_and_decode_timeout(caffe_dir: Path, tmp_path: Path, slow_png: Path, capsys) -> None:
    root, list_file, _ = _images_with(caffe_dir, tmp_path, {"slow.png": slow_png, "bad.jpg": b"nope"})
    argv = ["--no-progress", "convert-imageset", str(root), str(list_file)]
    assert main([*argv, str(tmp_path / "a"), "--decode-timeout", "0.1"]) == 2
    assert "list.txt:3: slow.png: decoding took longer than 0.1 s" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "b"), "--decode-timeout", "0.1", "--on-error", "skip"]) == 0
    assert "skipped 2 images" in capsys.readouterr().err
    assert len(read_manifest(tmp_path / "b")["metadata"]["skipped"]) == 2
    assert main([*argv, str(tmp_path / "c"), "--on-error", "sometimes"]) == 2
