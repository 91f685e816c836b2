"""The synthetic source: deterministic, independent of how it is sharded, and learnable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from datumdb.errors import InputError
from datumdb.synthetic import class_patterns, generate, sample_label

pytestmark = pytest.mark.unit


def test_same_seed_same_samples_and_different_seed_differs() -> None:
    a_images, a_labels = generate(7, 0, 50, (3, 8, 8), 5)
    b_images, b_labels = generate(7, 0, 50, (3, 8, 8), 5)
    c_images, _ = generate(8, 0, 50, (3, 8, 8), 5)
    assert a_images.dtype == np.uint8 and a_images.shape == (50, 3, 8, 8)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)


@pytest.mark.parametrize("cuts", [[0, 100], [0, 1, 99, 100], [0, 33, 66, 100], [0, 50, 50, 100]])
def test_any_partition_into_ranges_gives_the_same_dataset(cuts: list[int]) -> None:
    whole_images, whole_labels = generate(3, 0, 100, (1, 6, 5), 4)
    parts = [generate(3, a, b, (1, 6, 5), 4) for a, b in itertools.pairwise(cuts)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), whole_images)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), whole_labels)
    assert [sample_label(3, i, 4) for i in range(100)] == whole_labels.tolist()


def test_images_are_class_dependent_not_blank() -> None:
    images, labels = generate(0, 0, 600, (3, 16, 16), 6)
    assert images.std() > 20  # not zeros, not a constant
    assert sorted(set(labels.tolist())) == list(range(6))
    train, test = slice(0, 400), slice(400, 600)
    flat = images.reshape(len(images), -1).astype(np.float64)
    means = np.stack([flat[train][labels[train] == c].mean(axis=0) for c in range(6)])
    predicted = np.argmin(((flat[test][:, None, :] - means[None]) ** 2).sum(axis=2), axis=1)
    accuracy = float((predicted == labels[test]).mean())
    assert accuracy > 0.9  # chance is 1/6


def test_patterns_differ_between_classes() -> None:
    patterns = class_patterns(0, (3, 8, 8), 3)
    assert patterns.shape == (3, 3, 8, 8)
    assert np.abs(patterns[0] - patterns[1]).mean() > 10


@pytest.mark.parametrize(
    ("shape", "classes", "message"),
    [((3, 0, 8), 2, "shape"), ((3, 8), 2, "shape"), ((3, 8, 8), 0, "classes")],
)
def test_bad_options_are_named(shape: tuple[int, ...], classes: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        generate(0, 0, 1, shape, classes)  # type: ignore[arg-type]
