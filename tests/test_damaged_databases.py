"""Damaged and crafted ``data.mdb`` files: an error naming the file and record, never a signal,
never a hang, never a record that differs from what was written.

The mutations (tests/damaged_lmdb.py) are applied to databases made by datumdb (a uniform raw
database with branch pages, one of overflow pages) and by Caffe (tests/fixtures/caffe: raw,
grey, PNG and JPEG), and each damaged copy is read in a child process through every path:
``reader[i]``, ``read_batch``, iteration, look-ups by key (pipeline verify's sample check),
``DatumDataset`` (where torch is installed), ``compute_mean`` (``pipeline mean``), the nearest
class mean classifier (pipeline verify) and ``verify_database``. Many cases share one child; a
child killed by a signal names the case it was reading. A fixed seed: the same cases every run.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from damaged_lmdb import mutations

from datumdb import DatabaseWriter, DatumReader
from datumdb.verify import verify_database

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
CAFFE = TESTS / "fixtures" / "caffe"
CHILD_TIMEOUT = 300  # seconds for one child's batch of cases: a hang fails the test
BATCH = 175  # cases per child process (its start-up and imports are paid once a batch)


def _write(path: Path, count: int, shape: tuple[int, int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with DatabaseWriter(path) as writer:
        for i in range(count):
            writer.add(rng.integers(0, 256, shape, dtype=np.uint8), i % 5)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Intact databases: datumdb's (branch pages; overflow pages) and Caffe's four fixtures."""
    root = tmp_path_factory.mktemp("intact")
    made = [_write(root / "branches", 100, (3, 8, 8), 1), _write(root / "overflow", 16, (3, 32, 32), 2)]
    return made + [CAFFE / name for name in ("lmdb_raw", "lmdb_gray", "lmdb_png", "lmdb_jpg")]


def _run_cases(sources: list[Path], per_source: int, seed: int, work: Path) -> dict[str, int]:
    """Run ``per_source`` mutations of each source in children; fail on a signal, hang or wrong record."""
    cases = []
    for number, source in enumerate(sources):
        data = (source / "data.mdb").read_bytes()
        for mutation in mutations(data, seed + number, per_source):
            cases.append({"id": len(cases), "db": str(source), "mutation": mutation})
    batches = [cases[i : i + BATCH] for i in range(0, len(cases), BATCH)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(TESTS)])}

    def run(number: int) -> tuple[list[dict], subprocess.CompletedProcess[str] | None]:
        listing = work / f"batch{number}.json"
        listing.write_text(json.dumps(batches[number]))
        try:
            result = subprocess.run(
                [sys.executable, str(TESTS / "damaged_lmdb.py"), str(listing)],
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT,
                env=env,
            )
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return batches[number], subprocess.CompletedProcess([], -999, output, "timed out")
        return batches[number], result

    with ThreadPoolExecutor(2) as pool:  # the machine's two cores
        results = list(pool.map(run, range(len(batches))))
    failures, counts = [], {"cases": len(cases), "ok": 0}
    for batch, result in results:
        lines = result.stdout.splitlines()
        started = [line.split()[1] for line in lines if line.startswith("start ")]
        counts["ok"] += sum(line.startswith("ok ") for line in lines)
        failures += [line for line in lines if line.startswith("wrong ")]
        if result.returncode != 0:
            case = next((c for c in batch if started and str(c["id"]) == started[-1]), None)
            how = "hung" if result.returncode == -999 else f"exit {result.returncode}"
            failures.append(f"child {how} at case {case}: {result.stderr[-1500:]}")
    assert not failures, "\n".join(failures[:20])
    assert counts["ok"] == counts["cases"]
    return counts


def test_damaged_files_are_an_error_never_a_signal_nor_a_wrong_record(sources: list[Path], tmp_path: Path) -> None:
    """The fast tier's slice: 30 mutations of each of the six databases."""
    assert _run_cases(sources, 30, 17, tmp_path)["cases"] == 180


@pytest.mark.fuzz
def test_thousands_of_damaged_files_are_an_error_never_a_signal_nor_a_wrong_record(
    sources: list[Path], tmp_path: Path, record_property
) -> None:
    """350 mutations of each database (2,100 cases; ``DATUMDB_FUZZ_SCALE`` times as many)."""
    per_source = 350 * int(os.environ.get("DATUMDB_FUZZ_SCALE", "1"))
    counts = _run_cases(sources, per_source, 2024, tmp_path)
    record_property("damaged_cases", counts["cases"])
    assert counts["cases"] == 6 * per_source


