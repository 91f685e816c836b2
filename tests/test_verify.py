"""datumdb.verify and the content digest: fresh builds pass, any tampering fails, nothing is written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import FIXTURE_LMDBS, folder_state, read_lmdb_items
from hypothesis import given, settings
from hypothesis import strategies as st

from datumdb import DatabaseWriter, DatumReader
from datumdb import verify as verify_module
from datumdb.cli import main
from datumdb.codec import encode_array, encode_image, encode_png_or_jpg
from datumdb.errors import DatabaseNotFoundError, InputError
from datumdb.manifest import (
    MANIFEST_NAME,
    RECORDS_PER_CHUNK,
    SHAPES_LISTED,
    ContentDigest,
    digest_items,
    listed_shapes,
    read_manifest,
    shape_summary,
    shapes_sha256,
    write_manifest,
)
from datumdb.proto.datum_pb2 import Datum
from datumdb.verify import content_digest, verify_database

pytestmark = pytest.mark.unit


def _build(path: Path, count: int = 30, seed: int = 0, **options) -> None:
    rng = np.random.default_rng(seed)
    with DatabaseWriter(path, **options) as writer:
        for _ in range(count):
            writer.add(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), int(rng.integers(0, 4)))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "db"
    _build(path)
    return path


def _copy(db: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(db, copy)
    return copy


def _rewrite_value(db: Path, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(db), lock=False, subdir=True, map_size=64 << 20)  # no lock.mdb in the copy either
    try:
        with env.begin(write=True) as txn:
            assert txn.get(key) is not None
            txn.put(key, value)
    finally:
        env.close()


# --------------------------------------------------------------------------- passing


def test_fresh_build_passes(built: Path, capsys) -> None:
    report = verify_database(built)
    assert report["ok"] and report["problems"] == [] and report["warnings"] == []
    assert report["count"] == 30 and report["bad_records"] == 0
    assert report["digest"] == read_manifest(built)["digest"]
    assert main(["--no-progress", "verify", str(built)]) == 0
    out = capsys.readouterr().out
    assert "OK, 30 records" in out and report["digest"] in out
    assert main(["--no-progress", "verify", "--in-process", str(built)]) == 0


def test_verify_json(built: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["--no-progress", "verify", "--json", str(built)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["count"] == 30
    assert report["digest"] == read_manifest(built)["digest"]
    assert report["label_histogram"] == read_manifest(built)["label_histogram"]


@pytest.mark.parametrize("name", FIXTURE_LMDBS)
def test_digest_of_caffe_fixtures(caffe_dir: Path, name: str, capsys) -> None:
    expected = digest_items(read_lmdb_items(caffe_dir / name))
    assert content_digest(caffe_dir / name, progress=False) == expected
    assert main(["--no-progress", "digest", str(caffe_dir / name)]) == 0
    assert capsys.readouterr().out.strip() == expected
    report = verify_database(caffe_dir / name)  # no manifest: every record must still decode
    assert report["ok"] and report["count"] == 12 and report["digest"] == expected
    assert any("no datumdb.json" in w for w in report["warnings"])


def test_digest_is_independent_of_batch_and_map_size(tmp_path: Path, record_property) -> None:
    _build(tmp_path / "a", count=300, batch_size=1000, map_size=64 << 20)
    _build(tmp_path / "b", count=300, batch_size=3, map_size=32 * 1024)
    _build(tmp_path / "c", count=300, batch_size=64, map_size=1 << 20)
    digests = {read_manifest(tmp_path / n)["digest"] for n in "abc"}
    assert len(digests) == 1
    assert digests == {content_digest(tmp_path / n) for n in "abc"}
    assert digests == {digest_items(read_lmdb_items(tmp_path / "a"))}
    files = {(tmp_path / n / "data.mdb").read_bytes() for n in "abc"}
    record_property("distinct_data_mdb_files", len(files))
    assert all(verify_database(tmp_path / n)["ok"] for n in "abc")


def test_digest_depends_on_every_key_and_value_and_their_framing() -> None:
    base = [(b"a", b"xy"), (b"b", b"z")]
    variants = [
        [(b"a", b"x"), (b"yb", b"z")],  # same concatenation, other framing
        [(b"a", b"xy"), (b"c", b"z")],
        [(b"a", b"xy"), (b"b", b"Z")],
        [(b"a", b"xy")],
        [*base, (b"c", b"")],
    ]
    digests = {digest_items(v) for v in [base, *variants]}
    assert len(digests) == len(variants) + 1
    assert digest_items(base).startswith("sha256:") and len(digest_items(base)) == 7 + 64
    digest = ContentDigest()
    for pair in base:
        digest.update(*pair)
    assert digest.hexdigest == digest_items(base) and digest.count == 2


# --------------------------------------------------------------------------- failing


def test_rewritten_value_fails_naming_the_problem(built: Path, tmp_path: Path, capsys) -> None:
    copy = _copy(built, tmp_path)
    _rewrite_value(copy, b"00000017", encode_array(np.zeros((3, 8, 8), np.uint8), 1))
    report = verify_database(copy)
    assert not report["ok"]
    text = "\n".join(report["problems"])
    assert "content digest" in text and "data.mdb sha256" in text
    assert "from key '00000000'" in text
    capsys.readouterr()
    assert main(["--no-progress", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "content digest" in err and "FAILED" in err
    assert not (copy / "lock.mdb").exists()


def test_damage_is_located_to_its_chunk(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with DatabaseWriter(db) as writer:
        for i in range(2100):
            writer.add(np.full((1, 2, 2), i % 256, np.uint8), i % 3)
    _rewrite_value(db, b"00001500", encode_array(np.full((1, 2, 2), 7, np.uint8), 0))
    problems = verify_database(db)["problems"]
    located = [p for p in problems if "records 1024..2047" in p]
    assert located and "from key '00001024' to before key '00002048'" in located[0]
    assert not any("records 0..1023" in p for p in problems)


def test_undecodable_record_is_named(built: Path, tmp_path: Path) -> None:
    copy = _copy(built, tmp_path)
    _rewrite_value(copy, b"00000004", b"\x08\x03\x10\x08\x18\x08\x22\x05hello\x28\x00\x38\x00")
    report = verify_database(copy)
    assert not report["ok"] and report["bad_records"] == 1
    assert any("'00000004'" in p and "data holds 5 bytes" in p for p in report["problems"])


def test_edited_manifest_digest_fails(built: Path, tmp_path: Path, capsys) -> None:
    copy = _copy(built, tmp_path)
    path = copy / MANIFEST_NAME
    text = path.read_text()
    digest = read_manifest(built)["digest"]
    path.write_text(text.replace(digest, digest[:-1] + ("0" if digest[-1] != "0" else "1")))
    report = verify_database(copy)
    assert not report["ok"]
    assert any("manifest was modified or damaged" in p for p in report["problems"])
    capsys.readouterr()
    assert main(["--no-progress", "verify", str(copy)]) == 1
    assert "manifest was modified" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("count", 31, "count is 30 but the manifest says 31"),
        ("digest", "sha256:" + "0" * 64, "content digest is"),
        ("label_histogram", {"0": 30}, "label histogram is"),
        ("shapes", {"3x9x9": 30}, "decoded shapes"),
    ],
)
def test_resigned_manifest_with_wrong_facts_fails(built: Path, tmp_path: Path, field: str, value, message: str) -> None:
    copy = _copy(built, tmp_path)
    manifest = read_manifest(copy)
    manifest[field] = value
    write_manifest(copy, manifest)  # a valid checksum: only the recomputed facts can catch it
    report = verify_database(copy)
    assert not report["ok"]
    assert any(message in p for p in report["problems"]), report["problems"]


def test_broken_manifest_json_and_missing_data(built: Path, tmp_path: Path, capsys) -> None:
    copy = _copy(built, tmp_path)
    (copy / MANIFEST_NAME).write_text("{not json")
    report = verify_database(copy)
    assert not report["ok"] and any("not valid JSON" in p for p in report["problems"])
    (copy / "data.mdb").unlink()
    (copy / MANIFEST_NAME).write_bytes((built / MANIFEST_NAME).read_bytes())
    with pytest.raises(DatabaseNotFoundError, match=r"no data\.mdb"):  # bad input, not a failed check
        verify_database(copy)
    capsys.readouterr()
    assert main(["--no-progress", "verify", str(copy)]) == 2
    assert "no data.mdb" in capsys.readouterr().err


def test_truncated_data_mdb_is_reported_not_crashing(built: Path, tmp_path: Path, capsys) -> None:
    copy = _copy(built, tmp_path)
    data = (copy / "data.mdb").read_bytes()
    (copy / "data.mdb").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["--no-progress", "verify", str(copy)]) == 1
    assert "FAILED" in capsys.readouterr().err


# --------------------------------------------------------------------------- no writes


def test_read_commands_leave_the_folder_untouched(built: Path, caffe_dir: Path, tmp_path: Path, capsys) -> None:
    for db in (built, caffe_dir / "lmdb_raw", caffe_dir / "lmdb_png"):
        before = folder_state(db)
        assert main(["--no-progress", "verify", str(db)]) == 0
        assert main(["--no-progress", "verify", "--in-process", str(db)]) == 0
        assert main(["--no-progress", "digest", str(db)]) == 0
        assert main(["--no-progress", "inspect", str(db)]) == 0
        assert main(["--no-progress", "inspect", "--json", str(db)]) == 0
        if db.name != "lmdb_png":  # PNG fixture images have different sizes: export needs one shape
            assert main(["--no-progress", "export", str(db), str(tmp_path / f"{db.name}.npz")]) == 0
        assert folder_state(db) == before
        assert not (db / "lock.mdb").exists()
    capsys.readouterr()


# --------------------------------------------------------------------------- the isolated child


HOSTILE_INIT = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
"""
HOSTILE_VERIFY = """
import json, sys
print("report " + json.dumps({{"ok": True, "problems": [], "warnings": [], "count": 1, "digest": "forged"}}))
def _child_main(argv):
    print("report " + json.dumps({{"ok": True, "problems": [], "warnings": [], "count": 1, "digest": "forged"}}))
    return 0
"""


