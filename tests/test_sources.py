"""datumdb.sources: convert-arrays (layouts, channel order, gray, floats, encodings, bad input)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import leftovers, read_lmdb_items

import datumdb.sources
from datumdb import DatabaseWriter, DatumReader
from datumdb.cli import main
from datumdb.codec import decode
from datumdb.errors import InputError
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import to_config, validate_params
from datumdb.pipeline.sources import open_source
from datumdb.sources import convert_arrays, iter_array_samples, load_labels

pytestmark = pytest.mark.unit


def _save(tmp_path: Path, images: np.ndarray, labels, name: str = "X") -> tuple[Path, Path]:
    x, y = tmp_path / f"{name}.npy", tmp_path / f"{name}_labels.npy"
    np.save(x, images)
    np.save(y, np.asarray(labels))
    return x, y


def _cli(x: Path, y: Path, db: Path, *flags: str) -> int:
    return main(["--no-progress", "convert-arrays", str(x), str(y), str(db), *flags])


@pytest.fixture()
def chw(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, (9, 3, 5, 7), dtype=np.uint8), rng.integers(-4, 40, 9)


def test_chw_and_hwc_layouts_give_the_same_database(tmp_path: Path, chw) -> None:
    images, labels = chw
    x1, y = _save(tmp_path, images, labels, "chw")
    x2, _ = _save(tmp_path, np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, "hwc")
    assert _cli(x1, y, tmp_path / "a") == 0
    assert _cli(x2, y, tmp_path / "b", "--layout", "hwc") == 0
    assert read_lmdb_items(tmp_path / "a") == read_lmdb_items(tmp_path / "b")
    assert read_manifest(tmp_path / "a")["digest"] == read_manifest(tmp_path / "b")["digest"]
    with DatumReader(tmp_path / "b") as reader:
        assert len(reader) == 9
        for i, (array, label) in enumerate(reader):
            np.testing.assert_array_equal(array, images[i])
            assert label == labels[i]
    manifest = read_manifest(tmp_path / "b")
    assert manifest["channel_order"] == "as given" and manifest["shapes"] == {"3x5x7": 9}
    assert manifest["metadata"]["layout"] == "hwc"


def test_bgr_from_rgb_reverses_channels(tmp_path: Path, chw) -> None:
    images, labels = chw
    x, y = _save(tmp_path, images, labels)
    assert _cli(x, y, tmp_path / "db", "--bgr-from-rgb") == 0
    with DatumReader(tmp_path / "db") as reader:
        for i, (array, _) in enumerate(reader):
            np.testing.assert_array_equal(array, images[i, ::-1])
    assert read_manifest(tmp_path / "db")["channel_order"] == "BGR"
    x2, _ = _save(tmp_path, np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, "hwc")
    assert _cli(x2, y, tmp_path / "db2", "--bgr-from-rgb", "--layout", "hwc") == 0
    assert read_lmdb_items(tmp_path / "db") == read_lmdb_items(tmp_path / "db2")


def test_gray_images(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 6), dtype=np.uint8)
    x, y = _save(tmp_path, images, np.arange(5))
    assert _cli(x, y, tmp_path / "db") == 0
    with DatumReader(tmp_path / "db") as reader:
        for i, (array, label) in enumerate(reader):
            assert array.shape == (1, 4, 6)
            np.testing.assert_array_equal(array[0], images[i])
            assert label == i
    manifest = read_manifest(tmp_path / "db")
    assert manifest["channel_order"] == "gray" and manifest["shapes"] == {"1x4x6": 5}
    with pytest.raises(InputError, match="3-channel"):
        convert_arrays(x, y, tmp_path / "bgr", bgr_from_rgb=True, progress=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_float_arrays_become_float_data_read_back_exactly(tmp_path: Path, dtype) -> None:
    rng = np.random.default_rng(4)
    images = (rng.normal(size=(6, 2, 3, 3)) * 1000).astype(dtype)
    x, y = _save(tmp_path, images, np.zeros(6, dtype=np.int32))
    assert _cli(x, y, tmp_path / "db", "--layout", "chw") == 0  # (N, 2, 3, 3) needs it said
    for _, value in read_lmdb_items(tmp_path / "db"):
        datum = decode(value)
        assert len(datum.data) == 0 and datum.float_data.size == 18
    with DatumReader(tmp_path / "db") as reader:
        batch, labels = reader.read_batch(range(6))
    assert labels.tolist() == [0] * 6
    assert batch.dtype == np.float32
    assert np.array_equal(batch, images.astype(np.float32))
    assert read_manifest(tmp_path / "db")["dtype"] == "float32"


def test_png_encoding_round_trips_exactly(tmp_path: Path, chw) -> None:
    images, labels = chw
    x, y = _save(tmp_path, images, labels)
    assert _cli(x, y, tmp_path / "db", "--encode", "png") == 0
    for _, value in read_lmdb_items(tmp_path / "db"):
        datum = decode(value)
        assert datum.encoded and bytes(datum.data[:4]) == b"\x89PNG" and datum.shape == (3, 5, 7)
    with DatumReader(tmp_path / "db") as reader:
        batch, got_labels = reader.read_batch(np.arange(9))
    np.testing.assert_array_equal(batch, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert read_manifest(tmp_path / "db")["encoding"] == "png"
    assert _cli(x, y, tmp_path / "jpg", "--encode", "jpg") == 0
    with DatumReader(tmp_path / "jpg") as reader:
        assert reader[0][0].shape == (3, 5, 7)
        assert bytes(reader.datum(0).data[:2]) == b"\xff\xd8"


def test_many_chunks_stream_correctly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny chunk size makes the mmap walk (and its page dropping) cover many chunks."""
    monkeypatch.setattr(datumdb.sources, "CHUNK_BYTES", 5000)
    images = np.random.default_rng(8).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)
    x, y = _save(tmp_path, images, np.arange(40) % 7)
    convert_arrays(x, y, tmp_path / "db", batch_size=9, progress=False)
    with DatumReader(tmp_path / "db") as reader:
        batch, labels = reader.read_batch(np.arange(40))
    np.testing.assert_array_equal(batch, images)
    np.testing.assert_array_equal(labels, np.arange(40) % 7)


