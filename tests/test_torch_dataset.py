"""The PyTorch adapter under a real DataLoader with two workers, forked and spawned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import optional_import

from datumdb import DatabaseWriter, DatumReader
from datumdb.errors import DatabaseChangedError

torch = optional_import("torch")
DataLoader = torch.utils.data.DataLoader
BatchSampler, RandomSampler = torch.utils.data.BatchSampler, torch.utils.data.RandomSampler
default_collate = torch.utils.data.default_collate
from datumdb.torch_dataset import DatumDataset  # noqa: E402  (needs torch)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    path = tmp_path_factory.mktemp("torch") / "db"
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (50, 3, 8, 6), dtype=np.uint8)
    labels = rng.integers(-3, 10, 50)
    with DatabaseWriter(path, batch_size=7) as writer:
        for image, label in zip(images, labels, strict=True):
            writer.add(image, int(label))
    return path, images, labels


def test_items_are_writable_tensors_equal_to_the_reader(db) -> None:
    path, images, labels = db
    dataset = DatumDataset(path)
    assert len(dataset) == 50
    tensor, label = dataset[7]
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 8, 6)
    assert np.array_equal(tensor.numpy(), images[7]) and label == labels[7]
    tensor[0, 0, 0] = 1  # owns its memory: writing does not touch the database's pages
    with DatumReader(path) as reader:
        assert np.array_equal(reader[7][0], images[7])


def _to_unit_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() / 255


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_with_two_workers(db, start_method: str) -> None:
    path, images, labels = db
    dataset = DatumDataset(path, transform=_to_unit_float, target_transform=int)  # picklable, for spawn
    dataset[0]  # used in the parent first: the workers must not reuse its environment
    loader = DataLoader(dataset, batch_size=8, num_workers=2, multiprocessing_context=start_method)
    seen_images, seen_labels = [], []
    for batch, batch_labels in loader:
        assert batch.dtype == torch.float32 and tuple(batch.shape[1:]) == (3, 8, 6)
        seen_images.append(batch)
        seen_labels.append(batch_labels)
    assert torch.allclose(torch.cat(seen_images), torch.from_numpy(images).float() / 255)
    assert torch.equal(torch.cat(seen_labels), torch.from_numpy(labels))
    assert sorted(p.name for p in path.iterdir()) == ["data.mdb", "datumdb.json"]


def _write(path: Path, images: np.ndarray, *, overwrite: bool = False) -> None:
    with DatabaseWriter(path, batch_size=16, overwrite=overwrite) as writer:
        for i, image in enumerate(images):
            writer.add(image, i)


def _epoch(dataset: DatumDataset, **options) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(DataLoader(dataset, batch_size=8, **options))
    return torch.cat([b for b, _ in batches]), torch.cat([labels for _, labels in batches])


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_an_epoch_after_an_in_place_rebuild_fails_instead_of_mixing_versions(tmp_path: Path, start_method: str) -> None:
    """The dataset is pinned when created: len and every worker read that version, or fail."""
    rng = np.random.default_rng(12)
    old, new = rng.integers(0, 256, (40, 3, 4, 4), dtype=np.uint8), rng.integers(0, 256, (56, 3, 4, 4), dtype=np.uint8)
    path = tmp_path / "db"
    _write(path, old)
    dataset = DatumDataset(path)  # not used yet: pinned all the same
    _write(path, new, overwrite=True)
    assert len(dataset) == 40  # the sampler's length is the pinned version's, not the new 56
    # One worker: with two, torch may tear down the failed epoch while the second spawned worker
    # is still unpickling its queues, and report that worker's exit from a __del__ (a warning).
    with pytest.raises(DatabaseChangedError, match="replaced after this reader pinned"):
        _epoch(dataset, num_workers=1, multiprocessing_context=start_method)
    images, labels = _epoch(dataset)  # in the main process: the pinned version, whole
    assert torch.equal(images, torch.from_numpy(old)) and torch.equal(labels, torch.arange(40))
    workers = {"num_workers": 2, "multiprocessing_context": start_method}
    images, labels = _epoch(DatumDataset(path), **workers)  # a new dataset reads the new version
    assert torch.equal(images, torch.from_numpy(new)) and torch.equal(labels, torch.arange(56))


def _mixed_and_encoded(folder: Path) -> dict[str, Path]:
    """Databases the batch path must handle or leave to the record path: PNG, float, mixed shapes."""
    rng = np.random.default_rng(5)
    made = {}
    for name, encoding, dtype in (("png", "png", np.uint8), ("float", "none", np.float32)):
        made[name] = folder / name
        with DatabaseWriter(made[name], encoding=encoding) as writer:
            for label in range(20):
                writer.add((rng.random((3, 5, 4)) * 255).astype(dtype), label)
    made["mixed"] = folder / "mixed"
    with DatabaseWriter(made["mixed"]) as writer:
        for label in range(20):
            writer.add(rng.integers(0, 256, (1, 3 + label % 2, 4), dtype=np.uint8), label)
    return made


def test_getitems_returns_the_samples_getitem_returns(db, tmp_path: Path) -> None:
    """What a DataLoader gets in one batch call equals record-by-record reads, for every kind."""
    paths = {"raw": db[0], **_mixed_and_encoded(tmp_path)}
    rng = np.random.default_rng(0)
    for kind, path in paths.items():
        dataset = DatumDataset(path, target_transform=lambda label: label * 10)
        indices = [*rng.integers(0, len(dataset), 17).tolist(), 0, 0, len(dataset) - 1, -1]
        batch = dataset.__getitems__(indices)
        assert len(batch) == len(indices), kind
        for index, (image, label) in zip(indices, batch, strict=True):
            expected_image, expected_label = dataset[index]
            assert image.dtype == expected_image.dtype and torch.equal(image, expected_image), (kind, index)
            assert label == expected_label and isinstance(label, int), (kind, index)
    uniform = DatumDataset(paths["raw"]).__getitems__([3, 9])
    assert uniform[0][0].untyped_storage().data_ptr() == uniform[1][0].untyped_storage().data_ptr()  # one batch
    uniform[0][0][0, 0, 0] = 7  # writable, and the database is untouched
    assert DatumDataset(paths["raw"])[3][0][0, 0, 0] == int(db[1][3, 0, 0, 0])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shuffled_epoch_of_batches_holds_every_record_once(db, workers: int) -> None:
    path, images, labels = db
    loader = DataLoader(
        DatumDataset(path), batch_size=16, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(3)
    )
    seen_images, seen_labels = [], []
    for batch, batch_labels in loader:
        assert batch.is_contiguous() and batch.dtype == torch.uint8
        seen_images.append(batch)
        seen_labels.append(batch_labels)
    all_images, all_labels = torch.cat(seen_images).numpy(), torch.cat(seen_labels).numpy()
    seen = sorted(zip([image.tobytes() for image in all_images], all_labels.tolist(), strict=True))
    assert seen == sorted(zip([image.tobytes() for image in images], labels.tolist(), strict=True))
    assert not np.array_equal(all_labels, labels)  # shuffled


def test_a_uniform_raw_dataset_builds_its_index_when_created(db, tmp_path: Path) -> None:
    """Built in the main process, so that forked workers inherit it instead of scanning the file."""
    assert DatumDataset(db[0]).reader._pinned().built_offset_index() is not None
    for path in _mixed_and_encoded(tmp_path).values():  # no index to build (or nothing built)
        assert DatumDataset(path).reader._pinned().built_offset_index() is None


def test_a_batch_of_indices_is_what_default_collate_makes_of_getitems(db, tmp_path: Path) -> None:
    paths = {"raw": db[0], **_mixed_and_encoded(tmp_path)}
    rng = np.random.default_rng(1)
    for kind, path in paths.items():
        for options in ({}, {"transform": _to_unit_float, "target_transform": int}):
            dataset = DatumDataset(path, **options)
            indices = [*rng.integers(-len(dataset), len(dataset), 9).tolist(), 0, 0]
            for given in (indices, tuple(indices), np.array(indices), torch.tensor(indices)):
                if kind == "mixed":  # two shapes: no batch tensor, either way
                    with pytest.raises(RuntimeError):
                        default_collate(dataset.__getitems__(indices))
                    with pytest.raises(RuntimeError):
                        dataset[given]
                    continue
                images, labels = dataset[given]
                expected_images, expected_labels = default_collate(dataset.__getitems__(indices))
                assert images.dtype == expected_images.dtype and torch.equal(images, expected_images), kind
                assert labels.dtype == expected_labels.dtype and torch.equal(labels, expected_labels), kind
                assert images.is_contiguous()
    dataset = DatumDataset(paths["raw"])
    assert torch.equal(dataset[np.array(3)][0], dataset[3][0])  # a 0-d index is one sample
    with pytest.raises(IndexError, match="out of range"):
        dataset[[0, 50]]
    with pytest.raises(TypeError, match="record indices must be integers"):
        dataset[[0.5]]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_batch_sampler_recipe_gives_one_tensor_per_batch_for_a_whole_epoch(db, workers: int) -> None:
    path, images, labels = db
    dataset = DatumDataset(path)
    sampler = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(4)), 16, drop_last=False)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers)
    seen_images, seen_labels = [], []
    for batch, batch_labels in loader:
        assert batch.is_contiguous() and batch.dtype == torch.uint8 and tuple(batch.shape[1:]) == (3, 8, 6)
        assert batch_labels.dtype == torch.int64 and len(batch_labels) == len(batch)
        seen_images.append(batch)
        seen_labels.append(batch_labels)
    assert [len(b) for b in seen_images] == [16, 16, 16, 2]
    all_images, all_labels = torch.cat(seen_images).numpy(), torch.cat(seen_labels).numpy()
    seen = sorted(zip([image.tobytes() for image in all_images], all_labels.tolist(), strict=True))
    assert seen == sorted(zip([image.tobytes() for image in images], labels.tolist(), strict=True))
    assert not np.array_equal(all_labels, labels)  # shuffled


def test_readme_transform_and_collate_of_mixed_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's DatumDataset example, run as written on photos of their own sizes."""
    import json
    import re

    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "pad_collate" in b]
    rng = np.random.default_rng(8)
    images = [rng.integers(0, 256, (3, 5 + i % 4, 9 - i % 3), dtype=np.uint8) for i in range(6)]
    with DatabaseWriter(tmp_path / "data" / "lmdb" / "train", channel_order="BGR") as writer:
        for i, image in enumerate(images):
            writer.add(image, i % 2)
    (tmp_path / "reports").mkdir()
    means = [100.0, 110.0, 120.0]
    (tmp_path / "reports" / "mean.json").write_text(json.dumps({"channel_means": means}))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(
        compile(
            block.replace("num_workers=4", "num_workers=0").replace("shuffle=True", "shuffle=False"), "README", "exec"
        ),
        namespace,
    )
    batches = list(namespace["loader"])  # type: ignore[call-overload]
    batch, labels = batches[0]
    assert batch.shape == (6, 3, max(i.shape[1] for i in images), max(i.shape[2] for i in images))
    assert labels.tolist() == [i % 2 for i in range(6)]
    for row, image in enumerate(images):
        expected = (torch.from_numpy(image).float() - torch.tensor(means).view(3, 1, 1)).flip(0)  # RGB, mean removed
        assert torch.equal(batch[row, :, : image.shape[1], : image.shape[2]], expected)
        assert not batch[row, :, image.shape[1] :, :].any() and not batch[row, :, :, image.shape[2] :].any()
