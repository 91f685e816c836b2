"""Damaged ``data.mdb`` files, and a child process that reads them through every read path.

Used by tests/test_damaged_databases.py. :func:`mutations` derives, from one intact
``data.mdb`` and a seed, mutations biased toward what LMDB trusts: page numbers (page headers,
branch nodes, overflow nodes, meta pages), node offsets, value lengths, key sizes, page flags
and bounds, plus single bytes anywhere and truncations. ``python tests/damaged_lmdb.py CASES``
reads a JSON list of cases, applies each to a fresh copy of its database, reads the copy every
way datumdb reads a database, and prints one line per case: ``start ID`` before it, then
``ok ID`` (every path served the original records, or raised a datumdb error) or ``wrong ID
WHAT`` (a path served a record that differs from the original without an error). A signal
kills the child after ``start ID``: the parent then knows which case did it.

What "differs" means: a record is compared with the intact database's record at the same
position. A mutation inside one record's stored value (its pixels) changes that record and
nothing can see it without a checksum (``datumdb verify`` does, with the manifest's): that
record may differ, no other.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
F_BIGDATA = 0x01
PAGE_HEADER = 16
NODE_HEADER = 8
META_FIELDS = (  # offset in the meta page, width: address, map size, free and main db fields, last page, txnid
    (24, 8), (32, 8), (40, 4), (44, 2), (46, 2), (72, 8), (80, 8),
    (88, 4), (92, 2), (94, 2), (96, 8), (104, 8), (112, 8), (120, 8), (128, 8), (136, 8), (144, 8),
)  # fmt: skip


class Layout:
    """Where the structure of an intact ``data.mdb`` is: pages, nodes and each value's bytes."""

    def __init__(self, data: bytes, page_size: int = 4096) -> None:
        self.data = data
        self.page_size = page_size
        self.pages = len(data) // page_size
        self.headers: list[tuple[int, int]] = []  # (offset, width) of page header fields
        self.pointers: list[int] = []  # offsets of 2-byte node pointers
        self.sizes: list[tuple[int, int]] = []  # (offset, width) of node data sizes and key sizes
        self.page_numbers: list[int] = []  # offsets of 8-byte page numbers (headers, overflow nodes)
        self.child_numbers: list[int] = []  # offsets of branch nodes' 6-byte child page numbers
        self.flags: list[int] = []  # offsets of 2-byte node and page flags
        self.values: list[tuple[int, int]] = []  # [start, end) of each leaf value, in key order
        self.lengths: list[tuple[int, int]] = []  # (offset of a leaf node's 4-byte value length, value start)
        keyed: list[tuple[bytes, int, int]] = []
        for page in range(2, self.pages):
            base = page * page_size
            _, _, flags, lower, upper = struct.unpack_from("<QHHHH", data, base)
            self.page_numbers.append(base)
            self.flags.append(base + 10)
            self.headers += [(base, 8), (base + 10, 2), (base + 12, 2), (base + 14, 2), (base + 12, 4)]
            if not flags & (P_BRANCH | P_LEAF) or flags & P_OVERFLOW or not PAGE_HEADER <= lower <= upper <= page_size:
                continue
            for index in range((lower - PAGE_HEADER) // 2):
                pointer = base + PAGE_HEADER + 2 * index
                node = base + struct.unpack_from("<H", data, pointer)[0]
                low, high, node_flags, key_size = struct.unpack_from("<HHHH", data, node)
                self.pointers.append(pointer)
                self.flags.append(node + 4)
                self.sizes += [(node, 4), (node, 2), (node + 6, 2)]
                if flags & P_BRANCH:
                    self.child_numbers.append(node)
                    continue
                data_start = node + NODE_HEADER + key_size
                key = data[node + NODE_HEADER : data_start]
                size = low | high << 16
                if node_flags & F_BIGDATA:
                    self.page_numbers.append(data_start)
                    first = struct.unpack_from("<Q", data, data_start)[0]
                    keyed.append((key, first * page_size + PAGE_HEADER, first * page_size + PAGE_HEADER + size))
                else:
                    keyed.append((key, data_start, data_start + size))
                self.lengths.append((node, keyed[-1][1]))
        self.values = [(start, end) for _, start, end in sorted(keyed)]


def mutations(data: bytes, seed: int, count: int) -> list[dict[str, Any]]:
    """``count`` mutations of ``data``: ``{"kind", "offset", "bytes"}`` or ``{"kind": "truncate", "size"}``."""
    rng = random.Random(seed)
    layout = Layout(data)
    size = len(data)
    page_size = layout.page_size
    found: list[dict[str, Any]] = []

    def word(width: int) -> int:
        choice = rng.random()
        if choice < 0.25:
            return rng.getrandbits(8 * width)
        if choice < 0.45:
            return (1 << (8 * width)) - 1 - rng.randrange(4)
        if choice < 0.65:  # a page number just past the file, or well past it
            return rng.choice([layout.pages, layout.pages + 1, layout.pages + 20, 2 * layout.pages, 1 << 20])
        if choice < 0.85:  # another page of the file
            return rng.randrange(layout.pages)
        return rng.choice([0, 1, page_size, size, size - 1, 1 << 31, 1 << 16, 1 << 24])

    def write(kind: str, offset: int, width: int, value: int | None = None) -> None:
        original = int.from_bytes(data[offset : offset + width], "little")
        value = word(width) if value is None else value
        value &= (1 << (8 * width)) - 1
        if value == original:
            value ^= 1
        found.append({"kind": kind, "offset": offset, "bytes": value.to_bytes(width, "little").hex()})

    while len(found) < count:
        choice = rng.random()
        if choice < 0.12:  # one byte anywhere, xor a random non-zero value
            offset = rng.randrange(size)
            write("byte", offset, 1, data[offset] ^ rng.randrange(1, 256))
        elif choice < 0.22 and layout.sizes:  # a value length or key size: near, or far
            offset, width = rng.choice(layout.sizes)
            original = int.from_bytes(data[offset : offset + width], "little")
            delta = rng.choice([1, -1, 2, 7, -7, 64, page_size, -page_size, size, 1 << 16])
            write("size", offset, width, original + delta if rng.random() < 0.5 else None)
        elif choice < 0.34 and layout.lengths:  # a value length, widened to just past the file end, or far
            offset, start = rng.choice(layout.lengths)
            write(
                "length", offset, 4, rng.choice([size - start + 1, size - start + 4096, size, 1 << 20, (1 << 32) - 1])
            )
        elif choice < 0.48 and layout.page_numbers:  # a page number (page header, overflow node)
            write("page", rng.choice(layout.page_numbers), 8)
        elif choice < 0.58 and layout.child_numbers:  # a branch node's child page (low 32 bits)
            write("child", rng.choice(layout.child_numbers), 4)
        elif choice < 0.68 and layout.pointers:  # a node offset inside its page
            write("pointer", rng.choice(layout.pointers), 2, rng.choice([None, page_size - 1, 65535, 0, 8]))
        elif choice < 0.76 and layout.flags:
            write("flags", rng.choice(layout.flags), 2, rng.choice([None, 0, 1, 2, 4, 0x20, 0x40, 0x8000]))
        elif choice < 0.84 and layout.headers:  # page bounds, flags, number, overflow page count
            offset, width = rng.choice(layout.headers)
            write("header", offset, width)
        elif choice < 0.92:  # meta pages: root, last page, entries, depth, flags, txnid, page size
            field, width = rng.choice(META_FIELDS)
            write("meta", rng.choice([0, page_size]) + PAGE_HEADER + field, width)
        else:  # truncation: on a page boundary or not
            cut = rng.randrange(size) if rng.random() < 0.5 else rng.randrange(size // page_size) * page_size
            found.append({"kind": "truncate", "size": cut})
    return found


def apply(data: bytes, mutation: dict[str, Any]) -> bytes:
    if mutation["kind"] == "truncate":
        return data[: mutation["size"]]
    patch = bytes.fromhex(mutation["bytes"])
    offset = mutation["offset"]
    return data[:offset] + patch + data[offset + len(patch) :]


def touched_records(data: bytes, mutation: dict[str, Any]) -> list[int]:
    """Positions (in key order) of the records whose stored value bytes the mutation changes."""
    if mutation["kind"] == "truncate":
        return []
    start, end = mutation["offset"], mutation["offset"] + len(bytes.fromhex(mutation["bytes"]))
    return [i for i, (a, b) in enumerate(Layout(data).values) if a < end and start < b]


# --------------------------------------------------------------------------- the child


def _records(path: Path) -> list[tuple[bytes, int]]:
    from datumdb import DatumReader

    with DatumReader(path) as reader:
        return [(bytes(array.tobytes()), int(label)) for array, label in reader]


def _read_every_way(path: Path, mixed: bool) -> dict[str, Any]:
    """What each path served: {path name: list of (bytes, label) or mean bytes, or "error"}."""
    import numpy as np

    from datumdb import DatumReader
    from datumdb.errors import DatumDBError
    from datumdb.mean import compute_mean
    from datumdb.pipeline.check import nearest_class_mean
    from datumdb.verify import verify_database

    served: dict[str, Any] = {}

    def attempt(name: str, read) -> None:
        try:
            served[name] = read()
        except (DatumDBError, KeyError, IndexError) as exc:
            if isinstance(exc, (KeyError, IndexError)) and "no record" not in str(exc) and "range" not in str(exc):
                raise
            served[name] = "error"

    def single() -> list[tuple[bytes, int]]:
        with DatumReader(path) as reader:
            return [(array.tobytes(), int(label)) for array, label in (reader[i] for i in range(len(reader)))]

    def batch() -> list[tuple[bytes, int]]:
        with DatumReader(path) as reader:
            if not len(reader):
                return []
            images, labels = reader.read_batch(np.arange(len(reader))[::-1])
            return [(image.tobytes(), int(label)) for image, label in zip(images[::-1], labels[::-1], strict=True)]

    def iterate() -> list[tuple[bytes, int]]:
        with DatumReader(path) as reader:
            return [(array.tobytes(), int(label)) for array, label in reader]

    def by_key() -> list[tuple[bytes, int]]:  # what pipeline verify's sample check does
        from datumdb.codec import datum_to_array

        with DatumReader(path) as reader:
            out = []
            for i in range(len(reader)):
                key = reader.key(i)
                datum = reader.datum(key)
                out.append((datum_to_array(datum, key=key, imread="color").tobytes(), int(datum.label)))
            return out

    def dataset() -> list[tuple[bytes, int]] | None:
        try:
            from datumdb.torch_dataset import DatumDataset
        except ImportError:
            return None
        data = DatumDataset(path)
        batch = data.__getitems__(list(range(len(data))))
        single = [(data[i][0].numpy().tobytes(), int(data[i][1])) for i in range(len(data))]
        assert [(t.numpy().tobytes(), int(label)) for t, label in batch] == single or not single
        return single

    attempt("single", single)
    attempt("batch", batch)
    attempt("iterate", iterate)
    attempt("by_key", by_key)
    attempt("dataset", dataset)
    attempt("mean", lambda: compute_mean(path, progress=False).tobytes())
    attempt("ncm", lambda: nearest_class_mean(path, path, mixed=mixed, imread="color"))
    report = verify_database(path)  # in this process: a crash here is a crash of the test
    served["verify"] = "passed" if report["ok"] else "failed"
    return served


def _expected(path: Path, mixed: bool) -> dict[str, Any]:
    served = _read_every_way(path, mixed)
    # Photos of several sizes have no mean image (as in Caffe) and no batch: the paths an intact
    # database may fail (then nothing of theirs is compared); the others must read it.
    assert all(served[name] != "error" for name in ("single", "iterate", "by_key", "ncm")), served
    return served


def _wrong(original: dict[str, Any], served: dict[str, Any], touched: list[int], has_manifest: bool) -> list[str]:
    """What was served, differing from the original, without an error."""
    problems = []
    for name, value in served.items():
        if value == "error" or value is None or name == "verify" or original[name] == "error":
            continue
        if name in ("mean", "ncm"):
            if value != original[name] and not touched:
                problems.append(f"{name}: {str(value)[:80]} differs")
            continue
        expected = original[name]
        if len(value) != len(expected):
            # Without a manifest nothing says how many records there were: a damaged meta page
            # can make LMDB read the database's first, empty, tree, and that is all it can be told.
            if len(value) or has_manifest:
                problems.append(f"{name}: {len(value)} records, not {len(expected)}")
            continue
        differing = [i for i, (a, b) in enumerate(zip(value, expected, strict=True)) if a != b and i not in touched]
        if differing:
            problems.append(f"{name}: records {differing[:5]} differ")
    if served["verify"] == "passed" and has_manifest:
        problems.append("verify passed a damaged database")
    return problems


def child_main(cases_file: str) -> int:
    from datumdb import DatumReader

    cases = json.loads(Path(cases_file).read_text())
    originals: dict[str, dict[str, Any]] = {}
    mixed: dict[str, bool] = {}  # photos of several sizes: the classifier compares them resized
    work = Path(tempfile.mkdtemp(prefix="damaged-"))
    try:
        for case in cases:
            source = Path(case["db"])
            if case["db"] not in originals:
                mixed[case["db"]] = len({array.shape for array, _ in DatumReader(source)}) > 1
                originals[case["db"]] = _expected(source, mixed[case["db"]])
            print(f"start {case['id']}", flush=True)
            folder = work / f"case{case['id']}"
            shutil.copytree(source, folder)
            intact = (source / "data.mdb").read_bytes()
            (folder / "data.mdb").write_bytes(apply(intact, case["mutation"]))
            has_manifest = (folder / "datumdb.json").exists()
            served = _read_every_way(folder, mixed[case["db"]])
            touched = touched_records(intact, case["mutation"])
            problems = _wrong(originals[case["db"]], served, touched, has_manifest)
            print(f"{'wrong' if problems else 'ok'} {case['id']} {'; '.join(problems)}", flush=True)
            # The folder stays until the batch ends: deleted now, its inode number could come back
            # for the next case while a closed reader's environment still waits for collection.
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
