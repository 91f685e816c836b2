"""Shard sets: content-defined membership that is stable under edits, and the assembled database."""

from __future__ import annotations

import itertools

import lmdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datumdb import DatumReader
from datumdb.codec import decode, encode_sample
from datumdb.errors import InputError, VerificationError
from datumdb.manifest import read_manifest
from datumdb.shardset import (
    SHARD_INDEX,
    array_identities,
    assemble,
    assembled_key,
    cut_shards,
    plan_shards,
    read_shard_index,
    sample_hashes,
    shard_key,
    split_of,
    write_shard,
    write_shard_index,
)
from datumdb.verify import verify_database

pytestmark = pytest.mark.unit

FRACTIONS = (0.8, 0.1, 0.1)


def photo_identities(count: int, prefix: str = "n0") -> list[bytes]:
    return [f"{prefix}{i % 7}/img_{i:06d}.JPEG".encode() for i in range(count)]


def memberships(plan) -> dict[str, set[tuple[str, tuple[int, ...]]]]:
    """Per split: each shard as (name, its members' identities as indices of the caller's list)."""
    return {split: {(s.name, tuple(s.members.tolist())) for s in shards} for split, shards in plan.shards.items()}


def test_hashes_depend_on_identity_and_seed_only() -> None:
    ids = photo_identities(100)
    a = sample_hashes(ids, 0)
    assert np.array_equal(a, sample_hashes(list(ids), 0))
    assert np.array_equal(a[10:20], sample_hashes(ids[10:20], 0))  # no dependence on neighbours
    assert not np.array_equal(a, sample_hashes(ids, 1))


def test_split_shares_are_the_expected_fractions() -> None:
    ids = array_identities(200_000)
    splits = split_of(sample_hashes(ids, 3)[:, 0], FRACTIONS)
    shares = np.bincount(splits, minlength=3) / len(ids)
    assert np.allclose(shares, FRACTIONS, atol=0.005)