@pytest.mark.parametrize(
    ("shape", "layout", "bgr_from_rgb"),
    [((3, 5, 7), "chw", False), ((5, 7, 3), "hwc", True), ((3, 4, 4), "chw", True), ((6, 5), "chw", False)],
)
def test_convert_arrays_writes_what_adding_each_sample_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape, layout, bgr_from_rgb
) -> None:
    """The bulk path (add_batch over each chunk) against the writer's add() per sample: the same
    data.mdb and manifest, with chunks and batches that do not divide the count, labels of every
    varint length and a map that grows."""
    monkeypatch.setattr(datumdb.sources, "CHUNK_BYTES", 1000)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (1100, *shape), dtype=np.uint8)
    labels = rng.choice([0, 3, 127, 128, 20000, 2**31 - 1, -1, -(2**31)], 1100)
    x, y = _save(tmp_path, images, labels)
    options = {"batch_size": 97, "map_size": 1 << 15}
    convert_arrays(x, y, tmp_path / "bulk", layout=layout, bgr_from_rgb=bgr_from_rgb, progress=False, **options)  # type: ignore[arg-type]
    manifest = read_manifest(tmp_path / "bulk")
    samples = images[:, np.newaxis] if len(shape) == 2 else images
    samples = samples.transpose(0, 3, 1, 2) if layout == "hwc" else samples
    samples = samples[:, ::-1] if bgr_from_rgb else samples
    with DatabaseWriter(
        tmp_path / "one", channel_order=manifest["channel_order"], metadata=manifest["metadata"], **options
    ) as writer:
        for sample, label in zip(samples, labels.tolist(), strict=True):
            writer.add(sample, label)
    assert (tmp_path / "bulk" / "data.mdb").read_bytes() == (tmp_path / "one" / "data.mdb").read_bytes()
    assert (tmp_path / "bulk" / "datumdb.json").read_bytes() == (tmp_path / "one" / "datumdb.json").read_bytes()
    assert manifest["writer"]["map_size"] > 1 << 15


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.arange(8), "8 labels for 9 images"),
        (np.arange(10), "10 labels for 9 images"),
        (np.arange(9, dtype=np.float64), "must be integers"),
        (np.ones(9, dtype=bool), "must be integers"),
        (np.arange(9).reshape(3, 3), "1-D"),
        (np.array([0] * 4 + [2**31] + [0] * 4, dtype=np.int64), "label 2147483648 at index 4 is outside int32"),
        (np.array([0] * 8 + [-(2**31) - 1], dtype=np.int64), "at index 8 is outside int32"),
        (np.array([0] * 8 + [2**63], dtype=np.uint64), "outside int32"),
    ],
)
def test_bad_labels(tmp_path: Path, chw, labels: np.ndarray, message: str, capsys) -> None:
    x, y = _save(tmp_path, chw[0], labels)
    with pytest.raises(InputError, match=message):
        convert_arrays(x, y, tmp_path / "db", progress=False)
    capsys.readouterr()
    assert _cli(x, y, tmp_path / "db") == 2
    err = capsys.readouterr().err
    assert err.startswith("datumdb convert-arrays: error:") and str(y) in err and message.split()[0] in err
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


