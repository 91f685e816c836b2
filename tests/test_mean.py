"""datumdb.mean: compute_image_mean parity (byte for byte) and BlobProto reading/writing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_FLAGS

from datumdb import DatabaseWriter, DatumReader
from datumdb.cli import main
from datumdb.errors import DatumError, InputError
from datumdb.mean import channel_means, compute_mean, read_binaryproto, write_binaryproto
from datumdb.proto.datum_pb2 import BlobProto

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind", ["raw", "gray"])
@pytest.mark.parametrize("source", ["caffe", "datumdb"])
def test_compute_mean_reproduces_caffe_files(caffe_dir: Path, tmp_path: Path, expected, kind: str, source: str) -> None:
    if source == "caffe":
        db = caffe_dir / f"lmdb_{kind}"
    else:  # our own build of the same images must give the same mean
        db = tmp_path / "db"
        root, list_file = str(caffe_dir / "images") + "/", str(caffe_dir / "list.txt")
        assert (
            main(["--no-progress", "convert-imageset", root, list_file, str(db), *FIXTURE_FLAGS[f"lmdb_{kind}"]]) == 0
        )
    out, npy, js = tmp_path / "mean.binaryproto", tmp_path / "mean.npy", tmp_path / "sub" / "mean.json"
    assert main(["--no-progress", "compute-mean", str(db), str(out), "--npy", str(npy), "--json", str(js)]) == 0
    reference = (caffe_dir / f"mean_{kind}.binaryproto").read_bytes()
    assert out.read_bytes() == reference
    facts = expected[f"mean_{kind}"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == facts["file_sha256"]
    ours, theirs = np.load(npy), np.load(caffe_dir / f"mean_{kind}.npy")
    assert ours.dtype == theirs.dtype == np.float32
    assert ours.shape == theirs.shape == tuple(facts["npy_shape"])
    assert np.array_equal(ours, theirs)  # exact floats, not approximately
    summary = json.loads(js.read_text())
    assert summary["shape"] == facts["npy_shape"]
    assert summary["channel_means"] == pytest.approx(facts["per_channel_mean"], rel=1e-12)


@pytest.mark.parametrize("kind", ["raw", "gray"])
def test_read_binaryproto_reads_the_fixtures(caffe_dir: Path, expected, kind: str) -> None:
    facts = expected[f"mean_{kind}"]
    mean = read_binaryproto(caffe_dir / f"mean_{kind}.binaryproto")
    assert mean.dtype == np.float32
    assert mean.shape == (facts["channels"], facts["height"], facts["width"])
    assert np.array_equal(mean, np.load(caffe_dir / f"mean_{kind}.npy"))
    for sample in facts["sample_values"]:
        assert mean[sample["c"], sample["h"], sample["w"]] == np.float32(sample["value"])


def test_compute_mean_matches_a_float32_running_sum(caffe_dir: Path) -> None:
    mean = compute_mean(caffe_dir / "lmdb_raw", progress=False)
    total = np.zeros((3, 32, 32), np.float32)
    with DatumReader(caffe_dir / "lmdb_raw") as reader:
        for array, _ in reader:
            total += array
    assert np.array_equal(mean, total / np.float32(12))
    assert np.array_equal(mean, np.load(caffe_dir / "mean_raw.npy"))


def test_compute_mean_decodes_encoded_datums(caffe_dir: Path) -> None:
    mean = compute_mean(caffe_dir / "lmdb_jpg", progress=False)
    total = np.zeros((3, 32, 32), np.float32)
    with DatumReader(caffe_dir / "lmdb_jpg") as reader:
        for array, _ in reader:
            total += array
    assert np.array_equal(mean, total / np.float32(12))
    assert np.abs(mean - np.load(caffe_dir / "mean_raw.npy")).max() < 20  # JPEG is close to the raw images


def test_compute_mean_rejects_mixed_shapes_and_empty_databases(caffe_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DatumError, match="differs from the first record"):
        compute_mean(caffe_dir / "lmdb_png", progress=False)  # original sizes differ
    with DatabaseWriter(tmp_path / "empty"):
        pass
    with pytest.raises(InputError, match="empty"):
        compute_mean(tmp_path / "empty", progress=False)


def test_float_database_mean(tmp_path: Path) -> None:
    data = np.random.default_rng(2).normal(size=(7, 2, 3, 4)).astype(np.float32)
    with DatabaseWriter(tmp_path / "db") as writer:
        for x in data:
            writer.add(x, 0)
    total = np.zeros((2, 3, 4), np.float32)
    for x in data:
        total += x
    assert np.array_equal(compute_mean(tmp_path / "db", progress=False), total / np.float32(7))


def test_binaryproto_round_trip_and_shape_field(tmp_path: Path) -> None:
    mean = np.random.default_rng(0).random((2, 3, 5), dtype=np.float32)
    path = write_binaryproto(mean, tmp_path / "m.binaryproto")
    assert np.array_equal(read_binaryproto(path), mean)
    blob = BlobProto()
    blob.ParseFromString(path.read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 2, 3, 5)
    modern = BlobProto()
    modern.shape.dim.extend([1, 2, 3, 5])
    modern.data.extend(mean.reshape(-1).tolist())
    (tmp_path / "shape.binaryproto").write_bytes(modern.SerializeToString())
    assert np.array_equal(read_binaryproto(tmp_path / "shape.binaryproto"), mean)
    with pytest.raises(ValueError):
        write_binaryproto(np.zeros((3, 3)), tmp_path / "bad.binaryproto")


def test_read_binaryproto_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "garbage").write_bytes(b"\xff\xff\xff\xff\xff")
    with pytest.raises(DatumError, match="not a BlobProto"):
        read_binaryproto(tmp_path / "garbage")
    blob = BlobProto(num=1, channels=3, height=2, width=2)
    blob.data.extend([1.0] * 5)
    (tmp_path / "short").write_bytes(blob.SerializeToString())
    with pytest.raises(DatumError, match="does not match 5 values"):
        read_binaryproto(tmp_path / "short")


def test_channel_means_of_mixed_sizes_are_numpys_mean_over_every_pixel(caffe_dir: Path, tmp_path: Path) -> None:
    """No mean image for photos of their own sizes (as Caffe), but each channel's mean over all pixels."""
    rng = np.random.default_rng(3)
    images = [
        rng.integers(0, 256, (3, int(rng.integers(5, 40)), int(rng.integers(5, 40))), dtype=np.uint8) for _ in range(9)
    ]
    with DatabaseWriter(tmp_path / "raw") as writer:
        for i, image in enumerate(images):
            writer.add(image, i % 2)
    means, count = channel_means(tmp_path / "raw", progress=False)
    pixels = np.concatenate([image.reshape(3, -1) for image in images], axis=1).astype(np.float64)
    assert count == 9 and means == pytest.approx(pixels.mean(axis=1).tolist(), rel=1e-12)
    # encoded PNGs of their own sizes (Caffe's fixture), decoded as the reader decodes them
    means, count = channel_means(caffe_dir / "lmdb_png", progress=False)
    with DatumReader(caffe_dir / "lmdb_png") as reader:
        decoded = [array for array, _ in reader]
    assert len({a.shape for a in decoded}) > 1 and count == len(decoded)
    pixels = np.concatenate([a.reshape(a.shape[0], -1) for a in decoded], axis=1).astype(np.float64)
    assert means == pytest.approx(pixels.mean(axis=1).tolist(), rel=1e-12)
    with pytest.raises(DatumError, match="differs from the first record"):
        compute_mean(caffe_dir / "lmdb_png", progress=False)  # the mean image stays Caffe's refusal


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channel_sums_of_decoded_views_equal_numpys_exact_sums(dtype: type, channels: int) -> None:
    """A decoded image is a CHW view of HWC pixels (summed by OpenCV); a raw one is CHW (numpy)."""
    from datumdb.mean import _channel_sums

    rng = np.random.default_rng(channels)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    hwc = (rng.random((37, 53, channels)) * top).astype(dtype)
    hwc[0, 0] = top  # the largest pixel, so an inexact sum would show
    for chw in (hwc.transpose(2, 0, 1), np.ascontiguousarray(hwc.transpose(2, 0, 1))):
        sums = _channel_sums(chw)
        exact = chw.reshape(channels, -1).astype(np.float64 if dtype == np.float32 else np.int64).sum(axis=1)
        assert sums.dtype == exact.dtype
        assert np.allclose(sums, exact) if dtype == np.float32 else np.array_equal(sums, exact)