# --------------------------------------------------------------------------- the cases


def _damage(folder: Path, offset: int, value: bytes) -> None:
    data = bytearray((folder / "data.mdb").read_bytes())
    data[offset : offset + len(value)] = value
    (folder / "data.mdb").write_bytes(bytes(data))


def _child(code: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )


READS = {
    "item": "from datumdb import DatumReader; r = DatumReader(sys.argv[1]); [r[i] for i in range(len(r))]",
    "batch": "from datumdb import DatumReader; r = DatumReader(sys.argv[1]); r.read_batch(list(range(len(r))))",
    "iterate": "from datumdb import DatumReader; list(DatumReader(sys.argv[1]))",
    "view": "from datumdb import DatumReader; r = DatumReader(sys.argv[1]); [r.value_view(k) for k in r.keys()]",
    "mean": "from datumdb.mean import compute_mean; compute_mean(sys.argv[1])",
}


@pytest.mark.parametrize("read", sorted(READS))
def test_a_value_length_past_the_end_of_the_file_is_an_error_naming_file_and_key(tmp_path: Path, read: str) -> None:
    """The reported case: one 4-byte value length in a leaf node; SIGBUS (exit 135) before."""
    folder = _write(tmp_path / "db", 300, (3, 8, 8), 3)
    size = (folder / "data.mdb").stat().st_size
    with DatumReader(folder) as reader:
        last_key = reader.keys()[-1]
    data = (folder / "data.mdb").read_bytes()
    node = data.rindex(last_key) - 8  # the last record's node header: its value length comes first
    _damage(folder, node, struct.pack("<I", size))
    result = _child(f"import sys\n{READS[read]}", folder)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("datumdb.errors.") and str(folder / "data.mdb") in last_line, last_line
    assert f"record 299 (key {last_key.decode()!r}" in last_line, last_line


def test_a_node_offset_past_the_end_in_the_last_page_is_an_error_not_sigbus(tmp_path: Path) -> None:
    """LMDB itself reads a node at a 16-bit offset from its page: past the file for the last pages."""
    folder = _write(tmp_path / "db", 300, (3, 8, 8), 3)
    size = (folder / "data.mdb").stat().st_size
    _damage(folder, size - 4096 + 16, struct.pack("<H", 65000))  # the last leaf's first node pointer
    result = _child("import sys\nfrom datumdb import DatumReader\nlist(DatumReader(sys.argv[1]))", folder)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "datumdb.errors" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert not verify_database(folder, isolate=True)["ok"]


def test_a_forged_page_number_cannot_make_reading_and_verify_disagree(tmp_path: Path) -> None:
    """The offset index once took the map's base from the page number in the header of the page
    holding record 0: an 8-byte edit there (with a freed copy of the records where the forged base
    pointed) made it serve the previous record's image and label while verify passed. The base
    now comes from the kernel's account of LMDB's map, so the edit changes nothing the reader
    serves; and verify compares what the index serves with what LMDB returns."""
    from conftest import read_lmdb_items
    from damaged_lmdb import Layout

    from datumdb.codec import datum_to_array, decode
    from datumdb.verify import content_digest

    intact = _write(tmp_path / "intact", 150, (3, 8, 8), 5)
    (intact / "datumdb.json").unlink()  # as a Caffe-made database: nothing but the records to verify
    data = (intact / "data.mdb").read_bytes()
    page = Layout(data).values[0][0] // 4096  # the leaf page holding record 0
    expected = [(datum_to_array(decode(v, k), key=k), decode(v, k).label) for k, v in read_lmdb_items(intact)]
    for forged in (page - 1, page + 1, page + 3, 0, 2**40):
        folder = tmp_path / f"forged{forged}"
        folder.mkdir()
        (folder / "data.mdb").write_bytes(data[: page * 4096] + struct.pack("<Q", forged) + data[page * 4096 + 8 :])
        report = verify_database(folder)
        assert report["ok"], report["problems"]  # LMDB never reads that field: the records are intact
        assert report["digest"] == content_digest(intact)
        with DatumReader(folder) as reader:
            assert reader.build_index()  # the index does not depend on the forged field
            images, labels = reader.read_batch(np.arange(len(reader)))
            for i, (image, label) in enumerate(expected):
                assert np.array_equal(reader[i][0], image) and reader[i][1] == label, (forged, i)
                assert np.array_equal(images[i], image) and labels[i] == label, (forged, i)