def test_int32_limit_labels_are_accepted(tmp_path: Path, chw) -> None:
    labels = np.array([-(2**31), 2**31 - 1, 0, 0, 0, 0, 0, 0, 0], dtype=np.int64)
    x, y = _save(tmp_path, chw[0], labels)
    convert_arrays(x, y, tmp_path / "db", progress=False)
    assert [decode(v).label for _, v in read_lmdb_items(tmp_path / "db")][:2] == [-(2**31), 2**31 - 1]
    assert load_labels(y).dtype == np.int64


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_images_name_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float) -> None:
    monkeypatch.setattr(datumdb.sources, "CHUNK_BYTES", 2 * 4 * 2 * 3 * 3)  # two rows per chunk
    images = np.zeros((9, 2, 3, 3), dtype=np.float32)
    images[7, 1, 2, 0] = bad
    x, y = _save(tmp_path, images, np.zeros(9, np.int64))
    with pytest.raises(InputError, match=r"image 7 contains NaN or infinity"):
        convert_arrays(x, y, tmp_path / "db", layout="chw", progress=False)  # (N, 2, 3, 3): chw said explicitly
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 5), np.uint8), "got shape"),
        (np.zeros((2, 1, 3, 4, 5), np.uint8), "got shape"),
        (np.zeros((2, 3, 0, 4), np.uint8), "empty dimension"),
        (np.zeros((2, 3, 4), bool), "dtype"),
        (np.zeros((2, 3, 4), np.complex64), "dtype"),
    ],
)
def test_bad_images(tmp_path: Path, images: np.ndarray, message: str) -> None:
    x, y = _save(tmp_path, images, np.zeros(len(images), np.int64))
    with pytest.raises(InputError, match=message):
        convert_arrays(x, y, tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists()


def test_missing_and_unreadable_files(tmp_path: Path, chw) -> None:
    x, y = _save(tmp_path, chw[0], chw[1])
    with pytest.raises(InputError, match="images file not found"):
        convert_arrays(tmp_path / "absent.npy", y, tmp_path / "db", progress=False)
    with pytest.raises(InputError, match="labels file not found"):
        convert_arrays(x, tmp_path / "absent.npy", tmp_path / "db", progress=False)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match=r"not a readable \.npy"):
        convert_arrays(tmp_path / "junk.npy", y, tmp_path / "db", progress=False)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 9, dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        convert_arrays(x, tmp_path / "objects.npy", tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists()


def test_iter_array_samples_reports_count_and_shape(tmp_path: Path, chw) -> None:
    x, _ = _save(tmp_path, np.ascontiguousarray(chw[0].transpose(0, 2, 3, 1)), chw[1])
    count, shape, samples = iter_array_samples(x, layout="hwc", bgr_from_rgb=True)
    assert (count, shape) == (9, (3, 5, 7))
    first = next(samples)
    np.testing.assert_array_equal(first, chw[0][0, ::-1])
    with pytest.raises(InputError, match="layout"):
        iter_array_samples(x, layout="whc")  # type: ignore[arg-type]


def test_arrays_pipeline_source_matches_convert_arrays(tmp_path: Path, chw) -> None:
    images, labels = chw
    np.save(tmp_path / "X.npy", np.ascontiguousarray(images.transpose(0, 2, 3, 1)))
    np.save(tmp_path / "y.npy", labels)

    def dataset(**arrays: object):
        params = {"dataset": {"source": "arrays", "input_dir": str(tmp_path), "arrays": arrays}}
        return to_config(validate_params(params)).dataset

    source = open_source(dataset(layout="hwc", bgr_from_rgb=True), 0)
    assert (source.count, source.shape, source.channel_order) == (9, (3, 5, 7), "BGR")
    got, got_labels = source.read(2, 6)
    np.testing.assert_array_equal(got, images[2:6, ::-1])
    np.testing.assert_array_equal(got_labels, labels[2:6])
    floats = np.zeros((5, 1, 2, 2), np.float64)
    floats[3, 0, 1, 1] = np.nan
    np.save(tmp_path / "F.npy", floats)
    np.save(tmp_path / "Fy.npy", np.zeros(5, np.int64))
    float_source = open_source(dataset(images="F.npy", labels="Fy.npy"), 0)
    assert float_source.read(0, 3)[0].dtype == np.float32
    with pytest.raises(InputError, match="image 3 contains NaN"):
        float_source.read(2, 5)


# --------------------------------------------------------------------------- memory layouts


def _digest(db: Path) -> str:
    return read_manifest(db)["digest"]


@pytest.mark.parametrize(
    ("dtype", "layout"),
    [("uint8", "chw"), ("uint8", "hwc"), ("<f4", "chw"), (">f4", "hwc"), (">i2", "chw"), (">f8", "chw")],
)
def test_fortran_order_and_byte_order_give_the_c_order_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, layout: str
) -> None:
    # small chunks and blocks: many chunks, and each gathered in several column blocks
    monkeypatch.setattr(datumdb.sources, "CHUNK_BYTES", 700)
    rng = np.random.default_rng(4)
    shape = (23, 3, 5, 7) if layout == "chw" else (23, 5, 7, 3)
    images = rng.integers(0, 200, shape).astype(dtype)
    labels = rng.integers(0, 9, 23)
    x, y = _save(tmp_path, images.astype(np.dtype(dtype).newbyteorder("=")), labels)
    fx = tmp_path / "F.npy"
    np.save(fx, np.asfortranarray(images))
    with open(fx, "rb") as handle:
        np.lib.format.read_magic(handle)
        assert np.lib.format.read_array_header_1_0(handle)[1:] == (True, np.dtype(dtype))  # Fortran, as asked
    convert_arrays(x, y, tmp_path / "c", layout=layout, progress=False)  # type: ignore[arg-type]
    convert_arrays(fx, y, tmp_path / "f", layout=layout, progress=False)  # type: ignore[arg-type]
    assert read_lmdb_items(tmp_path / "f") == read_lmdb_items(tmp_path / "c")
    with DatumReader(tmp_path / "f") as reader:
        expected = images if layout == "chw" else images.transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(reader[22][0], expected[22])