def test_the_isolated_child_never_imports_a_datumdb_from_the_working_directory(
    built: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    hostile = tmp_path / "hostile"
    (hostile / "datumdb").mkdir(parents=True)
    marker = tmp_path / "imported.txt"
    (hostile / "datumdb" / "__init__.py").write_text(HOSTILE_INIT.format(marker=str(marker)))
    (hostile / "datumdb" / "verify.py").write_text(HOSTILE_VERIFY.format())
    (hostile / "datumdb" / "cli.py").write_text(HOSTILE_VERIFY.format())
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "data.mdb").write_bytes(np.random.default_rng(0).integers(0, 256, 64 << 10, np.uint8).tobytes())
    (garbage / MANIFEST_NAME).write_bytes((built / MANIFEST_NAME).read_bytes())
    monkeypatch.chdir(hostile)
    monkeypatch.setenv("PYTHONPATH", str(hostile))  # -I ignores it too
    capsys.readouterr()
    assert main(["--no-progress", "verify", str(garbage)]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert main(["--no-progress", "verify", "--json", str(built)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["digest"] == read_manifest(built)["digest"] != "forged"
    assert not marker.exists(), "the child imported the datumdb package of the working directory"


@pytest.fixture(scope="module")
def slow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve copies of a PNG of 5792x5792 (the decoder's pixel limit): each takes 0.2 s (on an
    idle core) to 1 s (on a busy machine) to decode, which makes the scan last several seconds."""
    path = tmp_path_factory.mktemp("slow") / "db"
    side = 5792
    rows, columns = (np.arange(side, dtype=np.uint16) * step % 251 for step in (13, 7))
    png = encode_png_or_jpg(((rows[:, None] + columns[None, :]) % 251).astype(np.uint8)[None], "png")
    with DatabaseWriter(path, encoding="png", batch_size=2, channel_order="gray") as writer:
        for i in range(12):
            writer.add_serialized(encode_image(png, i), shape=(1, side, side))
    return path


def test_a_slow_healthy_database_passes_with_a_tiny_stall_limit(slow_db: Path, capsys) -> None:
    # The scan lasts longer than the stall limit (12 records of 0.2 s or more): the old time limit
    # failed such a database, the stall limit must not. One record's decode must take less than
    # the limit (issue 17: it bounds a decode too), so 2 s: a decode here takes 0.2 s idle, up to
    # about 1 s on a shared, overloaded machine.
    report = verify_database(slow_db, isolate=True, timeout=2)
    assert report["ok"], report["problems"]
    assert report["count"] == 12 and report["digest"] == read_manifest(slow_db)["digest"]
    capsys.readouterr()
    assert main(["--no-progress", "verify", "--timeout", "2", str(slow_db)]) == 0
    assert "OK, 12 records" in capsys.readouterr().out


def _children(marker: bytes) -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
    return pids


def test_a_hung_child_is_killed_after_the_stall_limit(slow_db: Path) -> None:
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(verify_database, slow_db, isolate=True, timeout=2)
        child = None
        while child is None and not future.done():
            for pid in _children(b"_child_main"):  # once it has opened data.mdb, it is in the scan
                with contextlib.suppress(OSError):
                    if any(os.readlink(fd).endswith("data.mdb") for fd in Path(f"/proc/{pid}/fd").iterdir()):
                        child = pid
        assert child is not None, "the verification ended before it could be stopped"
        os.kill(child, signal.SIGSTOP)  # a hang: no progress at all from now on
        try:
            report = future.result(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    assert not report["ok"]
    assert any("made no progress for 2 s" in problem for problem in report["problems"]), report["problems"]
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_the_stall_limit_stops_a_decode_stuck_in_the_decoder(tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 17: a decode counted as progress for ever, so ``verify --timeout 5`` let a 66 s decode
    run to its end. A decoder stuck in C (here one that sleeps, which holds no GIL either) is ended
    after the stall limit, naming its key; the child is gone."""
    db = tmp_path / "db"
    png = encode_png_or_jpg(np.zeros((1, 4, 4), np.uint8), "png")
    with DatabaseWriter(db, encoding="png", channel_order="gray") as writer:
        for i in range(3):
            writer.add_serialized(encode_image(png, i), shape=(1, 4, 4))
    stuck = (  # the child's bootstrap, with the decode of one record stuck for two minutes
        "import sys, time; sys.path.insert(0, sys.argv.pop(1)); import datumdb.verify as v; "
        "real = v.datum_to_array; "
        "v.datum_to_array = lambda d, **kw: time.sleep(120) if kw['key'] == b'00000001' else real(d, **kw); "
        "raise SystemExit(v._child_main(sys.argv[1:]))"
    )
    monkeypatch.setattr(verify_module, "_CHILD_BOOTSTRAP", stuck)
    capsys.readouterr()
    assert main(["--no-progress", "verify", "--timeout", "1", str(db)]) == 1
    err = capsys.readouterr().err
    assert "key '00000001': decoding took longer than 1 s (--timeout); the scan stopped there" in err
    assert err.strip().splitlines()[-1].endswith("FAILED (1 problem(s), 1 bad record(s))")
    assert not _children(b"_child_main")
    report = verify_database(db, isolate=True, timeout=1)
    assert not report["ok"] and report["bad_records"] == 1 and "'00000001'" in report["problems"][0]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_timeout_must_be_a_finite_positive_number(built: Path, value: str, capsys) -> None:
    capsys.readouterr()
    assert main(["--no-progress", "verify", f"--timeout={value}", str(built)]) == 2
    err = capsys.readouterr().err
    assert "--timeout" in err and "must be a number of seconds in (0, " in err and err.count("\n") == 1
    with pytest.raises(InputError, match="timeout"):
        verify_database(built, isolate=True, timeout=float(value))


def test_strict_fails_a_database_without_manifest(caffe_dir: Path, capsys) -> None:
    db = caffe_dir / "lmdb_raw"
    capsys.readouterr()
    assert main(["--no-progress", "verify", str(db)]) == 0
    assert "no datumdb.json" in capsys.readouterr().err
    assert main(["--no-progress", "verify", "--strict", str(db)]) == 1
    assert "no datumdb.json (strict)" in capsys.readouterr().err
    for isolate in (False, True):
        report = verify_database(db, strict=True, isolate=isolate)
        assert not report["ok"] and any("strict" in p for p in report["problems"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_float_data_fails_unless_allowed(tmp_path: Path, bad: float, capsys) -> None:
    db = tmp_path / "db"
    with DatabaseWriter(db) as writer:  # the writer refuses NaN: made by another tool, say
        writer.add(np.ones((1, 2, 2), np.float32), 0)
        writer.add_serialized(
            Datum(channels=1, height=2, width=2, float_data=[1, bad, 0, 2], label=1).SerializeToString()
        )
        writer.add(np.zeros((1, 2, 2), np.float32), 2)
    for isolate in (False, True):
        report = verify_database(db, isolate=isolate)
        assert not report["ok"] and report["bad_records"] == 1
        assert any("'00000001'" in p and "NaN or infinity" in p for p in report["problems"])
        allowed = verify_database(db, isolate=isolate, allow_nonfinite=True)
        assert allowed["ok"] and any("1 record(s) hold NaN" in w for w in allowed["warnings"])
    capsys.readouterr()
    assert main(["--no-progress", "verify", str(db)]) == 1
    assert "--allow-nonfinite" in capsys.readouterr().err
    assert main(["--no-progress", "verify", "--allow-nonfinite", str(db)]) == 0


def test_a_b_tree_that_goes_round_in_circles_is_stopped(built: Path, monkeypatch) -> None:
    """Without a total time limit, a scan that keeps yielding records must still end: damage
    that makes LMDB revisit pages repeats keys, and the first repeated key stops the scan."""
    records = read_lmdb_items(built)

    def forever(self):  # what a cursor over a branch page pointing back at an earlier page yields
        while True:
            yield from records[:5]

    monkeypatch.setattr(DatumReader, "items", forever)
    report = verify_database(built)
    assert not report["ok"]
    assert any("key '00000000' comes after key '00000004': the B-tree is damaged" in p for p in report["problems"])


# --------------------------------------------------------------------------- the chunk-at-a-time fast path


UNIFORM_CHUNK = verify_module._uniform_chunk


def _fast_and_slow(db: Path, monkeypatch, **options) -> tuple[dict, dict, int]:
    """verify's report as it is, and with every chunk forced through the record-by-record checks;
    and how many chunks took the fast path."""
    taken = []

    def spy(*args):
        result = UNIFORM_CHUNK(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(verify_module, "_uniform_chunk", spy)
    fast = verify_database(db, **options)
    monkeypatch.setattr(verify_module, "_uniform_chunk", lambda *args: None)
    slow = verify_database(db, **options)
    return fast, slow, sum(taken)


VARINT_LABELS = [0, 5, 127, 128, 300, 16384, 2**31 - 1, -1, -(2**31)]


@settings(max_examples=10)
@given(
    count=st.integers(1, 3100),
    labels=st.lists(st.sampled_from(VARINT_LABELS), min_size=1, max_size=5),
    shape=st.sampled_from([(3, 2, 2), (1, 1, 1), (2, 3, 1)]),
)
def test_fast_path_reports_equal_record_by_record_reports(tmp_path_factory, monkeypatch_session, count, labels, shape):
    db = tmp_path_factory.mktemp("fast") / "db"
    images = np.random.default_rng(count).integers(0, 256, (count, *shape), dtype=np.uint8)
    with DatabaseWriter(db) as writer:
        writer.add_batch(images, [labels[i % len(labels)] for i in range(count)])
    fast, slow, taken = _fast_and_slow(db, monkeypatch_session)
    assert fast == slow and fast["ok"]
    assert taken == -(-count // RECORDS_PER_CHUNK)


@pytest.fixture(scope="module")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def three_chunks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("chunks") / "db"
    rng = np.random.default_rng(3)
    with DatabaseWriter(db) as writer:
        writer.add_batch(rng.integers(0, 256, (2500, 3, 4, 4), dtype=np.uint8), rng.integers(-3, 300, 2500))
    return db


@pytest.mark.parametrize(
    ("key", "value", "expect", "fast_chunks"),
    [
        (b"00001500", encode_array(np.zeros((3, 4, 4), np.uint8), 4), "records 1024..2047", 3),  # same layout
        (b"00000010", encode_array(np.zeros((3, 4, 5), np.uint8), 4), "decoded shapes", 2),  # another shape
        (b"00002100", encode_array(np.zeros((3, 4, 4), np.float32), 4), "content digest", 2),  # float_data
        (b"00000700", b"\x08\x03\x10\x04\x18\x04\x22\x05hello\x28\x00\x38\x00", "data holds 5 bytes", 2),
        (b"00001024", encode_array(np.zeros((3, 4, 4), np.uint8), 4)[:-1] + b"\x01", "content digest", 2),  # encoded
        (b"00002499", encode_array(np.zeros((3, 4, 4), np.uint8), -7) + b"\x28\x01", "content digest", 2),
    ],
    ids=["payload", "shape", "float", "undecodable", "encoded-flag", "trailing-field"],
)
def test_damaged_chunks_report_as_record_by_record(
    three_chunks, tmp_path, monkeypatch, key, value, expect, fast_chunks
):
    copy = _copy(three_chunks, tmp_path)
    _rewrite_value(copy, key, value)
    fast, slow, taken = _fast_and_slow(copy, monkeypatch)
    assert fast == slow and not fast["ok"]
    assert any(expect in problem for problem in fast["problems"]), fast["problems"]
    assert taken == fast_chunks  # the undamaged chunks (a new payload in the raw layout is one)


def test_keys_out_of_order_and_read_errors_inside_a_chunk_report_as_record_by_record(three_chunks, monkeypatch):
    records = read_lmdb_items(three_chunks)

    def circles(self):  # a damaged B-tree: the third chunk goes back to an earlier key
        yield from records[:2100]
        yield from records[5:]

    def cut_short(self):  # LMDB fails in the middle of the third chunk
        yield from records[:2100]
        raise lmdb.CorruptedError("page 1234 is not a leaf")

    # The records before the problem are checked and counted; cut short, the partial chunk is uniform.
    for items, problem, fast_chunks in [(circles, "the B-tree is damaged", 2), (cut_short, "after key '00002099'", 3)]:
        monkeypatch.setattr(DatumReader, "items", items)
        fast, slow, taken = _fast_and_slow(three_chunks, monkeypatch)
        assert fast == slow and not fast["ok"] and fast["count"] == 2100
        assert any(problem in p for p in fast["problems"]), fast["problems"]
        assert taken == fast_chunks


def test_fast_path_takes_explicit_keys_of_any_length(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "db"
    image = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    with DatabaseWriter(db) as writer:
        for i in range(1500):
            writer.add(image, i % 400, key=b"img/%04d/%s" % (i, b"x" * (i % 7)))
    fast, slow, taken = _fast_and_slow(db, monkeypatch)
    assert fast == slow and fast["ok"] and taken == 2


def test_chunks_are_bounded_in_bytes_and_still_report_as_record_by_record(three_chunks, tmp_path, monkeypatch):
    """Large records are checked fewer at a time (memory stays at about CHUNK_BYTES per chunk);
    chunks of 16 records here, one of them damaged."""
    monkeypatch.setattr(verify_module, "CHUNK_BYTES", 1000)  # values of 62 bytes: 16 at a time
    copy = _copy(three_chunks, tmp_path)
    _rewrite_value(copy, b"00000100", encode_array(np.zeros((3, 4, 5), np.uint8), 4))
    fast, slow, taken = _fast_and_slow(copy, monkeypatch)
    assert fast == slow and not fast["ok"] and fast["count"] == 2500
    assert taken == -(-2500 // 16) - 1


# ------------------------------------------------------------------ many sizes: summaries, not lists


def _sizes_db(path: Path) -> dict[str, int]:
    """A database of raw images of 3 * SHAPES_LISTED distinct sizes, some repeated; its full histogram."""
    rng = np.random.default_rng(4)
    shapes: dict[str, int] = {}
    with DatabaseWriter(path) as writer:
        for i in range(3 * SHAPES_LISTED):
            height, width = 3 + i % 17, 5 + (i * 7) % 40
            for _ in range(1 + i % 4):
                writer.add(rng.integers(0, 255, (3, height, width), dtype=np.uint8), i % 3)
                shapes[f"3x{height}x{width}"] = shapes.get(f"3x{height}x{width}", 0) + 1
    return shapes


def test_many_sizes_are_summarised_in_the_manifest_verify_and_inspect(tmp_path: Path, capsys) -> None:
    shapes = _sizes_db(tmp_path / "db")
    manifest = read_manifest(tmp_path / "db")
    summary = manifest["shape_summary"]
    top = sorted(shapes.items(), key=lambda item: (-item[1], item[0]))[:SHAPES_LISTED]
    assert manifest["shapes"] == dict(sorted(top))  # the most common only, by name
    assert summary["distinct"] == len(shapes) > SHAPES_LISTED and summary["images"] == sum(shapes.values())
    for side, axis in (("height", 1), ("width", 2)):
        values = np.repeat([int(n.split("x")[axis]) for n in shapes], list(shapes.values()))
        ordered = np.sort(values)
        assert summary[side] == {
            "min": int(ordered[0]),
            "median": int(ordered[(len(ordered) - 1) // 2]),
            "max": int(ordered[-1]),
        }
    longer = [max(int(n.split("x")[1]), int(n.split("x")[2])) for n in shapes]
    expected_bins = {"1-32": 0, "33-64": 0}
    for side, count in zip(longer, shapes.values(), strict=True):
        expected_bins["1-32" if side <= 32 else "33-64"] += count
    assert summary["longer_side"] == {k: v for k, v in expected_bins.items() if v}
    assert summary["most_common"] == [list(item) for item in top[:10]]
    assert summary["channels"] == {"3": sum(shapes.values())}

    report = verify_database(tmp_path / "db")
    assert report["ok"], report["problems"]
    assert report["shapes"] == manifest["shapes"] and report["shape_summary"] == summary

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    assert f"shapes: {len(shapes)} distinct sizes over {sum(shapes.values())} images" in out
    assert sum(f"{name} (" in out for name in shapes) == 5  # the five most common, not one entry per size


def test_verify_compares_the_sizes_the_manifest_does_not_list(tmp_path: Path) -> None:
    """A re-signed manifest whose unlisted shapes differ (the listed ones the same) fails verify."""
    shapes = _sizes_db(tmp_path / "db")
    manifest = read_manifest(tmp_path / "db")
    unlisted = sorted(set(shapes) - set(manifest["shapes"]))
    forged = dict(shapes)
    forged[unlisted[0]] += 1
    forged[unlisted[1]] -= 1
    manifest["shape_summary"]["sha256"] = shapes_sha256({k: v for k, v in forged.items() if v})
    write_manifest(tmp_path / "db", manifest)
    report = verify_database(tmp_path / "db")
    assert not report["ok"]
    assert any("do not match the manifest's shape histogram" in p for p in report["problems"]), report["problems"]


def test_a_shape_summary_of_imagenet_scale_stays_small() -> None:
    """10^5 distinct sizes: the summary is a few hundred bytes, the listing SHAPES_LISTED entries."""
    shapes = {f"3x{h}x{w}": 1 + (h * w) % 7 for h in range(100, 600) for w in range(100, 300)}
    assert len(shapes) == 100_000
    summary = shape_summary(shapes)
    assert summary is not None and summary["distinct"] == 100_000
    assert len(json.dumps(summary)) < 2000 and len(listed_shapes(shapes)) == SHAPES_LISTED
    heights = np.sort(np.repeat([int(n.split("x")[1]) for n in shapes], list(shapes.values())))
    assert summary["height"] == {"min": 100, "median": int(heights[(len(heights) - 1) // 2]), "max": 599}
    assert sum(summary["longer_side"].values()) == sum(shapes.values())
    assert shape_summary({"3x32x32": 5}) is None  # one size: nothing to summarise