@pytest.mark.parametrize("mean", [1, 4, 64, 1000])
def test_cut_shards_covers_everything_within_bounds(mean: int) -> None:
    hashes = sample_hashes(array_identities(20_000), 0)[:, 1]
    ranges = cut_shards(hashes, mean)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(hashes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = np.array([stop - start for start, stop in ranges])
    assert sizes.max() <= 4 * mean
    assert (sizes[:-1] >= max(1, mean // 4)).all()
    if mean >= 64:
        assert 0.7 * mean < sizes.mean() < 1.3 * mean


def test_append_changes_about_as_many_shards_as_it_touches() -> None:
    """1% new photos in a new class folder: only the shards around the insertion change."""
    before = photo_identities(20_000)
    added = [f"n0_new/extra_{i:04d}.JPEG".encode() for i in range(200)]
    plan_a = plan_shards(before, 0, FRACTIONS, 256)
    plan_b = plan_shards(before + added, 0, FRACTIONS, 256)
    for split in plan_a.shards:
        a = {(s.name, tuple(s.members.tolist())) for s in plan_a.shards[split]}
        b = {(s.name, tuple(s.members.tolist())) for s in plan_b.shards[split]}
        changed = len(b - a)
        assert changed <= 4, (split, changed, len(b))
    # An existing sample never changes split.
    split_a = {m: split for split, shards in plan_a.shards.items() for s in shards for m in s.members.tolist()}
    split_b = {m: split for split, shards in plan_b.shards.items() for s in shards for m in s.members.tolist()}
    assert all(split_b[m] == split for m, split in split_a.items())


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_removing_k_samples_changes_at_most_about_k_shards(data: st.DataObject) -> None:
    ids = array_identities(3000)
    k = data.draw(st.integers(1, 5))
    gone = set(data.draw(st.lists(st.integers(0, len(ids) - 1), min_size=k, max_size=k, unique=True)))
    kept = [identity for i, identity in enumerate(ids) if i not in gone]
    names_a = {split: [s.name for s in shards] for split, shards in plan_shards(ids, 5, FRACTIONS, 64).shards.items()}
    plan_b = plan_shards(kept, 5, FRACTIONS, 64)
    content_a = {
        (split, tuple(ids[m] for m in s.members.tolist()))
        for split, shards in plan_shards(ids, 5, FRACTIONS, 64).shards.items()
        for s in shards
    }
    content_b = {
        (split, tuple(kept[m] for m in s.members.tolist())) for split, shards in plan_b.shards.items() for s in shards
    }
    assert len(content_b - content_a) <= 3 * k  # each removal: its shard, rarely forced cuts after it
    assert sum(len(v) for v in names_a.values()) - 3 * k <= len(content_b & content_a)


def test_duplicate_identities_are_refused() -> None:
    with pytest.raises(InputError, match="listed twice"):
        plan_shards([b"a.jpg", b"b.jpg", b"a.jpg"], 0, FRACTIONS, 4)


def build_set(tmp_path, count=300, mean=32, seed=0, relabel=None, tail=True):
    """A shard set of the train split of ``count`` small images; returns (folder, images by identity)."""
    ids = photo_identities(count) if tail else array_identities(count)
    plan = plan_shards(ids, seed, FRACTIONS, mean)
    rng = np.random.default_rng(1)
    images = {identity: rng.integers(0, 256, (3, 4, 5), dtype=np.uint8) for identity in ids}
    labels = {identity: i % 10 for i, identity in enumerate(ids)}
    if relabel:
        labels.update(relabel)
    folder = tmp_path / "train"
    folder.mkdir()
    for shard in plan.shards["train"]:
        write_shard(
            folder / shard.name,
            (
                (
                    b"_" + ids[m] if tail else b"",
                    encode_sample(images[ids[m]], labels[ids[m]], "none"),
                    None,
                    plan.order_hashes[m],
                )
                for m in shard.members.tolist()
            ),
            metadata={"split": "train"},
        )
    write_shard_index(folder, "train", seed, [s.name for s in plan.shards["train"]])
    return folder, plan, ids, images, labels


def test_every_shard_is_a_plain_caffe_lmdb(tmp_path) -> None:
    folder, plan, ids, images, labels = build_set(tmp_path)
    index = read_shard_index(folder)
    assert index["count"] == plan.counts()["train"]
    for shard in plan.shards["train"]:
        env = lmdb.open(str(folder / shard.name), readonly=True, lock=False)
        with env.begin() as txn:
            items = list(txn.cursor())
        env.close()
        assert [k for k, _ in items] == [shard_key(p, b"_" + ids[m]) for p, m in enumerate(shard.members.tolist())]
        for (_, value), m in zip(items, shard.members.tolist(), strict=True):
            datum = decode(value)
            assert datum.label == labels[ids[m]]
            assert np.array_equal(np.frombuffer(datum.data, np.uint8).reshape(3, 4, 5), images[ids[m]])


@pytest.mark.parametrize("tail", [True, False])
def test_assembled_database_holds_every_record_shuffled_and_verifies(tmp_path, tail: bool) -> None:
    folder, plan, ids, images, labels = build_set(tmp_path, tail=tail)
    manifest = assemble(folder, tmp_path / "train_lmdb")
    members = [m for shard in plan.shards["train"] for m in shard.members.tolist()]
    assert manifest["count"] == len(members)
    env = lmdb.open(str(tmp_path / "train_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    expected_order = sorted(members, key=lambda m: int(plan.order_hashes[m]))
    assert expected_order != sorted(members)  # a real shuffle
    for rank, ((key, value), m) in enumerate(zip(items, expected_order, strict=True)):
        assert key == assembled_key(rank, len(members), b"_" + ids[m] if tail else b"")
        datum = decode(value)
        assert datum.label == labels[ids[m]]
        assert np.array_equal(np.frombuffer(datum.data, np.uint8).reshape(3, 4, 5), images[ids[m]])
    hist: dict[str, int] = {}
    for m in members:
        hist[str(labels[ids[m]])] = hist.get(str(labels[ids[m]]), 0) + 1
    assert manifest["label_histogram"] == dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    assert manifest["shapes"] == {"3x4x5": len(members)}
    assert verify_database(tmp_path / "train_lmdb")["ok"]


@pytest.mark.parametrize("room", [1 << 40, 1 << 10, None])
def test_the_assembly_prefetches_the_shards_only_when_they_fit_in_memory(tmp_path, monkeypatch, room) -> None:
    """Shards the page cache dropped come back in large reads when they fit in half the free
    memory; a split larger than that (or a system that does not say) is read as assembled."""
    import datumdb.shardset as shardset

    folder, plan, *_ = build_set(tmp_path)
    prefetched: list[str] = []
    monkeypatch.setattr(shardset, "available_memory", lambda: room)
    monkeypatch.setattr(DatumReader, "prefetch", lambda self: prefetched.append(self.path.name))
    assemble(folder, tmp_path / "db")
    names = [shard.name for shard in plan.shards["train"]]
    assert prefetched == (names if room == 1 << 40 else [])
    assert verify_database(tmp_path / "db")["ok"]


def test_a_shard_set_reader_hands_out_views_and_prefetches_every_shard(tmp_path, monkeypatch) -> None:
    folder, plan, *_ = build_set(tmp_path)
    with DatumReader(folder) as reader:
        keys = reader.keys()
        assert [bytes(reader.value_view(key)) for key in keys] == [reader.value(key) for key in keys]
        with pytest.raises(KeyError):
            reader.value_view(b"nope/00000000")
        prefetched: list[str] = []
        monkeypatch.setattr(DatumReader, "prefetch", lambda self: prefetched.append(self.path.name))
        reader.prefetch()  # the set's: each shard's in turn
    assert prefetched == [shard.name for shard in plan.shards["train"]]


def test_assembly_is_reproducible(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    folder_a, *_ = build_set(tmp_path / "a")
    folder_b, *_ = build_set(tmp_path / "b")
    assemble(folder_a, tmp_path / "a" / "db")
    assemble(folder_b, tmp_path / "b" / "db")
    assert (tmp_path / "a" / "db" / "data.mdb").read_bytes() == (tmp_path / "b" / "db" / "data.mdb").read_bytes()
    assert read_manifest(tmp_path / "a" / "db")["digest"] == read_manifest(tmp_path / "b" / "db")["digest"]


def test_relabelling_one_sample_rewrites_one_shard(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    folder_a, plan, ids, _, labels = build_set(tmp_path / "a")
    target = ids[plan.shards["train"][3].members[0]]
    folder_b, *_ = build_set(tmp_path / "b", relabel={target: labels[target] + 1})
    changed = [
        shard.name
        for shard in plan.shards["train"]
        if (folder_a / shard.name / "data.mdb").read_bytes() != (folder_b / shard.name / "data.mdb").read_bytes()
    ]
    assert changed == [plan.shards["train"][3].name]


def test_a_damaged_index_is_one_clear_error(tmp_path) -> None:
    folder, *_ = build_set(tmp_path)
    index = folder / SHARD_INDEX
    text = index.read_text()
    index.write_text(text.replace('"count"', '"cnt"', 1))
    with pytest.raises(VerificationError, match=str(index)):
        read_shard_index(folder)
    index.write_text(text.replace('"name": "', '"name": "../', 1))
    with pytest.raises(VerificationError, match="16-hex-digit"):
        read_shard_index(folder)


def test_cli_assemble_publishes_once_and_refuses_bad_input(tmp_path, capsys) -> None:
    from datumdb.cli import main

    folder, plan, *_ = build_set(tmp_path)
    db = tmp_path / "train_lmdb"
    assert main(["assemble", str(folder), str(db)]) == 0
    assert f"{plan.counts()['train']} records" in capsys.readouterr().out
    assert main(["assemble", str(folder), str(db)]) == 2  # exists: needs --overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main(["assemble", str(folder), str(db), "--overwrite"]) == 0
    capsys.readouterr()
    (folder / SHARD_INDEX).write_text("{")
    assert main(["assemble", str(folder), str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and SHARD_INDEX in err
    assert not (tmp_path / "other").exists()


_READ_ALL = """
import resource, sys
from datumdb import DatumReader
reader = DatumReader(sys.argv[1])
print(len(list(reader.datums())), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _with_file_limit(soft: int, hard: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_shard_set_of_more_shards_than_the_soft_file_limit_reads_and_assembles(tmp_path) -> None:
    """Each open shard holds two descriptors: 115 shards pass a soft limit of 128 (raised
    towards the hard one), and past the hard limit the error is one line, not LMDB's failure in
    the middle of a read."""
    import subprocess
    import sys

    folder, plan, *_ = build_set(tmp_path, count=500, mean=4)
    shards = len(plan.shards["train"])
    assert shards * 2 > 128
    run = [sys.executable, "-c", _READ_ALL, str(folder)]
    done = subprocess.run(run, capture_output=True, text=True, preexec_fn=_with_file_limit(128, 4096))
    assert done.returncode == 0, done.stderr
    count, soft = map(int, done.stdout.split())
    assert count == plan.counts()["train"] and 2 * shards < soft <= 4096
    assemble = [sys.executable, "-m", "datumdb", "assemble", str(folder), str(tmp_path / "one")]
    done = subprocess.run(assemble, capture_output=True, text=True, preexec_fn=_with_file_limit(128, 4096))
    assert done.returncode == 0, done.stderr
    assert len(DatumReader(tmp_path / "one")) == count

    done = subprocess.run(run, capture_output=True, text=True, preexec_fn=_with_file_limit(128, 128))
    assert done.returncode != 0 and "DatabaseError" in done.stderr
    assert f"{folder} ({shards} shards): reading it needs" in done.stderr and "ulimit -n" in done.stderr
    done = subprocess.run(
        [*assemble[:-1], str(tmp_path / "two")], capture_output=True, text=True, preexec_fn=_with_file_limit(128, 128)
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "build.shard_size" in done.stderr
    assert not (tmp_path / "two").exists()


def expected_records(plan, ids, images, labels):
    return [(images[ids[m]], labels[ids[m]]) for shard in plan.shards["train"] for m in shard.members.tolist()]


def test_reader_opens_a_shard_set_as_one_sequence(tmp_path) -> None:
    from datumdb.reader import DatumReader
    from datumdb.shardset import ShardSetReader

    folder, plan, ids, images, labels = build_set(tmp_path)
    expected = expected_records(plan, ids, images, labels)
    with DatumReader(folder) as reader:
        assert isinstance(reader, ShardSetReader)
        assert len(reader) == len(expected)
        for i in (0, 1, len(expected) // 2, len(expected) - 1, -1):
            image, label = reader[i]
            assert np.array_equal(image, expected[i][0]) and label == expected[i][1]
        assert [label for _, label in reader] == [label for _, label in expected]
        keys = reader.keys()
        assert len(set(keys)) == len(keys) == len(expected)
        assert reader.get(keys[7])[1] == expected[7][1]
        assert decode(reader.value(keys[7])).label == expected[7][1]
        order = np.random.default_rng(0).permutation(len(expected))[:50]
        batch, batch_labels = reader.read_batch(order)
        assert np.array_equal(batch, np.stack([expected[i][0] for i in order]))
        assert batch_labels.tolist() == [expected[i][1] for i in order]
        assert reader.manifest["count"] == len(expected)
        assert reader.manifest["shapes"] == {"3x4x5": len(expected)}
        with pytest.raises(IndexError, match="out of range"):
            reader[len(expected)]
        with pytest.raises(KeyError):
            reader.get(b"nonsense/00000000")


def test_a_shard_set_manifest_is_the_callers_to_change(tmp_path) -> None:
    """The set's reader merges its shards' manifests without copying them (they carry every
    record's order hash): what it hands out is a copy, so a caller's edits reach no shard's."""
    from datumdb.reader import DatumReader

    folder, *_ = build_set(tmp_path)
    with DatumReader(folder) as reader:
        merged = reader.manifest
        shard = reader._parts[0]
        order = list(shard.manifest["metadata"]["order"])
        merged["metadata"]["order"].clear()
        merged["metadata"]["split"] = "edited"
        merged["shards"].clear()
        shard.manifest["metadata"]["order"].append("edited")
        assert shard.manifest["metadata"]["order"] == order
        assert reader.manifest["metadata"] == {**shard.manifest["metadata"], "split": "train"}
        assert len(reader.manifest["shards"]) == len(reader._parts)
        assert sorted(reader.assembly_positions().tolist()) == list(range(len(reader)))  # orders intact


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shard_set_reader_in_other_processes(tmp_path, method: str) -> None:
    import multiprocessing

    from datumdb.errors import DatabaseChangedError
    from datumdb.reader import DatumReader

    folder, plan, ids, images, labels = build_set(tmp_path)
    expected = expected_records(plan, ids, images, labels)
    reader = DatumReader(folder).pin()
    with multiprocessing.get_context(method).Pool(1) as pool:
        labels_there = pool.apply(_labels_of, (reader,))
    assert labels_there == [label for _, label in expected]
    index = folder / SHARD_INDEX
    index.write_text(index.read_text().replace('"seed": 0', '"seed": 1'))
    with multiprocessing.get_context(method).Pool(1) as pool, pytest.raises(DatabaseChangedError):
        pool.apply(_pinned_labels_of, (reader,))


def _labels_of(reader) -> list[int]:
    return [int(label) for _, label in reader]


def _pinned_labels_of(reader) -> list[int]:
    reader.pin()
    return _labels_of(reader)


def test_torch_dataset_over_a_shard_set(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from datumdb.torch_dataset import DatumDataset

    folder, plan, ids, images, labels = build_set(tmp_path)
    expected = expected_records(plan, ids, images, labels)
    dataset = DatumDataset(folder)
    assert len(dataset) == len(expected)
    seen = []
    for batch, batch_labels in DataLoader(dataset, batch_size=32, num_workers=2):
        assert batch.shape[1:] == (3, 4, 5)
        seen.extend(batch_labels.tolist())
    assert seen == [label for _, label in expected]
    images_batch, labels_batch = dataset[[5, 0, len(expected) - 1]]
    assert torch.equal(images_batch[1], torch.from_numpy(expected[0][0]))
    assert labels_batch.tolist() == [expected[5][1], expected[0][1], expected[-1][1]]


@pytest.mark.slow  # each shard is verified in a child process of its own
def test_verify_a_shard_set_checks_every_shard_against_the_index(tmp_path, capsys) -> None:
    import json

    from datumdb.cli import main

    folder, plan, *_ = build_set(tmp_path)
    assert main(["verify", str(folder)]) == 0
    assert f"{plan.counts()['train']} records" in capsys.readouterr().out
    index = json.loads((folder / SHARD_INDEX).read_text())
    victim = index["shards"][2]["name"]
    index["shards"][2]["digest"] = "0" * 64
    (folder / SHARD_INDEX).write_text(json.dumps(index))
    assert main(["verify", str(folder)]) == 1
    assert victim in capsys.readouterr().err
    index["shards"][2]["digest"] = read_manifest(folder / victim)["digest"]
    (folder / SHARD_INDEX).write_text(json.dumps(index))
    assert main(["verify", str(folder)]) == 0
    capsys.readouterr()
    data = folder / victim / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF  # damage the last page of one shard
    data.write_bytes(bytes(raw))
    assert main(["verify", str(folder)]) == 1
    assert victim in capsys.readouterr().err


def test_the_readme_example_runs(tmp_path, monkeypatch) -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "plan_shards(" in b)
    rng = np.random.default_rng(0)
    namespace = {"images": rng.integers(0, 256, (500, 3, 8, 8), dtype=np.uint8), "labels": np.arange(500) % 10}
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), namespace)
    train = namespace["train"]
    assert len(train) == read_manifest(tmp_path / "lmdb" / "train")["count"] > 300
    assert verify_database(tmp_path / "lmdb" / "train")["ok"]