_RSS_PROBE = """
import resource, sys
import datumdb.sources as sources
sources.CHUNK_BYTES = 8 << 20
sources.convert_arrays(sys.argv[1], sys.argv[2], sys.argv[3], layout="chw", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_fortran_order_streams_in_the_memory_of_c_order(tmp_path: Path) -> None:
    """Peak RSS of convert-arrays over a 192 MiB Fortran-order file is that of the C-order file.

    Without the column-block gathering, every chunk touched pages all over the file and none
    were dropped, so the whole file became resident.
    """
    count, sample = 16384, (3, 64, 64)  # 12 KiB per image, 192 MiB in all
    rng = np.random.default_rng(0)
    paths = {}
    for name, fortran in (("c", False), ("f", True)):
        paths[name] = tmp_path / f"{name}.npy"
        out = np.lib.format.open_memmap(
            paths[name], mode="w+", dtype=np.uint8, shape=(count, *sample), fortran_order=fortran
        )
        for start in range(0, count, 2048):
            out[start : start + 2048] = np.random.default_rng(start).integers(0, 256, (2048, *sample), np.uint8)
        out.flush()
        del out
    np.save(tmp_path / "y.npy", rng.integers(0, 10, count))
    peaks = {}
    for name, path in paths.items():
        probe = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, str(path), str(tmp_path / "y.npy"), str(tmp_path / f"db_{name}")],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        peaks[name] = int(probe.stdout.split()[-1])
    assert _digest(tmp_path / "db_f") == _digest(tmp_path / "db_c")
    file_bytes = count * int(np.prod(sample))
    assert peaks["f"] - peaks["c"] < file_bytes // 4, peaks  # was about + file_bytes


# --------------------------------------------------------------------------- ambiguous input


@pytest.mark.parametrize("shape", [(4, 32, 32, 3), (4, 28, 28, 1), (4, 10, 12, 4)])
def test_hwc_looking_arrays_need_an_explicit_layout(tmp_path: Path, shape: tuple[int, ...], capsys) -> None:
    images = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    x, y = _save(tmp_path, images, np.arange(4))
    capsys.readouterr()
    assert _cli(x, y, tmp_path / "db") == 2
    err = capsys.readouterr().err
    assert f"X.npy: images of shape {shape} look like (N, H, W, C) with {shape[3]} channel(s)" in err
    assert "--layout hwc" in err and not (tmp_path / "db").exists()
    assert _cli(x, y, tmp_path / "hwc", "--layout", "hwc") == 0
    assert _cli(x, y, tmp_path / "chw", "--layout", "chw") == 0  # said explicitly: taken as given
    assert read_manifest(tmp_path / "hwc")["shapes"] == {f"{shape[3]}x{shape[1]}x{shape[2]}": 4}
    assert read_manifest(tmp_path / "chw")["shapes"] == {"x".join(map(str, shape[1:])): 4}
    assert read_manifest(tmp_path / "hwc")["metadata"]["layout"] == "hwc"


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (4, 1, 28, 28), (4, 3, 8, 4), (4, 5, 6, 7)])
def test_unambiguous_arrays_default_to_chw(tmp_path: Path, shape: tuple[int, ...]) -> None:
    x, y = _save(tmp_path, np.zeros(shape, np.uint8), np.arange(4))
    convert_arrays(x, y, tmp_path / "db", progress=False)
    manifest = read_manifest(tmp_path / "db")
    assert manifest["shapes"] == {"x".join(map(str, shape[1:])): 4}
    assert manifest["metadata"]["layout"] == "chw"


@pytest.mark.parametrize(
    ("dtype", "value"),
    [("int64", 2**24 + 1), ("int64", -(2**24) - 1), ("uint32", 2**24 + 1), ("int32", 2**31 - 1), ("uint64", 2**63)],
)
def test_integers_float32_cannot_hold_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, value: int
) -> None:
    monkeypatch.setattr(datumdb.sources, "CHUNK_BYTES", 2 * 2 * 3 * 4 * 8)  # two images per chunk
    images = np.zeros((7, 2, 3, 4), dtype=dtype)
    images[5, 1, 2, 3] = value
    x, y = _save(tmp_path, images, np.zeros(7, np.int64))
    with pytest.raises(InputError, match=rf"X\.npy: image 5 holds {value} at index \(1, 2, 3\); float32"):
        convert_arrays(x, y, tmp_path / "db", layout="chw", progress=False)
    assert not (tmp_path / "db").exists()


def test_integers_up_to_2_24_are_stored_exactly(tmp_path: Path) -> None:
    images = np.array([[[[2**24, -(2**24)], [12345678, -7]]]], dtype=np.int64)
    x, y = _save(tmp_path, images, [3])
    convert_arrays(x, y, tmp_path / "db", progress=False)
    with DatumReader(tmp_path / "db") as reader:
        array, label = reader[0]
    assert array.dtype == np.float32 and label == 3
    assert array.astype(np.int64).tolist() == images[0].tolist()


# --------------------------------------------------------------------------- arrays are files


@pytest.mark.parametrize("kind", ["fifo", "devzero", "folder"])
def test_npy_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path: Path, chw, kind: str) -> None:
    x, y = _save(tmp_path, chw[0], chw[1])
    special = tmp_path / "special.npy"
    if kind == "fifo":
        os.mkfifo(special)
    elif kind == "devzero":
        special.symlink_to("/dev/zero")
    else:
        special.mkdir()
    for images, labels in ((special, y), (x, special)):
        result = subprocess.run(
            [sys.executable, "-m", "datumdb.cli", "convert-arrays", str(images), str(labels), str(tmp_path / "db")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 2
        found = re.search(r"special\.npy: (images|labels) file is a .*, not a regular file", result.stderr)
        assert found, result.stderr
    assert not (tmp_path / "db").exists()


def test_npz_and_truncated_npy_are_clear_errors(tmp_path: Path, chw) -> None:
    x, y = _save(tmp_path, chw[0], chw[1])
    np.savez(tmp_path / "both.npz", images=chw[0])
    with pytest.raises(InputError, match=r"both\.npz: not a readable \.npy images file"):
        convert_arrays(tmp_path / "both.npz", y, tmp_path / "db", progress=False)
    (tmp_path / "cut.npy").write_bytes(x.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"cut\.npy: \d+ bytes, but its header .* needs \d+"):
        convert_arrays(tmp_path / "cut.npy", y, tmp_path / "db", progress=False)


@pytest.mark.parametrize("reader", ["cifar10", "mnist"])
def test_pipeline_inputs_that_are_fifos_are_refused(tmp_path: Path, reader: str) -> None:
    """read_cifar10 and read_idx check the file before opening it (a FIFO would block open())."""
    os.mkfifo(tmp_path / "pipe.bin")
    code = (
        "import sys; from datumdb.pipeline import sources; from datumdb.errors import UnsafeInputError\n"
        "try:\n"
        f"    sources.{'read_cifar10([sys.argv[1]])' if reader == 'cifar10' else 'read_idx(sys.argv[1])'}\n"
        "except UnsafeInputError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "pipe.bin")], capture_output=True, text=True, timeout=120
    )
    assert "pipe.bin: " in result.stdout and "is a FIFO (named pipe), not a regular file" in result.stdout, result


def test_pipeline_arrays_source_refuses_what_convert_arrays_refuses(tmp_path: Path) -> None:
    images = np.zeros((5, 1, 2, 2), np.int64)
    images[3, 0, 1, 0] = 2**24 + 1
    np.save(tmp_path / "X.npy", images)
    np.save(tmp_path / "y.npy", np.zeros(5, np.int64))

    def dataset():
        params = {"dataset": {"source": "arrays", "input_dir": str(tmp_path), "arrays": {"layout": "chw"}}}
        return to_config(validate_params(params)).dataset

    source = open_source(dataset(), 0)
    np.testing.assert_array_equal(source.read(0, 3)[0], np.zeros((3, 1, 2, 2), np.float32))
    with pytest.raises(InputError, match=r"X\.npy: image 3 holds 16777217 at index \(0, 1, 0\)"):
        source.read(2, 5)
    np.save(tmp_path / "X.npy", np.full((5, 1, 2, 2), 1e300))
    with pytest.raises(InputError, match=r"X\.npy: image 0 is beyond float32's range"):
        open_source(dataset(), 0).read(0, 2)
