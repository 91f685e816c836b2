"""The pipeline's dataset sources, read from tiny files in their real formats."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from datumdb import synthetic
from datumdb.errors import InputError
from datumdb.pipeline.config import DatasetConfig, to_config, validate_params
from datumdb.pipeline.sources import open_source, read_cifar10, read_idx, read_mnist

pytestmark = pytest.mark.unit


def _dataset(source: str, input_dir: Path | None = None, **options: object) -> DatasetConfig:
    """The validated ``dataset`` section of a params file (schema defaults for what is not given)."""
    dataset: dict[str, object] = {"source": source, **options}
    if input_dir is not None:
        dataset["input_dir"] = str(input_dir)
    return to_config(validate_params({"dataset": dataset})).dataset


def _cifar_batch(path: Path, labels: list[int], seed: int) -> np.ndarray:
    """Write a CIFAR-10 binary batch; return its images as RGB (N, 3, 32, 32)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    path.write_bytes(b"".join(bytes([label]) + image.tobytes() for label, image in zip(labels, rgb, strict=True)))
    return rgb


def _idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_cifar10_batches_are_read_in_order_as_bgr(tmp_path: Path) -> None:
    first = _cifar_batch(tmp_path / "data_batch_1.bin", [3, 9, 0], seed=1)
    second = _cifar_batch(tmp_path / "data_batch_2.bin", [7, 1], seed=2)
    images, labels = read_cifar10([tmp_path / "data_batch_1.bin", tmp_path / "data_batch_2.bin"])
    assert labels.tolist() == [3, 9, 0, 7, 1]
    assert np.array_equal(images, np.concatenate([first, second])[:, ::-1])
    source = open_source(
        _dataset("cifar10", tmp_path, cifar10={"batches": ["data_batch_1.bin", "data_batch_2.bin"]}), 0
    )
    assert (source.count, source.shape, source.channel_order) == (5, (3, 32, 32), "BGR")
    part_images, part_labels = source.read(2, 4)
    assert np.array_equal(part_images, images[2:4]) and part_labels.tolist() == [0, 7]


def test_cifar10_damage_is_named(tmp_path: Path) -> None:
    (tmp_path / "short.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(InputError, match=r"short\.bin.*3073"):
        read_cifar10([tmp_path / "short.bin"])
    _cifar_batch(tmp_path / "bad_label.bin", [12], seed=0)
    with pytest.raises(InputError, match="label 12"):
        read_cifar10([tmp_path / "bad_label.bin"])
    with pytest.raises(InputError, match="not found"):
        read_cifar10([tmp_path / "missing.bin"])


def test_mnist_idx_files(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    _idx(tmp_path / "train-images-idx3-ubyte", images)
    _idx(tmp_path / "train-labels-idx1-ubyte", np.array([5, 0, 4, 1], dtype=np.uint8))
    got, labels = read_mnist(tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte")
    assert got.shape == (4, 1, 28, 28) and np.array_equal(got[:, 0], images) and labels.tolist() == [5, 0, 4, 1]
    source = open_source(_dataset("mnist", tmp_path), 0)  # the schema's default file names
    assert (source.count, source.shape, source.channel_order) == (4, (1, 28, 28), "gray")


def test_mnist_mismatch_and_damage_are_named(tmp_path: Path) -> None:
    _idx(tmp_path / "images", np.zeros((3, 2, 2), dtype=np.uint8))
    _idx(tmp_path / "labels", np.zeros(2, dtype=np.uint8))
    with pytest.raises(InputError, match="2 labels for 3 images"):
        read_mnist(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "cut").write_bytes((tmp_path / "images").read_bytes()[:-1])
    with pytest.raises(InputError, match=r"cut.*needs"):
        read_mnist(tmp_path / "cut", tmp_path / "labels")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(InputError, match="not an idx file"):
        read_mnist(tmp_path / "junk", tmp_path / "labels")


def test_arrays_source_hwc_rgb(tmp_path: Path) -> None:
    hwc = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "X.npy", hwc)
    np.save(tmp_path / "y.npy", np.arange(5))
    source = open_source(_dataset("arrays", tmp_path, arrays={"layout": "hwc", "bgr_from_rgb": True}), 0)
    assert (source.count, source.shape, source.channel_order) == (5, (3, 4, 6), "BGR")
    images, labels = source.read(1, 3)
    assert np.array_equal(images, hwc[1:3].transpose(0, 3, 1, 2)[:, ::-1]) and labels.tolist() == [1, 2]


def test_arrays_source_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"X\.npy.*not found"):
        open_source(_dataset("arrays", tmp_path), 0)


def test_imageset_source_resizes_and_keeps_list_order(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, size in enumerate([(10, 12), (7, 9), (10, 12)]):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        lines.append(f"{i}.png {i + 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    options = {"root": "images", "list_file": "list.txt", "resize_height": 8, "resize_width": 8}
    source = open_source(_dataset("imageset", tmp_path, imageset=options), 0)
    images, labels = source.read(0, 3)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [3, 4, 5]
    unresized = open_source(_dataset("imageset", tmp_path), 0)
    with pytest.raises(InputError, match=r"list\.txt:2.*resize"):
        unresized.read(0, 3)


def test_imageset_shuffle_follows_the_seed(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for i in range(12):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.full((4, 4, 3), i, dtype=np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(12)))
    in_order = open_source(_dataset("imageset", tmp_path), 0).labels()
    assert in_order.tolist() == list(range(12))
    shuffled = _dataset("imageset", tmp_path, imageset={"shuffle": True})
    first, again, other = (open_source(shuffled, seed).labels() for seed in (1, 1, 2))
    assert sorted(first.tolist()) == list(range(12)) and first.tolist() != list(range(12))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    images, labels = open_source(shuffled, 1).read(0, 12)
    assert np.array_equal(images[:, 0, 0, 0], labels)  # each image still travels with its label


def test_synthetic_source_is_synthetic_generate(tmp_path: Path) -> None:
    dataset = _dataset("synthetic", count=20, shape=[1, 5, 4], classes=3)
    source = open_source(dataset, 7)
    assert (source.name, source.count, source.shape, source.channel_order) == ("synthetic", 20, (1, 5, 4), "gray")
    images, labels = source.read(4, 11)
    expected_images, expected_labels = synthetic.generate(7, 4, 11, (1, 5, 4), 3)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    assert source.labels().tolist() == synthetic.generate(7, 0, 20, (1, 5, 4), 3)[1].tolist()
    assert open_source(_dataset("synthetic", count=20, shape=[3, 5, 4], classes=3), 7).channel_order == "BGR"


def test_idx_other_types_and_truncated_headers(tmp_path: Path) -> None:
    array = np.arange(6, dtype=">i4").reshape(2, 3)
    (tmp_path / "ints").write_bytes(b"\0\0\x0c\x02" + struct.pack(">2I", 2, 3) + array.tobytes())
    assert read_idx(tmp_path / "ints").tolist() == array.tolist()
    (tmp_path / "short").write_bytes(b"\0\0\x08\x03" + struct.pack(">I", 2))
    with pytest.raises(InputError, match="truncated idx header"):
        read_idx(tmp_path / "short")
    with pytest.raises(InputError, match="idx file not found"):
        read_idx(tmp_path / "missing")


def test_unknown_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"dataset\.source"):
        _dataset("imagenet", tmp_path)  # the schema refuses it first
    dataset = dataclasses.replace(_dataset("arrays", tmp_path), source="imagenet")
    with pytest.raises(InputError, match=r"dataset\.source must be one of .*'imagenet'"):
        open_source(dataset, 0)
